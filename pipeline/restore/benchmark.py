"""Throughput figures, each measured side by side in one run on this machine (the measuring
code of ``python -m jobs.benchmark``, whose docstring lists the figures)."""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from pipeline import colour, device_ops, imaging
from pipeline.inference import (
    DTYPES,
    InferenceSettings,
    Restorer,
    from_model_output,
    resolve_device,
    resolve_precision,
    to_model_input,
)
from pipeline.models import build_model
from pipeline.restore.simulated_device import (
    LOG_ENV,
    REFERENCE_PIXELS,
    busy_fraction,
    read_host_time,
    read_intervals,
    steady_window,
)

CHECKPOINT = "checkpoints/mimo-unet-thumb-x2.pt"
# Dense bf16 tensor-core peaks from the vendors' datasheets (TFLOP/s), by device-name fragment.
DENSE_BF16_PEAK = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10G": 70.0}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _rate(fn: Callable[[], int], device: torch.device, seconds: float) -> float:
    """Items per second of ``fn`` (which returns how many it did), after one warm-up call."""
    fn()
    _sync(device)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        done += fn()
    _sync(device)
    return done / (time.perf_counter() - started)


def model_flops(model: torch.nn.Module, h: int, w: int) -> float:
    """Floating-point operations of one forward pass on an ``h x w`` image."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(torch.zeros(1, 3, h, w))
    return float(counter.get_total_flops())


def bare_model(model: torch.nn.Module, device: torch.device, h: int, w: int,
               batches: list[int], seconds: float, compile_mode: str | None,
               profile: bool = False) -> list[dict]:
    """The network alone on random inputs already on the device. With ``profile``, the eager
    and compiled rows at the largest batch also say where their time goes
    (:func:`where_time_goes`)."""
    precision = resolve_precision("auto", device)
    rows = []

    def measure(net, label, dtype_name, batch, channels_last, profiled=False):
        x = torch.rand(batch, 3, h, w, device=device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)

        @torch.inference_mode()
        def step():
            net(x)
            return batch
        rows.append({"variant": label, "precision": dtype_name, "batch": batch,
                     "images_per_s": _rate(step, device, seconds)})
        if profiled:
            rows[-1]["time_goes"] = where_time_goes(step, device)

    fp32 = copy.deepcopy(model).to(device).eval()
    measure(fp32, "eager", "fp32", 1, False)  # the baseline
    fast = fp32.to(dtype=DTYPES[precision], memory_format=torch.channels_last)
    for batch in batches:
        measure(fast, "eager, channels_last", precision, batch, True,
                profile and batch == batches[-1])
    if device.type == "cuda":
        # cuDNN's own search for the fastest algorithm of each convolution shape: off in the
        # job, where mixed thumbnails make many shapes, each searched once.
        torch.backends.cudnn.benchmark = True
        measure(fast, "eager, channels_last, cudnn.benchmark", precision, batches[-1], True)
    if compile_mode:
        try:
            measure(torch.compile(fast, mode=compile_mode),
                    f"torch.compile {compile_mode}, channels_last", precision, batches[-1], True,
                    profile)
        except Exception as e:  # a compiler missing on this machine must not lose the rest
            print(f"torch.compile not measured: {e.__class__.__name__}: {e}", file=sys.stderr)
    torch.backends.cudnn.benchmark = False
    return rows


# What each device kernel (or, on a CPU, operator) is, by a fragment of its lower-cased name;
# the first kind whose fragment matches wins.
KERNEL_KINDS = (
    # Before convolutions: inductor names a fused kernel after what it fuses ("..._convolution_
    # relu_3" adds a convolution's bias and applies the ReLU).
    ("fused by the compiler", ("triton_poi", "triton_red", "triton_per")),
    ("convolution, matmul", ("conv", "xmma", "gemm", "cutlass", "triton_mm", "triton_tem",
                             "fprop", "dgrad", "mkldnn", "addmm")),
    ("element-wise, resize, concatenation", ("elementwise", "vectorized", "upsample", "cat",
                                             "copy", "memcpy", "memset", "clamp", "relu", "add",
                                             "mul", "fill")),
)
# CUPTI's own records, which carry device time but are no kernel: "Command Buffer Full" means
# the host waited for the GPU to drain its launch queue.
PROFILER_RECORDS = ("Command Buffer Full", "Buffer Flush", "Activity Buffer Request")


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, fragments in KERNEL_KINDS
                 if any(f in lowered for f in fragments)), "other")


def where_time_goes(step: Callable[[], int], device: torch.device, passes: int = 3,
                    top: int = 8) -> dict:
    """Where one pass of ``step`` spends the device's time (torch.profiler, ``passes`` passes
    after a warm-up): on a GPU the kernels, on a CPU the operators' own time. Gives the total per
    pass, the time of each kind of work (:data:`KERNEL_KINDS`) and the ``top`` kernels."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    gpu = device.type == "cuda"
    step()
    _sync(device)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
                 ) as prof:
        for _ in range(passes):
            step()
        _sync(device)
    if gpu:
        events = [(e.key, e.self_device_time_total) for e in prof.key_averages()
                  if e.device_type == DeviceType.CUDA and e.key not in PROFILER_RECORDS]
    else:  # operators' own time: a parent's excludes its children's, so nothing counts twice
        events = [(e.key, e.self_cpu_time_total) for e in prof.key_averages()]
    events = [(name, t / 1000 / passes) for name, t in events if t > 0]
    total = sum(t for _, t in events) or 1e-9
    kinds: dict[str, float] = {}
    for name, t in events:
        kind = kernel_kind(name)
        kinds[kind] = kinds.get(kind, 0.0) + t
    events.sort(key=lambda e: -e[1])
    return {"ms_per_pass": total, "kinds_ms": dict(sorted(kinds.items(), key=lambda k: -k[1])),
            "top": [{"op": name, "kind": kernel_kind(name), "ms_per_pass": t,
                     "share": t / total} for name, t in events[:top]]}


