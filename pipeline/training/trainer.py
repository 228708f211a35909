"""Training MIMO-UNet to undo thumbnail degradation, data-parallel on Ray Train.

The same loop runs as one CPU worker on a laptop or N GPU workers (DDP) on a cluster. Ray Train
keeps the checkpoints in the run's storage (a local path or any URI it supports, s3:// too) and
hands the latest back when the same run is started again, so a killed run resumes.
"""

from __future__ import annotations

import json
import math
import random
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline import imaging, sharpness, storage
from pipeline.inference import from_model_output, to_model_input
from pipeline.models import build_model
from pipeline.restore import manifest
from pipeline.training import degradations


@dataclass
class TrainSettings:
    """What a run does; saved in its checkpoints and in the exported model card."""

    model: str = "mimo-unet"
    patch: int = 64  # side of a training crop of the upscaled input; a multiple of 4
    batch: int = 16  # global: split across the workers
    steps: int = 5000
    lr: float = 3e-4
    min_lr_ratio: float = 0.01
    warmup_steps: int = 200
    fft_weight: float = 0.1  # the paper's weight of the frequency-domain L1 term
    bf16: bool = True  # autocast; about 2x faster on CPUs with AVX-512-BF16, and on GPUs
    seed: int = 0
    holdout_every: int = 20  # every n-th training image is kept out for validation
    val_crop: int = 192
    checkpoint_every: int = 200  # steps
    degradation: degradations.Degradation = field(default_factory=degradations.Degradation)


def split_holdout(items: Sequence, every: int) -> tuple[list, list]:
    """(training, held-out): every ``every``-th item of the sorted list is held out."""
    ordered = sorted(items)
    holdout = ordered[::every]
    return [p for p in ordered if p not in holdout], holdout


def list_images(uris: Sequence[str], options: Mapping | None = None) -> list[str]:
    """Training image URIs from prefixes or manifests (any fsspec URI)."""
    found = []
    for uri in uris:
        rows = manifest.load_rows(uri, options)
        found += [u for u, e in zip(rows["source_uri"].to_pylist(), rows["error"].to_pylist())
                  if e is None]
    return sorted(set(found))


