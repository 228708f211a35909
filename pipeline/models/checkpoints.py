"""Loading MIMO-UNet checkpoints: any fsspec URI, official and project formats, safe unpickling."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from pipeline import storage

# Wrappers seen around a state dict: the official releases use {'model': sd}, the official
# training script adds 'optimizer'/'scheduler'/'epoch', BasicSR uses 'params'/'params_ema',
# Lightning and many others use 'state_dict'.
_WRAPPER_KEYS = ("model", "state_dict", "params_ema", "params")
# DataParallel/DDP and torch.compile prefix every key.
_KEY_PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded or does not fit the model; the message says why."""


@dataclass(frozen=True)
class Checkpoint:
    """A state dict ready for ``load_state_dict`` and where it came from."""

    state_dict: dict[str, torch.Tensor]
    sha256: str
    uri: str
    meta: dict = field(default_factory=dict)


def read_checkpoint(uri: str, storage_options: Mapping | None = None,
                    data: bytes | None = None) -> Checkpoint:
    """Read a checkpoint from a local path or fsspec URI, without executing anything in it.

    Args:
        uri: local path, ``file://``, ``s3://`` or any other fsspec URI.
        storage_options: passed to fsspec (endpoint, credentials, ...).
        data: the file's bytes, when the caller has read them already.

    Returns:
        The normalised float32 state dict, the file's sha256 and any metadata the file carries.

    Raises:
        FileNotFoundError: the checkpoint does not exist.
        CheckpointError: the file is not a loadable checkpoint (the message says why).
    """
    if data is None:
        data = storage.read_bytes(uri, storage_options)
    sha256 = hashlib.sha256(data).hexdigest()
    try:
        # weights_only=True refuses arbitrary objects; there is no unsafe fallback on purpose.
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"cannot load checkpoint {uri}: {e.__class__.__name__}: {str(e).splitlines()[0]}. "
            "Only tensors and plain containers are accepted (torch.load weights_only=True)."
        ) from e
    state_dict, meta = normalise_state_dict(obj, uri)
    return Checkpoint(state_dict=state_dict, sha256=sha256, uri=uri, meta=meta)


def normalise_state_dict(
    obj: object, uri: str = "<memory>"
) -> tuple[dict[str, torch.Tensor], dict]:
    """Unwrap, strip prefixes and cast to float32.

    Returns:
        The state dict and a dict of the wrapper's non-tensor metadata (for example ``model_card``).
    """
    meta: dict = {}
    while isinstance(obj, Mapping) and not _is_state_dict(obj):
        key = next((k for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            raise CheckpointError(
                f"checkpoint {uri} holds no state dict: top-level keys are "
                f"{sorted(map(str, obj))}; "
                f"expected tensors or one of {list(_WRAPPER_KEYS)}"
            )
        meta.update({k: v for k, v in obj.items() if isinstance(v, (str, int, float))})
        obj = obj[key]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {uri} holds a {type(obj).__name__}, not a state dict")
    state_dict = {}
    for key, tensor in obj.items():
        for prefix in _KEY_PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        state_dict[key] = tensor.float() if tensor.is_floating_point() else tensor
    return state_dict, meta


def _is_state_dict(obj: Mapping) -> bool:
    return bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def mismatch(expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor],
             got_label: str = "checkpoint", expected_label: str = "model") -> list[str]:
    """Why ``got`` cannot load where ``expected`` does: its missing, unexpected and mis-shaped
    keys, a part for each kind that occurs (empty when the two fit)."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    mis_shaped = [
        f"{k}: {got_label} {tuple(v.shape)} vs {expected_label} {tuple(expected[k].shape)}"
        for k, v in got.items()
        if k in expected and v.shape != expected[k].shape
    ]
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected),
                        ("shape mismatch", mis_shaped)):
        if keys:
            more = f", ... ({len(keys)} in all)" if len(keys) > 8 else ""
            parts.append(f"{label}: " + ", ".join(keys[:8]) + more)
    return parts


def load_into(model: nn.Module, checkpoint: Checkpoint) -> None:
    """Load strictly; name every missing, unexpected and mis-shaped key on failure."""
    problems = mismatch(model.state_dict(), checkpoint.state_dict)
    if problems:
        raise CheckpointError("; ".join(
            [f"checkpoint {checkpoint.uri} does not fit {type(model).__name__}", *problems]))
    model.load_state_dict(checkpoint.state_dict, strict=True)
