"""One run at a time per output: a lease under the output that two runs cannot both take.

Two runs into one output would restore the same images twice and race on their files. The lease
is a sequence of numbered records, ``{output}/runs/lease/0000000001.json``, ``...02.json``, and
the newest one says who holds the output. A run takes it by *creating* the next number, which
succeeds for exactly one of any number of runs racing for it: a hard link on local file systems,
a conditional PUT (``If-None-Match: *``) on S3, the create-if-absent with which Delta Lake and
Iceberg commit. A stale lease (expired, or its process gone from this machine) is taken over the
same way, by creating the number after it, so two runs taking over at once cannot both win
either; numbers only grow, so a stalled holder that wakes up can neither take the lease back nor
mistake a newer holder's record for its own. The holder renews its record every third of
``ttl_s`` and marks it released at the end.

Stores that ignore ``If-None-Match`` (moto before 5.0.20, older S3-compatible servers) are found
by a probe when the lease is taken: there the lease falls back to checking that the next number
is free, writing it, waiting ``settle_s`` and reading it back. Of two runs whose writes land
within ``settle_s`` of each other, the later write wins for both; a run whose listing predates
the other's write by more than that can still win beside it: on such stores, do not let two
schedulers start runs into one output at once.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Mapping
from datetime import datetime, timezone

from pipeline import storage
from pipeline.config import ConfigError


class LeaseHeld(ConfigError):
    """Another live run holds the output."""


class LeaseError(ConfigError):
    """The lease cannot be read: a file under ``runs/`` that this job did not write."""


_RECORD = re.compile(r"^(\d{10})\.json$")
_probed: dict[tuple, bool] = {}  # (protocol, options) -> whether conditional PUTs hold


def _when(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _alive(held: dict) -> bool:
    """Whether the holder may still be running: it has not released the lease, the lease has
    not expired and, when it ran on this machine, its process still exists (a killed driver is
    seen as gone at once)."""
    if held.get("released") or held.get("expires_at", 0) <= time.time():
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
    """The output's lease for one run: :meth:`acquire`, then :meth:`release`; ``lost`` turns
    true if another run takes it over while this one works.

    Args:
        output_uri: the output the run writes into.
        run_id: the run taking the lease.
        options: fsspec storage options.
        ttl_s: how long a record holds without renewal.
        conditional: whether the store honours create-if-absent; None finds out (local file
            systems always do; S3 by a probe).
    """

    def __init__(self, output_uri: str, run_id: str, options: Mapping | None = None,
                 ttl_s: float = 120.0, conditional: bool | None = None):
        self.dir = storage.join(output_uri, "runs", "lease")
        # What the releases of 2026-11-27 held; honoured while one of them may still run.
        self.legacy_uri = storage.join(output_uri, "runs", "lease.json")
        self.run_id, self.options, self.ttl_s = run_id, options, ttl_s
        self.conditional = conditional
        self.settle_s = 1.0  # the fallback's wait for a racing PUT to land
        self.number: int | None = None
        self.lost = False
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    # -- reading -----------------------------------------------------------------------------

    def _uri(self, number: int) -> str:
        return storage.join(self.dir, f"{number:010d}.json")

    def _numbers(self) -> list[int]:
        fs, path = storage.filesystem(self.dir, self.options)
        try:
            names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
        except FileNotFoundError:
            return []
        return sorted(int(m[1]) for m in map(_RECORD.match, names) if m)

    def _read(self, uri: str) -> dict:
        data = storage.read_bytes(uri, self.options)
        try:
            record = json.loads(data)
            if not isinstance(record, dict) or not isinstance(record.get("run_id"), str):
                raise ValueError("not a lease record")
            float(record.get("expires_at", 0))
        except (ValueError, TypeError) as e:
            raise LeaseError(
                f"{uri} is not a lease record this job wrote ({e.__class__.__name__}: "
                f"{str(e)[:80]}). If no run is writing into this output, remove it and run "
                "again.") from None
        return record

    def newest(self) -> tuple[int, dict | None]:
        """The newest record's number and content; (0, None) when there is none."""
        for _ in range(5):
            numbers = self._numbers()
            if not numbers:
                return 0, None
            try:
                return numbers[-1], self._read(self._uri(numbers[-1]))
            except FileNotFoundError:
                continue  # removed by a run that took the lease meanwhile: list again
        raise LeaseError(f"the lease under {self.dir} keeps changing; try again")

    def holder(self) -> dict | None:
        """The record of the run holding the output, or None when it is free."""
        _, held = self.newest()
        return held if held and not held.get("released") else None

    # -- taking and keeping ------------------------------------------------------------------

    def acquire(self) -> None:
        """Take the lease, or raise :class:`LeaseHeld` naming the run that has it.

        Raises:
            LeaseHeld: a live run holds the output, or won the race for it.
            LeaseError: a lease file is garbled.
        """
        self._refuse_if_held(self._legacy())
        conditional = self._conditional()
        for _ in range(3):
            number, held = self.newest()
            self._refuse_if_held(held)
            try:
                self._create(number + 1, conditional)
            except FileExistsError:
                continue  # another run took this number first: see who, and stop
            self.number = number + 1
            self._remove_older()
            self._renewer = threading.Thread(target=self._renew, name="lease", daemon=True)
            self._renewer.start()
            return
        raise LeaseHeld(f"other runs keep taking the lease under {self.dir}; this one stops")

    def _refuse_if_held(self, held: dict | None) -> None:
        if held and held.get("run_id") != self.run_id and _alive(held):
            raise LeaseHeld(
                f"output is in use by run {held['run_id']} on {held.get('host')} (pid "
                f"{held.get('pid')}) until {_when(float(held['expires_at']))}: two runs into "
                "one output would restore the same images twice. Wait for it to end; if it "
                f"died, its lease expires by itself, or remove {self.dir}")

    def _legacy(self) -> dict | None:
        try:
            return self._read(self.legacy_uri)
        except FileNotFoundError:
            return None

    def _record(self, released: bool = False) -> bytes:
        now = time.time()
        return json.dumps({"run_id": self.run_id, "host": socket.gethostname(),
                           "pid": os.getpid(), "renewed_at": now, "expires_at": now + self.ttl_s,
                           "released": released}).encode()

    def _create(self, number: int, conditional: bool) -> None:
        uri = self._uri(number)
        if conditional:
            storage.create_if_absent(uri, self._record(), self.options)
            return
        # The fallback (see the module's doc): free, written, and still ours after a while.
        fs, path = storage.filesystem(uri, self.options)
        if fs.exists(path):
            raise FileExistsError(uri)
        storage.write_bytes_atomic(uri, self._record(), self.options)
        time.sleep(self.settle_s)
        if self._read(uri).get("run_id") != self.run_id:
            raise FileExistsError(uri)

    def _conditional(self) -> bool:
        """Whether the store honours create-if-absent, probed once per store and process."""
        if self.conditional is not None:
            return self.conditional
        if storage.protocol(self.dir) == "file":
            return True
        key = (storage.protocol(self.dir), json.dumps(self.options, sort_keys=True, default=str))
        if key not in _probed:
            probe = storage.join(self.dir, f".probe-{uuid.uuid4().hex}")
            try:
                storage.create_if_absent(probe, b"", self.options)
                try:
                    storage.create_if_absent(probe, b"", self.options)
                    _probed[key] = False  # the second create overwrote: the header is ignored
                except FileExistsError:
                    _probed[key] = True
            except (NotImplementedError, OSError):
                _probed[key] = False
            finally:
                fs, path = storage.filesystem(probe, self.options)
                try:
                    fs.rm_file(path)
                except OSError:
                    pass
        return _probed[key]

    def _remove_older(self) -> None:
        """Records before this run's are history; removing them is housekeeping only."""
        for number in self._numbers():
            if number >= self.number:
                break
            fs, path = storage.filesystem(self._uri(number), self.options)
            try:
                fs.rm_file(path)
            except OSError:
                pass

    def _taken_over(self) -> bool:
        numbers = self._numbers()
        return bool(numbers) and numbers[-1] > self.number

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                if self._taken_over():
                    self.lost = True  # this run stalled past its lease and another took it
                    return
                storage.write_bytes_atomic(self._uri(self.number), self._record(), self.options)
            except Exception:  # a storage hiccup: the next renewal tries again
                continue

    def release(self) -> None:
        """Mark this run's record released (unless another run has taken the lease over)."""
        self._stop.set()
        if self._renewer:
            self._renewer.join(timeout=10)
        if self.number is None or self.lost or self._taken_over():
            return
        uri = self._uri(self.number)
        try:
            storage.write_bytes_atomic(uri, self._record(released=True), self.options)
        except OSError as e:
            if not storage.is_output_wide(e):
                raise
            # A full disk has no room for the released record (it is written beside, then
            # renamed): removing this run's own record frees the output all the same, and the
            # next run takes its number again.
            fs, path = storage.filesystem(uri, self.options)
            fs.rm_file(path)
        self.number = None
