"""Adapting a checkpoint to a user's archive, which has thumbnails but no originals.

The archive's own thumbnails become the high-resolution side: each is downscaled 2x further to
make a pair, the base model is fine-tuned on those pairs, and a held-out part of the archive
decides whether the adapted model is kept: only if it restores the held-out thumbnails from
their own 2x-smaller versions better than the base model does.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pipeline import imaging, sharpness, storage
from pipeline.config import FinetuneConfig, StorageConfig
from pipeline.inference import InferenceSettings, Restorer
from pipeline.models import Checkpoint, CheckpointError, build_model, read_checkpoint
from pipeline.training import trainer
from pipeline.training.degradations import MARGIN

logger = logging.getLogger(__name__)


def self_supervised_psnr(model: nn.Module, thumbnails: Sequence[np.ndarray]) -> float:
    """Mean PSNR-Y of restoring each thumbnail from its own 2x-downscaled version."""
    restorer = Restorer(model, torch.device("cpu"), InferenceSettings())
    scores = []
    for thumb in thumbnails:
        thumb = thumb[: thumb.shape[0] // 2 * 2, : thumb.shape[1] // 2 * 2]
        restored = restorer.restore([imaging.upscale2x(imaging.downscale2x(thumb))])[0]
        scores.append(sharpness.psnr_y(restored, thumb))
    return float(np.mean(scores))


def patch_for(thumbnails: Sequence[np.ndarray], largest: int = 64) -> int:
    """The largest training crop (a multiple of 4) that fits every thumbnail with its margin."""
    side = min(min(t.shape[:2]) for t in thumbnails) - 2 * MARGIN
    patch = min(largest, side // 4 * 4)
    if patch < 16:
        raise ValueError(f"thumbnails are too small to adapt on (smallest side {side + 2 * MARGIN}"
                         f" px; need at least {16 + 2 * MARGIN})")
    return patch


@dataclass(frozen=True)
class AdaptSettings:
    """What ``python -m jobs.adapt`` asks for (its ``--help`` says each)."""

    archive: list[str]
    base: str
    output: str
    steps: int = 500
    lr: float = 5e-5
    batch: int = 8
    workers: int = 1
    cpus_per_worker: int | None = None
    storage: str = "runs"
    name: str = "adapt"
    min_gain_db: float = 0.05
    endpoint_url: str | None = None


def adapt(a: AdaptSettings) -> dict | None:
    """Fine-tune ``a.base`` on the archive's thumbnails (a held-out part kept out), check both
    models on the held-out part, and write the better one to ``a.output`` with the check as
    JSON beside it. A rerun whose model was exported with its steps already only checks again.

    Returns:
        The check (PSNR-Y of both, the gain, which was kept), or None if training failed.
    """
    options = StorageConfig(endpoint_url=a.endpoint_url).fsspec_options()
    train_uris, held_out = trainer.split_holdout(trainer.list_images(a.archive, options),
                                                  trainer.TrainSettings.holdout_every // 2)
    held_out_images = trainer.load_images(held_out, options)
    patch = patch_for(held_out_images + trainer.load_images(train_uris, options))

    adapted_uri = storage.join(a.storage, f"{a.name}-adapted.pt")
    # The held-out part must never reach training, so finetune gets the rest as a manifest.
    train_part = storage.join(a.storage, f"{a.name}-train.jsonl")
    storage.write_bytes_atomic(train_part, "".join(
        json.dumps({"uri": u}) + "\n" for u in train_uris).encode(), options)
    exported = _exported_after(adapted_uri, a.steps, options)
    if exported:
        logger.info(f"{adapted_uri} has its {a.steps} steps already (a rerun): checking it "
                    "again")
    else:
        from pipeline.training.finetune import finetune  # Ray Train, for this step alone

        status = finetune(FinetuneConfig(
            train=[train_part], storage=a.storage, name=a.name, init=a.base,
            steps=a.steps, lr=a.lr, batch=a.batch, patch=patch, workers=a.workers,
            checkpoint_every=max(1, a.steps // 5), export=adapted_uri,
            cpus_per_worker=a.cpus_per_worker, endpoint_url=a.endpoint_url))
        if status:
            return None
        exported = read_checkpoint(adapted_uri, options)

    base = build_model("mimo-unet", a.base, storage_options=options)
    adapted = build_model("mimo-unet", exported)
    report = {"archive": a.archive, "train_images": len(train_uris),
              "held_out_images": len(held_out), "steps": a.steps,
              "base_psnr_y": self_supervised_psnr(base, held_out_images),
              "adapted_psnr_y": self_supervised_psnr(adapted, held_out_images)}
    report["gain_db"] = report["adapted_psnr_y"] - report["base_psnr_y"]
    report["kept"] = "adapted" if report["gain_db"] >= a.min_gain_db else "base"
    chosen = adapted_uri if report["kept"] == "adapted" else a.base
    storage.write_bytes_atomic(a.output, storage.read_bytes(chosen, options), options)
    storage.write_bytes_atomic(a.output.rsplit(".", 1)[0] + ".json",
                               json.dumps(report, indent=2).encode(), options)
    return report


def _exported_after(uri: str, steps: int, options: dict) -> Checkpoint | None:
    """This run's (its --name in its --storage) exported model, if it was exported after
    ``steps`` steps already: the export is written last, so a rerun after a failed check or a
    lost output need not start the trainer again. With more steps asked for, the trainer
    resumes the run."""
    try:
        checkpoint = read_checkpoint(uri, options)
        card = json.loads(checkpoint.meta["model_card"])
    except (FileNotFoundError, CheckpointError, KeyError, ValueError):
        return None
    return checkpoint if card.get("steps_done", 0) >= steps else None
