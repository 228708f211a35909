"""The benchmark's own arithmetic: what the GPU runs of it report must be right the first time."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from jobs import benchmark as benchmark_job
from pipeline.models import build_model
from pipeline.restore import benchmark


def test_steady_rate_is_the_middle_of_the_run(tmp_path):
    # 10 rows a second for 100 rows, after a 30 s start-up and before a slow tail.
    start = datetime(2026, 11, 27, tzinfo=timezone.utc)
    times = [start + timedelta(seconds=30 + i / 10) for i in range(100)]
    times[-1] += timedelta(seconds=20)
    # Each row's share of its block's device work: 60 ms in steady state, 9 s for the first
    # rows (a compile), missing for a row that failed.
    restore = [9.0] * 5 + [0.06] * 94 + [None]
    (tmp_path / "metrics").mkdir()
    pq.write_table(pa.table({"finished_at": times, "restore_s": restore,
                             "status": ["ok"] * 99 + ["error"]}),
                   tmp_path / "metrics" / "part.parquet")
    first, last, rate, device_ms = benchmark._steady_state(tmp_path)
    assert rate == pytest.approx(10, rel=0.02)
    assert first == pytest.approx(times[10].timestamp())
    assert device_ms == pytest.approx(60)


def test_gpu_busy_averages_the_samples_inside_the_window():
    busy = benchmark.GpuBusy(torch.device("cpu"))
    with busy:  # nothing sampled on a CPU
        pass
    assert busy.mean(0, 1e12) is None
    busy.samples = [(1.0, 0), (2.0, 90), (3.0, 100), (4.0, 0)]
    assert busy.mean(2.0, 3.0) == pytest.approx(0.95)


def test_where_time_goes_names_the_convolutions():
    model = build_model("mimo-unet").eval()
    x = torch.rand(1, 3, 32, 48)

    @torch.inference_mode()
    def step():
        model(x)
        return 1
    goes = benchmark.where_time_goes(step, torch.device("cpu"), top=5)
    # mkldnn_convolution, or _slow_conv2d_forward where oneDNN declines (under load, say)
    assert "conv" in goes["top"][0]["op"]
    assert goes["top"][0]["kind"] == "convolution, matmul"
    assert len(goes["top"]) == 5 and all(o["ms_per_pass"] > 0 for o in goes["top"])
    assert sum(goes["kinds_ms"].values()) == pytest.approx(goes["ms_per_pass"])
    assert max(goes["kinds_ms"], key=goes["kinds_ms"].get) == "convolution, matmul"


def test_kernels_are_told_apart_by_name():
    # Names as an H100's profile of the eager and the compiled model gave them.
    assert benchmark.kernel_kind("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_"
                                 "nhwc_tilesize256x64x32") == "convolution, matmul"
    assert benchmark.kernel_kind("triton_poi_fused_add_convolution_relu_2") == \
        "fused by the compiler"
    assert benchmark.kernel_kind("triton_convolution2d_464") == "convolution, matmul"
    assert benchmark.kernel_kind("void at::native::vectorized_elementwise_kernel<8, "
                                 "at::native::CUDAFunctor_add<c10::BFloat16>>") == \
        "element-wise, resize, concatenation"
    assert benchmark.kernel_kind("Memcpy HtoD (Pinned -> Device)") == \
        "element-wise, resize, concatenation"
    assert benchmark.kernel_kind("aten::resize_") == "other"


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
                                      "gpu_busy_steady": None, "x_best_bare_model": None}}}
    bare["time_goes"] = {"ms_per_pass": 400.0, "kinds_ms": {"convolution, matmul": 300.0,
                                                            "other": 100.0},
                         "top": [{"op": "aten::conv", "kind": "convolution, matmul",
                                  "ms_per_pass": 300.0, "share": 0.75}]}
    (tmp_path / "bench.json").write_text(json.dumps(result))
    text = benchmark.render(result)
    assert "| eager | fp32 | 1 | 2.00 |" in text
    assert "| local | 1.00 | 8.0 | 1.00 | 1.50 | - | - | - | - | - |" in text
    # 2 images/s at batch 1: a pass is 500 ms, of which kernels ran 400
    assert "| convolution, matmul | 300.00 | 60.0% |" in text
    assert "| no kernel running (launch gaps, host) | 100.00 | 20.0% |" in text
    assert "| `aten::conv` | convolution, matmul | 300.00 | 75.0% |" in text
    assert benchmark_job.main(["--render", str(tmp_path / "bench.json")]) == 0


def test_the_whole_job_runs_compiled_only_where_it_pays():
    plain = [(e, e, None) for e in benchmark.engines()]
    assert benchmark.job_variants("cpu", "default") == plain  # compiles per shape: a CPU's run
    assert benchmark.job_variants("cuda", None) == plain
    on_gpu = benchmark.job_variants("cuda", benchmark._job_compile_mode("max-autotune"))
    assert on_gpu == plain  # every actor would pay the search: the bare model measures it
    if "ray" in benchmark.engines():
        assert benchmark.job_variants("cuda", "default")[-1] == (
            "ray, compile default", "ray", "default")


def test_planning_benchmark_plans_half_done_inputs_in_fresh_processes(tmp_path):
    from pipeline.restore.plan_benchmark import run_sizes

    seen = []
    results = run_sizes([2000], tmp_path, seen.append)
    assert [r["process"] for r in results] == ["dry run (Arrow only)", "driver (with Ray, torch)"]
    assert all(r["rows"] == 2000 and r["to_do"] == 1000 for r in results) and seen == results
    # the driver's imports weigh more than Arrow's alone: each ran in its own process
    assert results[1]["imports_gb"] > results[0]["imports_gb"]
