"""Training MIMO-UNet to undo 2x downscaling followed by the pipeline's own bicubic upscale."""

from __future__ import annotations

import io
import json
import math
import os
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from pipeline import imaging, metrics
from pipeline.models import build_model


@dataclass
class TrainSettings:
    """What a run does; stored with its checkpoints so a resumed run can be checked against it."""

    model: str = "mimo-unet"
    patch: int = 64  # side of a crop of the upscaled input, in pixels; a multiple of 4
    batch: int = 16
    steps: int = 5000
    lr: float = 3e-4
    min_lr_ratio: float = 0.01
    warmup_steps: int = 200
    jpeg_fraction: float = 0.5  # share of pairs whose low-resolution side went through JPEG
    jpeg_quality: tuple[int, int] = (60, 95)
    fft_weight: float = 0.1  # the paper's weight of the frequency-domain L1 term
    bf16: bool = True  # CPU autocast; about 2x faster on AVX-512-BF16 CPUs
    seed: int = 0
    holdout_every: int = 20  # every n-th training image is kept out for validation
    val_crop: int = 192


def split_holdout(paths: Sequence[Path], every: int) -> tuple[list[Path], list[Path]]:
    """(training, held-out): every ``every``-th image of the sorted list is held out."""
    ordered = sorted(paths)
    holdout = ordered[::every]
    return [p for p in ordered if p not in holdout], holdout


@dataclass
class Pair:
    inputs: list[np.ndarray]  # upscaled degraded variants of the same image
    target: np.ndarray


def degrade(hr: np.ndarray, rng: random.Random, jpeg_quality: int | None) -> np.ndarray:
    """HR -> 2x bicubic downscale (optionally JPEG) -> the pipeline's 2x bicubic upscale."""
    lr = imaging.downscale2x(hr)
    if jpeg_quality is not None:
        buf = io.BytesIO()
        Image.fromarray(lr).save(buf, format="JPEG", quality=jpeg_quality)
        lr = np.asarray(Image.open(buf).convert("RGB"))
    return imaging.upscale2x(lr)