def load_images(uris: Sequence[str], options: Mapping | None = None) -> list[np.ndarray]:
    images = []
    for uri in uris:
        rgb = imaging.decode(storage.read_bytes(uri, options),
                             imaging.DecodeLimits(max_pixels=64_000_000))
        images.append(rgb[: rgb.shape[0] // 2 * 2, : rgb.shape[1] // 2 * 2])
    return images


def _to_tensor(batch: np.ndarray, device: torch.device) -> torch.Tensor:
    # A copy: crops of decoded images are read-only views, which torch.from_numpy warns about.
    t = to_model_input(torch.from_numpy(np.array(batch)).to(device))
    return t.contiguous(memory_format=torch.channels_last)


def sample_batch(images: list[np.ndarray], size: int, s: TrainSettings, rng: random.Random,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    weights = [im.shape[0] * im.shape[1] for im in images]
    pairs = [degradations.sample_pair(im, s.patch, rng, s.degradation)
             for im in rng.choices(images, weights=weights, k=size)]
    return (_to_tensor(np.stack([p[0] for p in pairs]), device),
            _to_tensor(np.stack([p[1] for p in pairs]), device))


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
    return cosine_lr(s, (step - s.warmup_steps) / max(1, s.steps - s.warmup_steps))


def cosine_lr(s: TrainSettings, progress: float) -> float:
    """From ``s.lr`` at progress 0 down to ``s.lr * s.min_lr_ratio`` at 1 (and after)."""
    progress = min(1.0, progress)
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def start_as_identity(model: nn.Module) -> None:
    """Zero the output convolutions so training starts from the bicubic input, not noise."""
    for conv in (model.feat_extract[5], *model.ConvsOut):
        nn.init.zeros_(conv.main[0].weight)
        nn.init.zeros_(conv.main[0].bias)


@torch.no_grad()
def validate(model: nn.Module, images: list[np.ndarray], crop: int,
             device: torch.device) -> dict:
    """Mean PSNR-Y of model and bicubic on centre crops of held-out images (clean bicubic)."""
    model.eval()
    ours, bicubic = [], []
    for hr in images:
        h, w = hr.shape[:2]
        c = min(crop, h, w) // 4 * 4
        ref = hr[(h - c) // 2:(h - c) // 2 + c, (w - c) // 2:(w - c) // 2 + c]
        src = imaging.upscale2x(imaging.downscale2x(ref))
        out = model(_to_tensor(src[None], device))[-1]
        restored = from_model_output(out)[0].cpu().numpy()
        ours.append(sharpness.psnr_y(restored, ref))
        bicubic.append(sharpness.psnr_y(src, ref))
    model.train()
    return {"val_psnr_y": float(np.mean(ours)), "val_bicubic_psnr_y": float(np.mean(bicubic))}


def _settings_from(d: dict) -> TrainSettings:
    d = dict(d)
    d["degradation"] = degradations.Degradation(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in d["degradation"].items()})
    return TrainSettings(**d)


def train_loop_per_worker(config: dict) -> None:
    """The Ray Train worker loop. ``config``: settings, images, holdout, init, options, threads.

    Its steps: the model (from ``init``, or bicubic identity), the run's latest checkpoint if
    it has one, then training steps with a report (and on rank 0 a validation and a
    checkpoint) every ``checkpoint_every`` steps.
    """
    import ray.train
    import ray.train.torch

    s = _settings_from(config["settings"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if config.get("threads"):
        torch.set_num_threads(config["threads"])
    device = ray.train.torch.get_device()
    torch.manual_seed(s.seed)
    model = _initial_model(s, config.get("init"), config.get("options"), device)
    optimizer = torch.optim.Adam(model.parameters(), lr=s.lr)
    step, elapsed, history = _resume(model, optimizer, ray.train.get_checkpoint())
    rng = random.Random(s.seed * 1000 + rank + step)  # a fresh, reproducible stream on resuming
    ddp = ray.train.torch.prepare_model(model, move_to_device=False)
    train_images = load_images(config["images"], config.get("options"))
    val_images = load_images(config["holdout"], config.get("options")) if rank == 0 else []

    per_worker = max(1, s.batch // world)
    started = time.time() - elapsed
    running = 0.0
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=s.bf16)
    while step < s.steps:
        x, y = sample_batch(train_images, per_worker, s, rng, device)
        loss = _step(ddp, optimizer, x, y, lr_at(step, s), autocast, s.fft_weight)
        step += 1
        running = 0.98 * running + 0.02 * loss if running else loss
        if step % s.checkpoint_every and step != s.steps:
            continue
        record = {"step": step, "loss": running, "elapsed_s": round(time.time() - started),
                  "lr": lr_at(step, s)}
        if rank == 0:
            record.update(validate(model, val_images, s.val_crop, device))
            history.append(record)
            _checkpoint(record, model, optimizer, history, s, time.time() - started)
        else:
            ray.train.report(record)


def _initial_model(s: TrainSettings, init: str | None, options: Mapping | None,
                   device: torch.device) -> nn.Module:
    model = build_model(s.model, init, storage_options=options)
    if init is None:
        start_as_identity(model)
    return model.train().to(device, memory_format=torch.channels_last)


def _resume(model: nn.Module, optimizer: torch.optim.Optimizer,
            checkpoint) -> tuple[int, float, list[dict]]:
    """The run's latest Ray Train checkpoint into ``model`` and ``optimizer``; returns its step,
    elapsed seconds and validation history ((0, 0.0, []) for a fresh run)."""
    if not checkpoint:
        return 0, 0.0, []
    # A private copy per worker: as_directory() may hand workers on one node a shared
    # temporary folder that one of them deletes while another still reads it.
    with tempfile.TemporaryDirectory() as d:
        saved = torch.load(Path(checkpoint.to_directory(d)) / "state.pt", map_location="cpu",
                           weights_only=True)
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    return saved["step"], saved["elapsed_s"], json.loads(saved["history"])


def _step(ddp: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
          lr: float, autocast, fft_weight: float) -> float:
    """One optimiser step on a batch; returns its loss."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    with autocast:
        outputs = ddp(x)
    loss = mimo_loss(outputs, y, fft_weight)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(ddp.parameters(), 1.0)
    optimizer.step()
    return loss.item()


def _checkpoint(record: dict, model: nn.Module, optimizer: torch.optim.Optimizer,
                history: list[dict], s: TrainSettings, elapsed_s: float) -> None:
    """Rank 0's report: the progress line, and the state Ray Train keeps as a checkpoint."""
    import ray.train

    print(f"step {record['step']}/{s.steps}: loss {record['loss']:.4f}, held-out PSNR-Y "
          f"{record['val_psnr_y']:.2f} dB (bicubic {record['val_bicubic_psnr_y']:.2f}), "
          f"{record['elapsed_s'] / 60:.0f} min", flush=True)
    with tempfile.TemporaryDirectory() as d:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "step": record["step"], "elapsed_s": elapsed_s,
                    "history": json.dumps(history), "settings": json.dumps(asdict(s))},
                   Path(d) / "state.pt")
        ray.train.report(record, checkpoint=ray.train.Checkpoint.from_directory(d))


def load_trained(checkpoint_dir: Path, model_name: str) -> tuple[nn.Module, dict]:
    """The model and saved state from a Ray Train checkpoint directory."""
    saved = torch.load(checkpoint_dir / "state.pt", map_location="cpu", weights_only=True)
    model = build_model(model_name)
    model.load_state_dict(saved["model"])
    return model, saved


def export(model: nn.Module, path: str, card: dict, options: Mapping | None = None) -> None:
    """Write float16 weights as ``{'model': state_dict, 'model_card': json}`` to any URI."""
    export_state_dict(model.state_dict(), path, card, options)


def export_state_dict(state_dict: Mapping[str, torch.Tensor], path: str, card: dict,
                      options: Mapping | None = None) -> None:
    """``export`` for weights that are not in a module (an average of checkpoints, say)."""
    import io

    sd = {k: v.detach().to("cpu", torch.float16 if v.is_floating_point() else v.dtype)
          .contiguous() for k, v in state_dict.items()}
    buf = io.BytesIO()
    torch.save({"model": sd, "model_card": json.dumps(card)}, buf)
    storage.write_bytes_atomic(path, buf.getvalue(), options)