def restorer_stream(model: torch.nn.Module, device: torch.device, h: int, w: int, batch: int,
                    count: int, seconds: float) -> dict:
    """The actor's restorer (uint8 in and out, host to device and back) over ``count`` images of
    ``h x w``, and over as many of mixed sizes (2x thumbnails of 100-260 px a side)."""
    rng = np.random.default_rng(0)
    sides = 2 * rng.integers(100, 261, (count, 2))
    mixed = [rng.integers(0, 256, (a, b, 3), dtype=np.uint8) for a, b in sides]
    same = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(count)]
    restorer = Restorer(model, device, InferenceSettings(batch_size=batch, tile=max(h, w, 520)))
    return {"batch_size": batch, "images": count, "precision": restorer.precision,
            "uniform_images_per_s": _rate(lambda: len(restorer.restore(same)), device, seconds),
            "mixed_images_per_s": _rate(lambda: len(restorer.restore(mixed)), device, seconds),
            "mixed_mean_pixels": float(np.mean(sides[:, 0] * sides[:, 1]))}


def _sample_thumbnail(h: int, w: int) -> np.ndarray:
    """A bundled sample photograph as the thumbnail of an ``h x w`` model input."""
    return np.asarray(Image.open(sorted(Path("samples/thumbnails").glob("*.jpg"))[0])
                      .convert("RGB").resize((w // 2, h // 2)))


def cpu_stages(h: int, w: int, repeats: int = 20) -> dict:
    """CPU milliseconds per image for each stage outside the model (one thread)."""
    rng = np.random.default_rng(1)
    photo = _sample_thumbnail(h, w)
    thumb = io.BytesIO()
    Image.fromarray(photo).save(thumb, "JPEG", quality=85)
    data = thumb.getvalue()
    big = imaging.upscale2x(photo)
    restored = np.clip(big.astype(int) + rng.integers(-3, 4, big.shape), 0, 255).astype(np.uint8)
    # What the CPU tasks do per image; the upscale and the sharpness measures run on the
    # actor's device (see actor_stages).
    stages = {
        "decode (JPEG thumbnail)": lambda: imaging.decode(data),
        "encode PNG (level 1, the default)": lambda: imaging.encode(restored, "png"),
    }
    return _time_each(stages, repeats)


def faithful_cost(h: int, w: int, rounds: int = 30, repeats: int = 10) -> dict:
    """CPU milliseconds per image of the CPU stages' per-image work on the common input (an
    untagged 8-bit JPEG thumbnail without alpha or metadata), the faithful path against the
    bare one the 2026-12-04 release ran (Pillow decode, upright, RGB; a plain PNG), alternated
    ``rounds`` times so that both see the same machine; and the faithful path on a tagged,
    annotated input, for scale."""
    from pipeline.restore.stages import StageContext, carried

    photo = _sample_thumbnail(h, w)
    rng = np.random.default_rng(1)
    big = imaging.upscale2x(photo)
    restored = np.clip(big.astype(int) + rng.integers(-3, 4, big.shape), 0, 255).astype(np.uint8)
    plain, tagged = io.BytesIO(), io.BytesIO()
    Image.fromarray(photo).save(plain, "JPEG", quality=85)
    exif = Image.Exif()
    exif[315], exif[33432] = "Ann Artist", "(c) 2019 City Archive"
    Image.fromarray(photo).save(tagged, "JPEG", quality=85, exif=exif,
                                icc_profile=colour.srgb_bytes())
    ctx = StageContext(output_uri="out", model="mimo-unet", checkpoint_sha256="0" * 64,
                       run_id="benchmark")

    def bare(data: bytes) -> bytes:
        img = Image.open(io.BytesIO(data))
        img.load()
        rgb = np.asarray(ImageOps.exif_transpose(img).convert("RGB"), dtype=np.uint8)
        assert rgb.shape[0] * 2 == restored.shape[0]
        return imaging.encode_png(restored)

    def faithful(data: bytes) -> bytes:
        image = imaging.read(data)
        row = carried(image, ctx, (2 * image.rgb.shape[1], 2 * image.rgb.shape[0]))
        return imaging.encode(restored, "png", icc=row["icc"], blocks=row["blocks"])

    paths = {"bare (2026-12-04), plain JPEG": lambda: bare(plain.getvalue()),
             "faithful, plain JPEG": lambda: faithful(plain.getvalue()),
             "faithful, sRGB-tagged JPEG with EXIF": lambda: faithful(tagged.getvalue())}
    totals = dict.fromkeys(paths, 0.0)
    for fn in paths.values():
        fn()
    for _ in range(rounds):
        for name, fn in paths.items():
            started = time.perf_counter()
            for _ in range(repeats):
                fn()
            totals[name] += time.perf_counter() - started
    return {name: 1000 * total / (rounds * repeats) for name, total in totals.items()}


def actor_stages(h: int, w: int, device: torch.device, repeats: int = 20,
                 stack: int = 64) -> dict:
    """Milliseconds per image of the work the actor does around the model, on its device: the
    2x upscale and the two sharpness measures of the bicubic and the restored image, for one
    image alone and per image of a stack of ``stack`` (how the actor runs a block's images of
    one shape: on a GPU the cost of one image alone is mostly launching the operations)."""
    photo = _sample_thumbnail(h, w)
    [one, many] = device_ops.stacks_to_device([[photo], [photo] * stack], device)
    big_one, big_many = device_ops.upscale2x(one), device_ops.upscale2x(many)

    def sync(value=None):
        if device.type == "cuda":
            torch.cuda.synchronize()
        return value

    stages = {
        "upscale2x (bicubic, Pillow's), alone": lambda: sync(device_ops.upscale2x(one)),
        f"upscale2x, in a stack of {stack}": lambda: sync(device_ops.upscale2x(many)),
        "sharpness (2 measures x in/out), alone": lambda: device_ops.sharpness([big_one] * 2),
        f"sharpness, in a stack of {stack}": lambda: device_ops.sharpness([big_many] * 2),
    }
    times = _time_each(stages, repeats)
    return {name: ms / (stack if "stack of" in name else 1) for name, ms in times.items()}


def _time_each(stages: dict, repeats: int) -> dict:
    out = {}
    for name, fn in stages.items():
        fn()
        started = time.perf_counter()
        for _ in range(repeats):
            fn()
        out[name] = 1000 * (time.perf_counter() - started) / repeats
    return out


def png_levels(h: int, w: int, levels=(1, 6), repeats: int = 10) -> dict:
    """Encode milliseconds and bytes of a restored-looking photograph at each zlib level, with
    the project's PNG writer and, beside it, Pillow's."""
    photo = np.asarray(Image.open(sorted(Path("samples/thumbnails").glob("*.png"))[0])
                       .convert("RGB").resize((w, h), Image.BICUBIC))

    def pillow(level: int) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(photo).save(buf, "PNG", compress_level=level)
        return buf.getvalue()

    out = {}
    for label, encode in (("level ", lambda level: imaging.encode(photo, "png", png_level=level)),
                          ("Pillow level ", pillow)):
        for level in levels:
            started = time.perf_counter()
            for _ in range(repeats):
                data = encode(level)
            out[f"{label}{level}"] = {"ms": 1000 * (time.perf_counter() - started) / repeats,
                                      "bytes": len(data)}
    return out


def engines() -> list[str]:
    """The engines this machine can run: Ray's only where Ray is installed."""
    return ["local", "ray"] if importlib.util.find_spec("ray") else ["local"]


def make_thumbnails(folder: Path, count: int, size: tuple[int, int] | None) -> None:
    """``count`` JPEG q85 thumbnails of the bundled photographs: ``size`` (W x H) each, or of
    mixed sizes (100-260 px on the long side) when None."""
    photos = [Image.open(p).convert("RGB") for p in sorted(Path("samples/thumbnails").iterdir())]
    sides = np.random.default_rng(2).integers(100, 261, count)
    folder.mkdir(parents=True)

    def one(i: int) -> None:
        img = photos[i % len(photos)]
        if size:
            img = img.resize(size, Image.BICUBIC)
        else:
            img = img.copy()
            img.thumbnail((int(sides[i]), int(sides[i])))
        img.save(folder / f"t{i:06d}.jpg", quality=85)

    with ThreadPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(one, range(count)))


def job_variants(device: str, compile_mode: str | None) -> list[tuple[str, str, str | None]]:
    """(name, engine, compile mode) of each way the whole job is run: each engine as it comes;
    on a GPU, with --compile, Ray's also compiled (the bare model's best there; on a CPU the
    compiles per thumbnail shape would take the run)."""
    variants = [(engine, engine, None) for engine in engines()]
    if compile_mode and device == "cuda" and "ray" in engines():
        variants.append((f"ray, compile {compile_mode}", "ray", compile_mode))
    return variants


def whole_job(device: str, count: int, model: torch.nn.Module,
              size: tuple[int, int] | None = None, compile_mode: str | None = None,
              against: tuple[str, Path] | None = None) -> dict:
    """``python -m jobs.restore`` as a user runs it over ``count`` generated thumbnails, each
    way of :func:`job_variants`, and beside them the simplest fast loop a user could write over
    the same files. ``against``: (a revision, its source tree), whose job runs too, just before
    this one's in each way.

    Each run's rate is given over the whole process (start-up included) and in steady state:
    the middle 80% of its rows, by the time each was finished. On a GPU, how busy the GPU was
    in that steady window (nvidia-smi's utilisation: the share of time a kernel ran)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in"
        make_thumbnails(src, count, size)
        files = sorted(src.iterdir())
        loop = simple_loop(files[:LOOP_IMAGES], model, resolve_device(device))
        sizes = [Image.open(f).size for f in files]
        result = {"images": count, "thumbnail_size": "x".join(map(str, size)) if size else
                  "mixed 100-260 px", "simple_loop_images_per_s": loop,
                  "mean_output_pixels": float(np.mean([4 * w * h for w, h in sizes]))}
        runs = [(f"{name}, {rev}" if rev else name, engine, mode, code)
                for name, engine, mode in job_variants(resolve_device(device).type, compile_mode)
                for rev, code in ([against] if against else []) + [(None, None)]]
        for i, (name, engine, mode, code) in enumerate(runs):
            out = Path(tmp) / f"out-{i}"
            with GpuBusy(resolve_device(device)) as busy:
                wall = _restore_job(src, out, device, engine, mode, code=code)
            first, last, steady, device_ms = _steady_state(out)
            result[name] = {"wall_s": wall, "images_per_s": count / wall,
                            "steady_images_per_s": steady,
                            "x_simple_loop": count / wall / loop,
                            "gpu_busy_steady": busy.mean(first, last),
                            "device_work_ms_per_image": device_ms,
                            "device_work_share_steady": device_ms / 1000 * steady}
    return result


LOOP_IMAGES = 200  # the simple loop's rate settles well within this many


def _steady_state(out: Path) -> tuple[float, float, float, float]:
    """From a run's metrics: the window (epoch seconds) over which the middle 80% of rows were
    finished, their rate in it, and the median over those rows of their share of the actor's
    device work in ms (``restore_s``: its block's time from the copy to the device to the
    results on the host, over its rows). That share times the rate is the part of the window an
    actor spends on the device work: with one actor, the rest is host work and Ray between
    blocks."""
    import pyarrow.parquet as pq

    table = pq.read_table(out / "metrics", columns=["finished_at", "restore_s"])
    done = np.array([t.timestamp() for t in table["finished_at"].to_pylist()])
    restore = np.array(table["restore_s"].to_pylist(), dtype=float)
    ordered = np.sort(done)
    lo, hi = int(0.1 * len(ordered)), int(0.9 * len(ordered))
    first, last = float(ordered[lo]), float(ordered[max(lo, hi - 1)])
    inside = (done >= first) & (done <= last) & np.isfinite(restore)
    device_ms = 1000 * float(np.median(restore[inside])) if inside.any() else float("nan")
    return first, last, (hi - lo) / max(last - first, 1e-3), device_ms


class GpuBusy:
    """Samples the GPU's utilisation with nvidia-smi every 100 ms while a block runs (nothing
    on a CPU, or where nvidia-smi is missing)."""

    def __init__(self, device: torch.device):
        self.device, self.samples, self.proc = device, [], None

    def __enter__(self):
        if self.device.type == "cuda" and shutil.which("nvidia-smi"):
            index = self.device.index or 0
            self.proc = subprocess.Popen(
                ["nvidia-smi", f"--id={index}", "--query-gpu=utilization.gpu",
                 "--format=csv,noheader,nounits", "-lms", "100"],
                stdout=subprocess.PIPE, text=True)
            self.reader = threading.Thread(target=self._read, daemon=True)
            self.reader.start()
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.strip().isdigit():
                self.samples.append((time.time(), int(line)))

    def __exit__(self, *exc):
        if self.proc:
            self.proc.terminate()
            self.proc.wait()
            self.reader.join(timeout=5)

    def mean(self, start: float, end: float) -> float | None:
        """Mean utilisation (0-1) of the samples between two epoch times."""
        inside = [u for t, u in self.samples if start <= t <= end]
        return sum(inside) / len(inside) / 100 if inside else None


def start_up(device: str, engine: str) -> dict:
    """What a run of one 8x8 image costs: seconds from launching ``python -m jobs.restore``
    to its image's metrics row (``finished_at``), and to the process's end."""
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in"
        src.mkdir()
        Image.fromarray(np.random.default_rng(3).integers(0, 256, (8, 8, 3), np.uint8)).save(
            src / "a.png")
        started = time.time()
        wall = _restore_job(src, Path(tmp) / "out", device, engine)
        done = pq.read_table(Path(tmp) / "out" / "metrics")["finished_at"][0].as_py()
    return {"first_image_s": done.timestamp() - started, "wall_s": wall}


SIMULATED_ROWS_PER_BLOCK = 32  # a GPU's blocks are 256 rows; 32 gives 1,200 rows 38 blocks


def simulated_job(rate: float, count: int = 1200, size: tuple[int, int] = (120, 80),
                  code: Path | None = None) -> dict:
    """The whole job (Ray engine, real reads, decode, the actor's code, encode, writes, ledger)
    over ``count`` generated ``size`` thumbnails in blocks of SIMULATED_ROWS_PER_BLOCK, the
    model's device work replaced by a simulated device at ``rate`` (see simulated_device): how
    busy that device was in the steady window (its own: from the 10th to the 90th percentile of
    its launches), from its own busy intervals; and the actor's host time per image around the
    device work. ``code``: another revision's source tree to run instead."""
    with tempfile.TemporaryDirectory() as tmp:
        src, out, log = Path(tmp) / "in", Path(tmp) / "out", Path(tmp) / "device"
        make_thumbnails(src, count, size)
        log.mkdir()
        config = Path(tmp) / "job.yaml"
        config.write_text(f"input: {{manifest: '{src}', rows_per_block: "
                          f"{SIMULATED_ROWS_PER_BLOCK}}}\noutput: {{uri: '{out}'}}\n"
                          f"inference: {{simulated_rate: {rate}}}\n")
        wall = _restore_job(src, out, "cpu", "ray", config=config, env={LOG_ENV: str(log)},
                            code=code)
        _, _, steady, device_ms = _steady_state(out)
        intervals = read_intervals(log)
        host_s, host_images = read_host_time(log)
    work = sum(end - start for start, end in intervals)
    first, last = steady_window(intervals)
    # The actor logs its host time; a revision from before it did not, and waited for the
    # device as soon as it launched: there its block's time less the device work is the same.
    host_ms = (1000 * host_s / host_images if host_images else
               device_ms - 1000 * work / count if np.isfinite(device_ms) else None)
    return {"rate": rate, "images": count, "thumbnail_size": "x".join(map(str, size)),
            "rows_per_block": SIMULATED_ROWS_PER_BLOCK, "wall_s": wall,
            "steady_images_per_s": steady,
            "device_busy_steady": busy_fraction(intervals, first, last),
            "device_work_s": work, "actor_ms_per_image_outside_device": host_ms}


@contextlib.contextmanager
def revision_tree(rev: str):
    """The project's source at git revision ``rev`` (``git archive``), in a temporary folder,
    for measuring it side by side with this one."""
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "archive", rev], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        yield Path(tmp)


def _restore_job(src: Path, out: Path, device: str, engine: str,
                 compile_mode: str | None = None, config: Path | None = None,
                 env: dict | None = None, code: Path | None = None) -> float:
    """Seconds that ``python -m jobs.restore`` took over ``src``, as a user runs it; ``code``:
    a source tree of another revision to run instead of this one (see :func:`revision_tree`)."""
    started = time.perf_counter()
    env = {**os.environ, **(env or {})}
    if code:
        env["PYTHONPATH"] = str(code)
    proc = subprocess.run([sys.executable, "-m", "jobs.restore", "--manifest", str(src),
                           "--output", str(out), "--device", device, "--engine", engine,
                           *(["--compile", compile_mode] if compile_mode else []),
                           *(["--config", str(config)] if config else [])],
                          capture_output=True, text=True, env=env, cwd=code)
    if proc.returncode:
        raise RuntimeError(f"jobs.restore failed:\n{proc.stderr[-2000:]}")
    return time.perf_counter() - started


def simple_loop(files: list[Path], model: torch.nn.Module, device: torch.device) -> float:
    """Images/s of a plain loop, one image at a time: decode, the project's upscale, the model
    with the job's precision and channels_last; nothing written, no metrics."""
    net = copy.deepcopy(model).to(device, DTYPES[resolve_precision("auto", device)]).eval()
    net = net.to(memory_format=torch.channels_last)
    started = time.perf_counter()
    with torch.inference_mode():
        for f in files:
            big = imaging.upscale2x(imaging.decode(f.read_bytes()))
            h, w = big.shape[:2]
            x = to_model_input(torch.from_numpy(big.copy())[None].to(device))
            x = torch.nn.functional.pad(x, (0, -w % 4, 0, -h % 4), mode="replicate")
            y = net(x.contiguous(memory_format=torch.channels_last))[-1][..., :h, :w]
            from_model_output(y).cpu()
    return len(files) / (time.perf_counter() - started)


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"


@dataclass(frozen=True)
class Settings:
    """What :func:`measure` measures; ``python -m jobs.benchmark --help`` says each."""

    device: str = "auto"
    size: str = "480x320"
    batches: str | None = None
    seconds: float = 5.0
    compile: str | None = None
    profile: bool = False
    bare_only: bool = False
    job: int = 0
    job_size: str | None = None
    checkpoint: str = CHECKPOINT
    simulated_device: float | None = None
    against: str | None = None


def measure(settings: Settings, save: Callable[[dict], None] = lambda result: None) -> dict:
    """Every figure ``settings`` ask for, measured side by side in this process; ``save`` gets
    the figures so far after each section (a time limit then loses only the section it cut)."""
    with (revision_tree(settings.against) if settings.against
          else contextlib.nullcontext()) as tree:
        against = (settings.against, tree) if settings.against else None
        if settings.simulated_device:  # the job alone, against a simulated device
            return _measure_simulated(settings.simulated_device, against, save)
        return _measure(settings, against, save)


def _measure_simulated(rate: float, against: tuple[str, Path] | None,
                       save: Callable[[dict], None]) -> dict:
    result = {"hardware": hardware(torch.device("cpu")), "date": time.strftime("%Y-%m-%d")}
    if against:
        result["simulated_job_against"] = {"revision": against[0],
                                           **simulated_job(rate, code=against[1])}
        save(result)
    result["simulated_job"] = simulated_job(rate)
    save(result)
    return result


def _measure(settings: Settings, against: tuple[str, Path] | None,
             save: Callable[[dict], None]) -> dict:
    device = resolve_device(settings.device)
    w, h = (int(v) for v in settings.size.lower().split("x"))
    batches = [int(b) for b in settings.batches.split(",")] if settings.batches else (
        [1, 8, 32, 64] if device.type == "cuda" else [1, 4])
    model = build_model("mimo-unet", settings.checkpoint)
    flops = model_flops(model, h, w)
    peak = next((v for k, v in DENSE_BF16_PEAK.items() if k in hardware(device)), None)

    result = {"hardware": hardware(device), "torch": torch.__version__, "threads":
              torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
              "size": f"{w}x{h}", "gflop_per_image": flops / 1e9,
              "dense_bf16_peak_tflops": peak}
    result["bare_model"] = bare_model(model, device, h, w, batches, settings.seconds,
                                      settings.compile,
                                      profile=device.type == "cuda" or settings.profile)
    base = result["bare_model"][0]["images_per_s"]
    for row in result["bare_model"]:
        row["x_baseline"] = row["images_per_s"] / base
        row["tflops"] = row["images_per_s"] * flops / 1e12
        if peak:
            row["fraction_of_peak"] = row["tflops"] / peak
    best = max(result["bare_model"], key=lambda r: r["images_per_s"])
    save(result)
    if settings.bare_only:
        return result
    # The whole job first after the bare model: the figure that matters most comes back even
    # when a time limit stops the rest (each section is saved to --json as it is done).
    if settings.job:
        size = (tuple(int(v) for v in settings.job_size.lower().split("x"))
                if settings.job_size else None)
        job = result["whole_job"] = whole_job(settings.device, settings.job, model, size,
                                              _job_compile_mode(settings.compile), against)
        same_input = size is not None and (2 * size[0], 2 * size[1]) == (w, h)
        # Other sizes compare by pixels: the model's cost is its convolutions', per pixel.
        per_bare_image = 1.0 if same_input else job["mean_output_pixels"] / (w * h)
        for run in (v for v in job.values() if isinstance(v, dict)):
            rate = run["steady_images_per_s"] * per_bare_image  # in the bare model's images
            run["x_best_bare_model"] = rate / best["images_per_s"]
            if peak:
                run["fraction_of_peak"] = rate * flops / 1e12 / peak
        save(result)
    result["restorer_stream"] = restorer_stream(model, device, h, w, best["batch"],
                                                4 * best["batch"], settings.seconds)
    with _threads(1):
        result["cpu_ms_per_image"] = cpu_stages(h, w)
        result["png_levels"] = png_levels(h, w)
        result["faithful_cost"] = faithful_cost(h, w)
    result["actor_ms_per_image"] = actor_stages(h, w, device)
    cpu_s = sum(result["cpu_ms_per_image"].values()) / 1000
    result["cpu_cores_per_device_at_best_rate"] = cpu_s * best["images_per_s"]
    save(result)
    result["start_up"] = {engine: start_up(settings.device, engine) for engine in engines()}
    return result


def _job_compile_mode(mode: str | None) -> str | None:
    """The --compile mode as jobs.restore takes it: the job's own modes (max-autotune's search
    would be paid by every actor)."""
    return mode if mode in ("default", "reduce-overhead") else None


class _threads:
    """Run a block with ``n`` intra-op threads (CPU stages run one per task in the job)."""

    def __init__(self, n: int):
        self.n, self.before = n, torch.get_num_threads()

    def __enter__(self):
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.before)


