"""One run at a time per output: a lease object under the output, renewed while the run lives.

Two runs into one output would restore the same images twice and race on their files. A run
takes ``{output}/runs/lease.json`` before it restores anything, renews it in the background,
and removes it at the end. A run that dies leaves it to expire (``ttl_s``, two minutes), and a
rerun on the same machine sees at once that the holder's process is gone. Object stores have no
create-if-absent that every S3-compatible server honours, so taking the lease is write, wait,
read back: of two runs racing, the one whose write landed last keeps it and the other stops.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Mapping
from datetime import datetime, timezone

from pipeline import storage
from pipeline.config import ConfigError


class LeaseHeld(ConfigError):
    """Another live run holds the output."""


def _when(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _alive(held: dict) -> bool:
    """Whether the holder may still be running: its lease has not expired and, when it ran on
    this machine, its process still exists (a killed driver is seen as gone at once)."""
    if held.get("expires_at", 0) <= time.time():
        return False
    if held.get("host") == socket.gethostname() and isinstance(held.get("pid"), int):
        try:
            os.kill(held["pid"], 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # another user's live process
            return True
    return True


class Lease:
    def __init__(self, output_uri: str, run_id: str, options: Mapping | None = None,
                 ttl_s: float = 120.0):
        self.uri = storage.join(output_uri, "runs", "lease.json")
        self.run_id, self.options, self.ttl_s = run_id, options, ttl_s
        # A local write is published by a rename and seen at once; an object store needs a moment
        # for a racing writer's PUT to land before reading back tells who won.
        self.settle_s = 0.0 if storage.protocol(output_uri) == "file" else 1.0
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def holder(self) -> dict | None:
        try:
            return json.loads(storage.read_bytes(self.uri, self.options))
        except FileNotFoundError:
            return None
        except ValueError:  # a torn or foreign file holds nothing
            return None

    def acquire(self) -> None:
        """Take the lease, or raise :class:`LeaseHeld` naming the run that has it."""
        held = self.holder()
        if held and held.get("run_id") != self.run_id and _alive(held):
            raise LeaseHeld(
                f"output is in use by run {held['run_id']} on {held.get('host')} (pid "
                f"{held.get('pid')}) until {_when(held['expires_at'])}: two runs into one "
                "output would restore the same images twice. Wait for it to end; if it died, "
                f"its lease expires by itself, or remove {self.uri}")
        self._write()
        if self.settle_s:
            time.sleep(self.settle_s)
        held = self.holder()
        if not held or held.get("run_id") != self.run_id:
            raise LeaseHeld(f"another run took {self.uri} at the same moment "
                            f"({held and held.get('run_id')}); this one stops")
        self._renewer = threading.Thread(target=self._renew, name="lease", daemon=True)
        self._renewer.start()

    def release(self) -> None:
        self._stop.set()
        if self._renewer:
            self._renewer.join(timeout=10)
        held = self.holder()
        if held and held.get("run_id") == self.run_id:
            fs, path = storage.filesystem(self.uri, self.options)
            fs.rm_file(path)

    def _write(self) -> None:
        now = time.time()
        record = {"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(),
                  "renewed_at": now, "expires_at": now + self.ttl_s}
        storage.write_bytes_atomic(self.uri, json.dumps(record).encode(), self.options)

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self._write()
            except Exception:  # a storage hiccup: the next renewal tries again
                continue
