"""A simulated device for measuring the job's overlap without a GPU (``python -m jobs.benchmark
--simulated-device RATE``).

A GPU's defining property for the pipeline is that it works while the host does other things.
This device does the same honestly on a CPU: work launched on it runs, one launch after
another, for as long as a device restoring ``rate`` 480x320-equivalent images/s would take for
its pixels, while the host goes on; the host sleeps (no CPU, no GIL) only when it waits for a
result it needs, at a fence, as it waits for a GPU's. It restores nothing: the 2x bicubic images
come back as the restored ones. Its busy intervals, in epoch seconds, are appended to
``{log_dir}/{pid}.txt`` for the benchmark, and the actor's host time around it to
``{log_dir}/{pid}.host``.
"""

from __future__ import annotations

import asyncio
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
        self.host_log = Path(log_dir) / f"{os.getpid()}.host" if log_dir else None

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
        """The restorer's call: launch the stacks' work and hand the images back unchanged, at
        once, as a GPU's queue takes work (the host waits at a :meth:`fence`)."""
        self.launch(sum(int(s.shape[0] * s.shape[1] * s.shape[2]) for s in stacks))
        return list(stacks)

    def fence(self) -> SimulatedFence:
        """How far the work launched so far goes (as :class:`pipeline.device_ops.Fence`)."""
        with self.lock:
            return SimulatedFence(self.free_at)

    def log_host(self, seconds: float, images: int) -> None:
        """The actor's host time for ``images`` images, outside its waits for the device."""
        if self.host_log:
            with self.host_log.open("a") as f:
                f.write(f"{seconds:.6f} {images}\n")


class SimulatedFence:
    def __init__(self, end: float):
        self.end = end

    async def reached(self) -> None:
        delay = self.end - time.time()
        if delay > 0:
            await asyncio.sleep(delay)


def read_intervals(log_dir: Path) -> list[tuple[float, float]]:
    return [tuple(map(float, line.split())) for f in sorted(log_dir.glob("*.txt"))
            for line in f.read_text().splitlines() if line.strip()]


def read_host_time(log_dir: Path) -> tuple[float, int]:
    """The actors' host seconds around the device and the images they were spent on."""
    lines = [line.split() for f in sorted(log_dir.glob("*.host"))
             for line in f.read_text().splitlines() if line.strip()]
    return sum(float(s) for s, _ in lines), sum(int(n) for _, n in lines)


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
