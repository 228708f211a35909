"""A simulated device for measuring the job's overlap without a GPU (``python -m jobs.benchmark
--simulated-device RATE``).

A GPU's defining property for the pipeline is that it works while the host does other things.
This device does the same honestly on a CPU: work launched on it runs, one launch after
another, for as long as a device restoring ``rate`` 480x320-equivalent images/s would take for
its pixels, while the host goes on; the host sleeps (no CPU, no GIL) only when it waits for a
result it needs. It restores nothing: the 2x bicubic images come back as the restored ones.
Its busy intervals, in epoch seconds, are appended to ``{log_dir}/{pid}.txt`` for the benchmark.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

REFERENCE_PIXELS = 480 * 320
LOG_ENV = "MIMO_SIMULATED_DEVICE_LOG"  # the folder the benchmark reads the intervals from


class SimulatedDevice:
    def __init__(self, rate: float, log_dir: str | None = None):
        self.seconds_per_pixel = 1.0 / (rate * REFERENCE_PIXELS)
        self.free_at = 0.0
        self.intervals: list[tuple[float, float]] = []
        self.lock = threading.Lock()
        self.log = Path(log_dir) / f"{os.getpid()}.txt" if log_dir else None

    def launch(self, pixels: int) -> float:
        """Queue work of ``pixels`` (after what is queued already); returns when it ends."""
        with self.lock:
            start = max(time.time(), self.free_at)
            self.free_at = end = start + pixels * self.seconds_per_pixel
            self.intervals.append((start, end))
        if self.log:
            with self.log.open("a") as f:
                f.write(f"{start:.6f} {end:.6f}\n")
        return end

    @staticmethod
    def wait(end: float) -> None:
        """Block until the work ending at ``end`` is done, holding neither a core nor the GIL."""
        delay = end - time.time()
        if delay > 0:
            time.sleep(delay)

    def restore_stacks(self, stacks: Sequence) -> list:
        """The restorer's call: launch the stacks' work, wait for it (the host needs the
        results next), and hand the images back unchanged."""
        self.wait(self.launch(sum(int(s.shape[0] * s.shape[1] * s.shape[2]) for s in stacks)))
        return list(stacks)


def read_intervals(log_dir: Path) -> list[tuple[float, float]]:
    return [tuple(map(float, line.split())) for f in sorted(log_dir.glob("*.txt"))
            for line in f.read_text().splitlines() if line.strip()]


def steady_window(intervals: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """The device's steady state: from its launch at the 10th percentile to its launch at the
    90th (start-up and the last blocks' drain left out)."""
    starts = sorted(start for start, _ in intervals)
    return starts[int(0.1 * len(starts))], starts[max(0, int(0.9 * len(starts)) - 1)]


def busy_fraction(intervals: Sequence[tuple[float, float]], first: float, last: float) -> float:
    """The share of [first, last] during which any of ``intervals`` ran (their union)."""
    covered, reach = 0.0, first
    for start, end in sorted(intervals):
        start, end = max(start, reach), min(end, last)
        if end > start:
            covered += end - start
            reach = end
    return covered / max(last - first, 1e-9)
