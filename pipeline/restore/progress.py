"""What the restore job shows on the console: one progress line instead of Ray's log stream."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
import time

# Lines Ray prints straight to the driver's stderr from C++ that say nothing to a user of this
# job. Ray Data's actor pools trigger this one on every start, whatever the job does
# (ray-project/ray#57733); the restarts it warns about are not relied on for correctness here:
# rows of a block lost with its actor are redone by the job (run.run_restore).
KNOWN_NOISE = (
    re.compile(rb"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in "
               rb"the object store and max_restarts > 0"),
)


def quiet_ray(verbose: bool = False) -> dict:
    """Keep Ray Data's progress bars, execution dumps and INFO lines off a clean run's console
    (``verbose`` leaves them on, and the dashboard). Returns the keyword arguments for
    ``ray.init``."""
    if verbose:
        return {}
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    # A local Ray started here skips the dashboard (seconds of start-up and a few processes);
    # --verbose keeps it. Connecting to a running cluster ignores this.
    return {"logging_level": logging.ERROR, "include_dashboard": False}


class Progress:
    """Rows done of the total, images/s and the time left, as one line.

    On a terminal the line is redrawn in place; elsewhere (a log file, ``ray job logs``) a new
    line is written every ``interval_s`` seconds, and the last one when the pass ends.
    """

    def __init__(self, total: int, stream=None, interval_s: float = 10.0):
        self.total, self.done = total, 0
        self.stream = stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.interval_s = interval_s
        self.started = self.shown = time.time()
        self.shown_done = 0

    def advance(self, rows: int) -> None:
        self.done += rows
        now = time.time()
        if self.tty:
            print("\r" + self.line(now), end="", file=self.stream, flush=True)
        elif now - self.shown >= self.interval_s:
            print(self.line(now), file=self.stream, flush=True)
            self.shown, self.shown_done = now, self.done

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.time()) - self.started, 1e-9)
        rate = self.done / elapsed
        left = (self.total - self.done) / rate if rate else float("inf")
        eta = "?" if left == float("inf") else time.strftime("%H:%M:%S", time.gmtime(left))
        return f"{self.done}/{self.total} rows, {rate:.2f} images/s, {eta} left"

    def close(self) -> None:
        if self.tty:
            print(file=self.stream, flush=True)
        elif self.done != self.shown_done:
            print(self.line(), file=self.stream, flush=True)
            self.shown_done = self.done


@contextlib.contextmanager
def without_known_noise(patterns=KNOWN_NOISE):
    """Drop :data:`KNOWN_NOISE` lines from what this process writes to file descriptor 2 (where
    Ray's C++ logging writes, below Python's reach) while the block runs; everything else
    passes through as it comes, a line redrawn with carriage returns included."""
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to filter
        yield
        return
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def write(data: bytes) -> None:
        try:
            os.write(saved, data)
        except OSError:  # the reader went away (`| head`): keep draining, never block writers
            pass

    def forward() -> None:
        pending = b""
        while chunk := os.read(read_end, 65536):
            pending += chunk
            *lines, pending = re.split(rb"(?<=[\r\n])", pending)
            keep = b"".join(line for line in lines
                            if not any(p.search(line) for p in patterns))
            if keep:
                write(keep)
        if pending:
            write(pending)

    thread = threading.Thread(target=forward, name="stderr-filter", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's last write end: the reader sees EOF and drains
        thread.join(timeout=5)
        os.close(read_end)
        os.close(saved)
