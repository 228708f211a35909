"""Adapting a checkpoint to a user's archive, which has thumbnails but no originals.

The archive's own thumbnails become the high-resolution side: each is downscaled 2x further to
make a pair, the base model is fine-tuned on those pairs, and a held-out part of the archive
decides whether the adapted model is kept: only if it restores the held-out thumbnails from
their own 2x-smaller versions better than the base model does.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from pipeline import imaging, sharpness
from pipeline.inference import InferenceSettings, Restorer
from pipeline.training.degradations import MARGIN


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