def _render_simulated(r: dict) -> str:
    lines = []
    for key in ("simulated_job_against", "simulated_job"):
        if key not in r:
            continue
        s = r[key]
        outside = s["actor_ms_per_image_outside_device"]
        w, h = (int(v) for v in s["thumbnail_size"].split("x"))
        capacity = s["rate"] * REFERENCE_PIXELS / (4 * w * h)
        lines += [
            f"Whole job (Ray engine{', revision ' + s['revision'] if 'revision' in s else ''}), "
            f"{s['images']} thumbnails of {s['thumbnail_size']} in blocks of "
            f"{s.get('rows_per_block', 'auto')} rows: {s['wall_s']:.1f} s wall; the device does "
            f"{capacity:.0f} of their 2x images a second; the actor's host time per image "
            f"outside the device work: {'-' if outside is None else f'{outside:.2f} ms'}.",
            f"device busy: {100 * s['device_busy_steady']:.0f}% of the steady window "
            f"(simulated device at {s['rate']:g} images/s)"]
    return "\n".join(lines)


def _maybe(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def render(r: dict) -> str:
    """The figures as Markdown; a section not measured (a run stopped early) is left out."""
    if "simulated_job" in r or "simulated_job_against" in r:
        return _render_simulated(r)
    lines = [f"Hardware: {r['hardware']}; torch {r['torch']}, {r['threads']} threads; "
             f"{r['date']}. Model input {r['size']}: {r['gflop_per_image']:.0f} GFLOP per image.",
             "", "| bare model | precision | batch | images/s | x baseline | TFLOP/s | "
             "of bf16 peak |", "|---|---|---|---|---|---|---|"]
    for row in r["bare_model"]:
        frac = f"{100 * row['fraction_of_peak']:.1f}%" if "fraction_of_peak" in row else "-"
        lines.append(f"| {row['variant']} | {row['precision']} | {row['batch']} | "
                     f"{row['images_per_s']:.2f} | {row['x_baseline']:.2f} | {row['tflops']:.1f} "
                     f"| {frac} |")
    for row in r["bare_model"]:
        if "time_goes" in row:
            lines += _render_time_goes(row)
    if "whole_job" in r:
        lines += _render_job(r["whole_job"])
    if "cpu_ms_per_image" in r:
        lines += _render_stages(r)
    for engine, s in r.get("start_up", {}).items():
        lines.append(f"Start-up, one 8x8 image through jobs.restore --engine {engine}: its "
                     f"metrics row after {s['first_image_s']:.1f} s, the process done after "
                     f"{s['wall_s']:.1f} s.")
    return "\n".join(lines)


def _render_time_goes(row: dict) -> list[str]:
    """Where a bare-model row's pass goes: each kind of kernel against the pass's wall time (its
    measured rate), the rest being time the device sat idle; then the longest kernels."""
    goes = row["time_goes"]
    wall = 1000 * row["batch"] / row["images_per_s"]
    lines = ["", f"| where a pass goes: {row['variant']}, batch {row['batch']} | ms per pass | "
             "share of the pass |", "|---|---|---|"]
    lines += [f"| {kind} | {ms:.2f} | {100 * ms / wall:.1f}% |"
              for kind, ms in goes["kinds_ms"].items()]
    idle = wall - goes["ms_per_pass"]
    lines += [f"| no kernel running (launch gaps, host) | {max(idle, 0):.2f} | "
              f"{100 * max(idle, 0) / wall:.1f}% |", f"| the pass, wall | {wall:.2f} | 100% |",
              "", "| longest kernels | kind | ms per pass | share of kernel time |",
              "|---|---|---|---|"]
    lines += [f"| `{_short(o['op'])}` | {o['kind']} | {o['ms_per_pass']:.2f} | "
              f"{100 * o['share']:.1f}% |" for o in goes["top"]]
    return lines


def _short(name: str, limit: int = 90) -> str:
    return name if len(name) <= limit else name[:limit - 3] + "..."


def _render_job(j: dict) -> list[str]:
    lines = ["", f"Whole jobs.restore process over {j['images']} JPEG thumbnails "
             f"({j['thumbnail_size']}); a simple loop over the same files: "
             f"{j['simple_loop_images_per_s']:.2f} images/s. Against the bare model, the job's "
             "images count by their pixels (in the bare model's images).", "",
             "| engine | images/s, whole process | wall s | x simple loop | images/s, "
             "steady | x best bare model | of bf16 peak | GPU busy, steady | actor's device "
             "work, ms an image | its share of steady |", "|---" * 10 + "|"]
    for engine, e in j.items():
        if not isinstance(e, dict):
            continue
        frac = f"{100 * e['fraction_of_peak']:.1f}%" if "fraction_of_peak" in e else "-"
        busy = (f"{100 * e['gpu_busy_steady']:.0f}%" if e["gpu_busy_steady"] is not None
                else "-")
        share = e.get("device_work_share_steady")
        lines.append(f"| {engine} | {e['images_per_s']:.2f} | {e['wall_s']:.1f} | "
                     f"{e['x_simple_loop']:.2f} | {e['steady_images_per_s']:.2f} | "
                     f"{_maybe(e.get('x_best_bare_model'))} | {frac} | {busy} | "
                     f"{_maybe(e.get('device_work_ms_per_image'))} | "
                     f"{'-' if share is None else f'{100 * share:.0f}%'} |")
    return lines


def _render_stages(r: dict) -> list[str]:
    s = r["restorer_stream"]
    lines = ["", f"Restorer ({s['precision']}, batch_size {s['batch_size']}), {s['images']} "
             f"uint8 images from host memory: all {r['size']} {s['uniform_images_per_s']:.2f} "
             f"images/s; mixed sizes (mean {s['mixed_mean_pixels'] / 1e3:.0f} kpixels) "
             f"{s['mixed_images_per_s']:.2f} images/s.", "",
             "| CPU stage (one thread) | ms per image |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in r["cpu_ms_per_image"].items()]
    lines += ["", "| on the actor's device | ms per image |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in r["actor_ms_per_image"].items()]
    lines.append("\nPNG of a photograph, " + "; ".join(
        f"{k}: {v['ms']:.1f} ms, {v['bytes'] / 1e3:.0f} kB" for k, v in r["png_levels"].items()))
    if "faithful_cost" in r:
        cost = r["faithful_cost"]
        bare, plain = cost["bare (2026-12-04), plain JPEG"], cost["faithful, plain JPEG"]
        lines.append("\nCPU per image, decode to encode, alternated in one run: " + "; ".join(
            f"{k}: {v:.2f} ms" for k, v in cost.items())
            + f" (faithful / bare on the plain JPEG: {plain / bare:.3f}).")
    cpu_ms = sum(r["cpu_ms_per_image"].values())
    lines.append(f"\nCPU stages: {cpu_ms:.1f} ms per image, so {cpu_ms:.1f} cores per 1,000 "
                 f"images/s; {r['cpu_cores_per_device_at_best_rate']:.2f} cores at this "
                 f"device's best bare-model rate.")
    return lines