def load_pairs(paths: Sequence[Path], settings: TrainSettings, rng: random.Random) -> list[Pair]:
    pairs = []
    for path in paths:
        hr = np.asarray(Image.open(path).convert("RGB"))
        hr = hr[: hr.shape[0] // 2 * 2, : hr.shape[1] // 2 * 2]
        inputs = [degrade(hr, rng, None)]
        if settings.jpeg_fraction > 0:
            inputs.append(degrade(hr, rng, rng.randint(*settings.jpeg_quality)))
        pairs.append(Pair(inputs=inputs, target=hr))
    return pairs


def batches(pairs: list[Pair], settings: TrainSettings, rng: random.Random) -> Iterator[tuple]:
    """Endless random crops, flips and 90-degree rotations as ``(input, target)`` tensors."""
    p = settings.patch
    weights = [pair.target.shape[0] * pair.target.shape[1] for pair in pairs]
    while True:
        xs, ys = [], []
        for pair in rng.choices(pairs, weights=weights, k=settings.batch):
            jpeg = len(pair.inputs) > 1 and rng.random() < settings.jpeg_fraction
            src = pair.inputs[1 if jpeg else 0]
            h, w = pair.target.shape[:2]
            y, x = rng.randrange(h - p + 1), rng.randrange(w - p + 1)
            a, b = src[y:y + p, x:x + p], pair.target[y:y + p, x:x + p]
            k = rng.randrange(4)
            a, b = np.rot90(a, k), np.rot90(b, k)
            if rng.random() < 0.5:
                a, b = a[:, ::-1], b[:, ::-1]
            xs.append(a)
            ys.append(b)
        yield _to_tensor(np.stack(xs)), _to_tensor(np.stack(ys))


def _to_tensor(batch: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float() / 255.0
    return t.contiguous(memory_format=torch.channels_last)


def mimo_loss(outputs: Sequence[torch.Tensor], target: torch.Tensor, fft_weight: float):
    """L1 at the three scales plus ``fft_weight`` x L1 of their 2-D FFTs (the paper's loss)."""
    half = F.interpolate(target, scale_factor=0.5, mode="bilinear")
    quarter = F.interpolate(half, scale_factor=0.5, mode="bilinear")
    total = target.new_zeros(())
    for out, ref in zip(outputs, (quarter, half, target)):
        out = out.float()
        total = total + F.l1_loss(out, ref)
        spec_out = torch.view_as_real(torch.fft.rfft2(out))
        spec_ref = torch.view_as_real(torch.fft.rfft2(ref))
        total = total + fft_weight * F.l1_loss(spec_out, spec_ref)
    return total


def lr_at(step: int, s: TrainSettings) -> float:
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    progress = min(1.0, (step - s.warmup_steps) / max(1, s.steps - s.warmup_steps))
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def start_as_identity(model: nn.Module) -> None:
    """Zero the output convolutions so training starts from the bicubic input, not noise."""
    for conv in (model.feat_extract[5], *model.ConvsOut):
        nn.init.zeros_(conv.main[0].weight)
        nn.init.zeros_(conv.main[0].bias)


@torch.no_grad()
def validate(model: nn.Module, pairs: list[Pair], crop: int) -> dict:
    """Mean PSNR-Y of model and bicubic on centre crops of held-out clean pairs."""
    model.eval()
    ours, bicubic = [], []
    for pair in pairs:
        h, w = pair.target.shape[:2]
        c = min(crop, h, w) // 4 * 4
        y, x = (h - c) // 2, (w - c) // 2
        src, ref = pair.inputs[0][y:y + c, x:x + c], pair.target[y:y + c, x:x + c]
        out = model(_to_tensor(src[None]))[-1]
        restored = (out.clamp(0, 1) * 255).round().byte()[0].permute(1, 2, 0).numpy()
        ours.append(metrics.psnr_y(restored, ref))
        bicubic.append(metrics.psnr_y(src, ref))
    model.train()
    return {"val_psnr_y": float(np.mean(ours)), "val_bicubic_psnr_y": float(np.mean(bicubic))}


@dataclass
class RunState:
    step: int = 0
    elapsed_s: float = 0.0
    history: list = field(default_factory=list)


def train(
    image_paths: Sequence[Path],
    run_dir: Path,
    settings: TrainSettings,
    init_checkpoint: str | None = None,
    checkpoint_every_s: float = 300.0,
    max_minutes: float | None = None,
    log=print,
) -> tuple[nn.Module, RunState]:
    """Train, or resume the run in ``run_dir``; checkpoint every ``checkpoint_every_s``.

    Returns:
        The model (fp32, eval mode) and the run's state at the end.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(settings.seed)
    torch.manual_seed(settings.seed)
    train_paths, holdout = split_holdout(image_paths, settings.holdout_every)
    log(f"train images: {len(train_paths)}, held out for validation: {len(holdout)}")

    model = build_model(settings.model, init_checkpoint).train()
    if init_checkpoint is None:
        start_as_identity(model)
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr, betas=(0.9, 0.999))
    state = RunState()
    state_file = run_dir / "state.pt"
    if state_file.exists():
        saved = torch.load(state_file, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        state = RunState(**json.loads(saved["run_state"]))
        rng.seed(settings.seed + state.step)  # a fresh but reproducible stream after resume
        log(f"resumed {state_file} at step {state.step}")

    t0 = time.time()
    pairs = load_pairs(train_paths, settings, rng)
    val_pairs = load_pairs(holdout, TrainSettings(jpeg_fraction=0), rng)
    log(f"prepared pairs in {time.time() - t0:.0f}s")

    def save() -> None:
        tmp = state_file.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "settings": json.dumps(asdict(settings)),
                    "run_state": json.dumps(asdict(state))}, tmp)
        os.replace(tmp, state_file)

    stream = batches(pairs, settings, rng)
    started = time.time() - state.elapsed_s
    last_save = time.time()
    running = 0.0
    while state.step < settings.steps:
        x, y = next(stream)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(state.step, settings)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=settings.bf16):
            outputs = model(x)
        loss = mimo_loss(outputs, y, settings.fft_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        state.step += 1
        # An exponential average of the loss, started afresh by each (resumed) process.
        running = 0.98 * running + 0.02 * loss.item() if running else loss.item()
        state.elapsed_s = time.time() - started
        if state.step % 50 == 0:
            log(f"step {state.step}/{settings.steps} loss {running:.4f} "
                f"lr {lr_at(state.step, settings):.2e} {state.elapsed_s / 60:.1f} min")
        out_of_time = max_minutes is not None and (time.time() - t0) / 60 >= max_minutes
        if (time.time() - last_save >= checkpoint_every_s or state.step == settings.steps
                or out_of_time):
            record = {"step": state.step, "elapsed_s": round(state.elapsed_s), "loss": running,
                      **validate(model, val_pairs, settings.val_crop)}
            state.history.append(record)
            log(json.dumps(record))
            save()
            last_save = time.time()
        if out_of_time:
            log(f"stopping after {max_minutes} minutes; rerun to resume")
            break
    return model.eval(), state


def export(model: nn.Module, path: Path, card: dict) -> None:
    """Write float16 weights as ``{'model': state_dict, 'model_card': json}``."""
    sd = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": sd, "model_card": json.dumps(card)}, path)
