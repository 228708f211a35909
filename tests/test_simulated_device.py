"""The simulated device the benchmark measures overlap with: its timing, that it holds no GIL,
and the job's rows under it."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs import restore
from pipeline import imaging
from pipeline.inference import InferenceSettings
from pipeline.restore.blocks import WORK_SCHEMA, to_table
from pipeline.restore.simulated_device import (
    LOG_ENV,
    REFERENCE_PIXELS,
    SimulatedDevice,
    busy_fraction,
    read_host_time,
    read_intervals,
    steady_window,
)
from pipeline.restore.stages import RestoreActor

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


def test_a_fence_waits_for_the_work_launched_before_it_and_lets_others_run():
    device = SimulatedDevice(rate=10.0)
    device.launch(REFERENCE_PIXELS)  # 0.1 s
    fence = device.fence()
    device.launch(REFERENCE_PIXELS)  # queued after the fence: not waited for
    ticks = []

    async def tick():
        for _ in range(5):
            ticks.append(time.time())
            await asyncio.sleep(0.01)

    async def main():
        started = time.time()
        await asyncio.gather(fence.reached(), tick())
        return time.time() - started

    waited = asyncio.run(main())
    assert 0.09 <= waited < 0.15
    assert len(ticks) == 5 and ticks[-1] < ticks[0] + 0.09  # the loop ran others meanwhile


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


def _block(first_row: int, sizes: list[tuple[int, int]]) -> pa.Table:
    rng = np.random.default_rng(first_row)
    rows = []
    for i, (w, h) in enumerate(sizes, start=first_row):
        thumb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        rows.append({"row": i, "id": f"i{i}", "source_uri": f"x/{i}", "status": "ok",
                     "in_height": h, "in_width": w, "out_height": 2 * h, "out_width": 2 * w,
                     "depth": 8, "pixels": thumb.tobytes()})
    return to_table(rows, WORK_SCHEMA)


def test_blocks_in_flight_together_come_back_complete_and_overlap_the_device(tmp_path,
                                                                              monkeypatch):
    """Three calls at once, as Ray Data makes them: each block comes back whole, in its own
    order, with the bicubic images; and the device never waits for the host between them (each
    block's work was queued before the one ahead of it ended)."""
    monkeypatch.setenv(LOG_ENV, str(tmp_path))
    actor = RestoreActor("mimo-unet", None, None, "cpu",
                         # ~0.4 s a block: far more than a block's host work, even on a
                         # machine busy with other tests (at 0.1 s a gap appeared once)
                         InferenceSettings(simulated_rate=0.5), {})
    blocks = [_block(10 * b, [(40, 30), (20, 24), (40, 30)]) for b in range(3)]

    async def together():
        return await asyncio.gather(*(actor(block) for block in blocks))

    outs = asyncio.run(together())
    for block, out in zip(blocks, outs):
        rows = out.to_pylist()
        assert [r["id"] for r in rows] == block["id"].to_pylist()
        assert all(r["status"] == "ok" for r in rows)
        for row, thumb in zip(rows, block.to_pylist()):
            small = np.frombuffer(thumb["pixels"], np.uint8).reshape(
                thumb["in_height"], thumb["in_width"], 3)
            big = np.frombuffer(row["pixels"], np.uint8).reshape(small.shape[0] * 2,
                                                                 small.shape[1] * 2, 3)
            assert (big == imaging.upscale2x(small)).all()
            assert row["lapvar_out"] == pytest.approx(row["lapvar_in"])
    intervals = read_intervals(tmp_path)
    assert len(intervals) == 3
    for (_, end), (start, _) in zip(intervals, intervals[1:]):
        assert start == pytest.approx(end, abs=1e-6)  # queued behind it: no gap
    seconds, images = read_host_time(tmp_path)
    assert images == 9 and 0 < seconds < sum(e - s for s, e in intervals)


def test_one_call_at_a_time_leaves_the_device_waiting_for_the_host(tmp_path, monkeypatch):
    """The control for the test above: the same blocks one after another leave gaps."""
    monkeypatch.setenv(LOG_ENV, str(tmp_path))
    actor = RestoreActor("mimo-unet", None, None, "cpu",
                         InferenceSettings(simulated_rate=2.0), {})
    for b in range(3):
        actor.restore_block(_block(10 * b, [(40, 30), (20, 24), (40, 30)]))
    intervals = read_intervals(tmp_path)
    assert all(start > end for (_, end), (start, _) in zip(intervals, intervals[1:]))
