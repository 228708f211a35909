"""Model registry: ``build_model(name, checkpoint, device)``."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from pipeline.models.checkpoints import Checkpoint, CheckpointError, load_into, read_checkpoint
from pipeline.models.mimo_unet import MIMOUNet

__all__ = ["MODELS", "Checkpoint", "CheckpointError", "build_model", "read_checkpoint"]

MODELS: dict[str, Callable[[], nn.Module]] = {
    "mimo-unet": lambda: MIMOUNet(num_res=8),
    "mimo-unet-plus": lambda: MIMOUNet(num_res=20, dropout=0.1),
}


def build_model(
    name: str,
    checkpoint: str | Checkpoint | None = None,
    device: str | torch.device = "cpu",
    storage_options: Mapping | None = None,
) -> nn.Module:
    """Build a registered network in eval mode, optionally with weights.

    Args:
        name: ``mimo-unet`` or ``mimo-unet-plus``.
        checkpoint: a path or fsspec URI, an already read :class:`Checkpoint`, or None for
            random initial weights.
        device: where the network lives.
        storage_options: fsspec options for reading ``checkpoint``.

    Returns:
        The network, whose forward takes ``N x 3 x H x W`` in [0, 1] (H, W multiples of 4) and
        returns the quarter, half and full resolution outputs. When a checkpoint was given its
        sha256 is on ``model.checkpoint_sha256``.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    model = MODELS[name]()
    model.checkpoint_sha256 = None
    if checkpoint is not None:
        if not isinstance(checkpoint, Checkpoint):
            checkpoint = read_checkpoint(checkpoint, storage_options)
        load_into(model, checkpoint)
        model.checkpoint_sha256 = checkpoint.sha256
    return model.to(device).eval()
