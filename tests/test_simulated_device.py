"""The simulated device the benchmark measures overlap with: its timing, that it holds no GIL,
and the job's rows under it."""

from __future__ import annotations

import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs import restore
from pipeline import imaging
from pipeline.restore.simulated_device import (
    LOG_ENV,
    REFERENCE_PIXELS,
    SimulatedDevice,
    busy_fraction,
    read_intervals,
    steady_window,
)

from .conftest import make_image


def test_its_busy_intervals_add_up_to_the_work_it_was_given():
    device = SimulatedDevice(rate=100.0)  # 10 ms per 480x320-equivalent image
    ends = [device.launch(REFERENCE_PIXELS * k) for k in (1, 2, 3)]  # 10 + 20 + 30 ms, queued
    device.wait(ends[-1])
    assert time.time() >= ends[-1]
    durations = [end - start for start, end in device.intervals]
    assert durations == pytest.approx([0.01, 0.02, 0.03], abs=1e-6)
    for (_, end), (start, _) in zip(device.intervals, device.intervals[1:]):
        assert start == pytest.approx(end, abs=1e-6)  # one launch after another, no overlap
    first, last = device.intervals[0][0], device.intervals[-1][1]
    assert busy_fraction(device.intervals, first, last) == pytest.approx(1.0)
    assert busy_fraction(device.intervals, first, last + (last - first)) == pytest.approx(0.5)


def test_waiting_holds_no_gil():
    device = SimulatedDevice(rate=1.0)
    end = device.launch(REFERENCE_PIXELS // 4)  # 0.25 s
    counted = [0]
    stop = threading.Event()

    def count():
        while not stop.is_set():
            counted[0] += 1

    thread = threading.Thread(target=count)
    thread.start()
    started = time.process_time()
    device.wait(end)
    cpu = time.process_time() - started
    stop.set()
    thread.join()
    assert counted[0] > 100_000  # the Python thread ran all along
    # The process's CPU time is the counting thread's: the waiting one used none of its own.
    assert cpu < 0.25 * 1.5


def test_steady_window_leaves_out_start_and_drain():
    intervals = [(float(i), i + 0.5) for i in range(100)]
    assert steady_window(intervals) == (10.0, 89.0)


def test_the_job_under_simulation_gives_every_row_and_the_bicubic_images(tmp_path, monkeypatch):
    inputs = tmp_path / "in"
    sources = [make_image(inputs / f"{i}.png", (24 + 4 * (i % 3), 20), seed=i) for i in range(7)]
    log = tmp_path / "device"
    log.mkdir()
    monkeypatch.setenv(LOG_ENV, str(log))
    config = tmp_path / "job.yaml"
    config.write_text(f"input: {{manifest: '{inputs}', rows_per_block: 3}}\n"
                      f"output: {{uri: '{tmp_path / 'out'}'}}\n"
                      "inference: {simulated_rate: 50}\n")
    assert restore.main(["--config", str(config), "--engine", "local", "--device", "cpu"]) == 0
    rows = pq.read_table(tmp_path / "out" / "metrics").to_pylist()
    assert sorted(r["id"] for r in rows) == [str(i) for i in range(7)]
    assert all(r["status"] == "ok" for r in rows)
    for source in sources:
        written = np.asarray(Image.open(tmp_path / "out" / "images" / f"{source.stem}.png"))
        bicubic = imaging.upscale2x(imaging.decode(source.read_bytes()))
        assert (written == bicubic).all()
    intervals = read_intervals(log)
    pixels = sum(4 * Image.open(s).size[0] * Image.open(s).size[1] for s in sources)
    work = sum(end - start for start, end in intervals)
    assert work == pytest.approx(pixels / (50 * REFERENCE_PIXELS), rel=1e-3)


def test_the_benchmark_ends_with_the_busy_line():
    from pipeline.restore.benchmark import render
    text = render({"simulated_job": {
        "rate": 300.0, "images": 600, "thumbnail_size": "120x80", "wall_s": 70.0,
        "steady_images_per_s": 60.0, "device_busy_steady": 0.031, "device_work_s": 0.5,
        "actor_ms_per_image_outside_device": 5.1}})
    assert text.splitlines()[-1] == ("device busy: 3% of the steady window (simulated device "
                                     "at 300 images/s)")
