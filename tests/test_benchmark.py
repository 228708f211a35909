"""The benchmark's own arithmetic: what the GPU runs of it report must be right the first time."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from jobs import benchmark
from pipeline.models import build_model


def test_steady_rate_is_the_middle_of_the_run(tmp_path):
    # 10 rows a second for 100 rows, after a 30 s start-up and before a slow tail.
    start = datetime(2026, 11, 27, tzinfo=timezone.utc)
    times = [start + timedelta(seconds=30 + i / 10) for i in range(100)]
    times[-1] += timedelta(seconds=20)
    (tmp_path / "metrics").mkdir()
    pq.write_table(pa.table({"finished_at": times}), tmp_path / "metrics" / "part.parquet")
    first, last, rate = benchmark._steady_rate(tmp_path)
    assert rate == pytest.approx(10, rel=0.02)
    assert first == pytest.approx(times[10].timestamp())


def test_gpu_busy_averages_the_samples_inside_the_window():
    busy = benchmark.GpuBusy(torch.device("cpu"))
    with busy:  # nothing sampled on a CPU
        pass
    assert busy.mean(0, 1e12) is None
    busy.samples = [(1.0, 0), (2.0, 90), (3.0, 100), (4.0, 0)]
    assert busy.mean(2.0, 3.0) == pytest.approx(0.95)


def test_where_time_goes_names_the_convolutions():
    ops = benchmark.where_time_goes(build_model("mimo-unet"), torch.device("cpu"), 32, 48, 1)
    assert "convolution" in ops[0]["op"]
    assert 0 < sum(o["share"] for o in ops) <= 1.0 + 1e-9
    assert all(o["ms_per_pass"] >= 0 for o in ops)


def test_thumbnails_of_one_size_or_mixed(tmp_path):
    benchmark.make_thumbnails(tmp_path / "a", 5, (24, 16))
    sizes = {Image.open(p).size for p in (tmp_path / "a").iterdir()}
    assert sizes == {(24, 16)}
    benchmark.make_thumbnails(tmp_path / "b", 6, None)
    sides = [max(Image.open(p).size) for p in (tmp_path / "b").iterdir()]
    assert len(sides) == 6 and all(100 <= s <= 260 for s in sides) and len(set(sides)) > 1


def test_a_run_stopped_early_still_renders(tmp_path):
    bare = {"variant": "eager", "precision": "fp32", "batch": 1, "images_per_s": 2.0,
            "x_baseline": 1.0, "tflops": 0.6}
    result = {"hardware": "x", "torch": "2", "threads": 2, "date": "2026-11-27",
              "size": "480x320", "gflop_per_image": 299.0, "bare_model": [bare],
              "whole_job": {"images": 8, "thumbnail_size": "240x160",
                            "simple_loop_images_per_s": 1.0,
                            "local": {"wall_s": 8.0, "images_per_s": 1.0,
                                      "steady_images_per_s": 1.5, "x_simple_loop": 1.0,
                                      "gpu_busy_steady": None, "x_best_bare_model": None}},
              "where_time_goes": [{"op": "aten::conv", "ms_per_pass": 3.0, "share": 0.75}]}
    (tmp_path / "bench.json").write_text(json.dumps(result))
    text = benchmark.render(result)
    assert "| eager | fp32 | 1 | 2.00 |" in text
    assert "| local | 1.00 | 8.0 | 1.00 | 1.50 | - | - | - |" in text
    assert "| `aten::conv` | 3.00 | 75.0% |" in text
    assert benchmark.main(["--render", str(tmp_path / "bench.json")]) == 0


def test_the_whole_job_runs_compiled_only_where_it_pays():
    plain = [(e, e, None) for e in benchmark.engines()]
    assert benchmark.job_variants("cpu", "default") == plain  # compiles per shape: a CPU's run
    assert benchmark.job_variants("cuda", None) == plain
    on_gpu = benchmark.job_variants("cuda", benchmark._job_compile_mode("max-autotune"))
    assert on_gpu == plain  # every actor would pay the search: the bare model measures it
    if "ray" in benchmark.engines():
        assert benchmark.job_variants("cuda", "default")[-1] == (
            "ray, compile default", "ray", "default")
