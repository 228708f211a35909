"""The restorer: any image size in, same size out, in shape-grouped batches or bounded tiles."""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline import device_ops
from pipeline.config import ConfigError, InferenceConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# The restorer's settings are the config's inference section: one declaration and one default
# per setting (``device`` is the actor's to resolve; the restorer takes a resolved one).
InferenceSettings = InferenceConfig


def to_model_input(pixels: torch.Tensor) -> torch.Tensor:
    """``N x H x W x 3`` uint8 pixels (or 16-bit ones, ``device_ops.WIDE``) -> the network's
    input, ``N x 3 x H x W`` float in [0, 1]. The one conversion: the restorer, training and the
    benchmark all use it."""
    return pixels.permute(0, 3, 1, 2).float().div_(float(device_ops.peak_of(pixels)))


def from_model_output(y: torch.Tensor, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """The network's ``N x 3 x H x W`` output -> ``N x H x W x 3`` pixels of ``dtype`` (uint8,
    or ``device_ops.WIDE`` for 16 bits): clamped to [0, 1], scaled and rounded (not
    truncated), so a 16-bit output is quantised from the float output, not widened."""
    peak = 65535.0 if dtype == device_ops.WIDE else 255.0
    return y.float().clamp_(0.0, 1.0).mul_(peak).round_().to(dtype).permute(
        0, 2, 3, 1).contiguous()


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was requested but torch sees no CUDA device; "
                          "use --device auto or cpu")
    return torch.device(requested)


def resolve_precision(requested: str, device: torch.device) -> str:
    """The precision the weights are cast to: ``requested``, or for ``auto`` the fastest one
    that keeps quality (bf16 moves Set5 PSNR-Y by about 0.005 dB) on this device."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16"
    # Without native bf16 instructions oneDNN emulates it, slower than float32.
    return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


class Restorer:
    """Runs a MIMO-UNet over RGB images of any size, 8-bit or 16-bit (``device_ops.WIDE``).

    Images are padded by mirroring up to a bucket shape (each side a multiple of
    ``settings.bucket``), batched with the others of that bucket, and cropped back; outputs are
    clamped to [0, 1] and rounded to 8 bits. Images larger than ``settings.tile`` are cut into
    overlapping tiles so that memory stays bounded whatever the input. With
    ``settings.self_ensemble`` the output is the mean of the model over the image's 8 flips and
    90-degree rotations, each turned back.
    """

    def __init__(self, model: nn.Module, device: torch.device, settings: InferenceSettings):
        self.device = device
        self.settings = settings
        self.precision = resolve_precision(settings.precision, device)
        # Weights cast once here, not by autocast on every call; the network keeps its skip
        # connections at the input's float32 (see MIMOUNet). A copy: the caller's model (one
        # being trained, say) keeps its own dtype and device.
        self.eager = copy.deepcopy(model).to(device, DTYPES[self.precision]).eval()
        self.eager = self.eager.to(memory_format=torch.channels_last)
        self.model = (self.eager if settings.compile == "none"
                      else torch.compile(self.eager, mode=settings.compile))
        cuda = device.type == "cuda"
        self.bucket = settings.bucket if settings.bucket != "auto" else (64 if cuda else 4)
        # None: sized per shape from free memory (CUDA); lowered for the rest of the actor's
        # life when a batch runs out of device memory.
        self.batch_size: int | None = (settings.batch_size if settings.batch_size != "auto"
                                       else None if cuda else 1)
        self._bytes_per_pixel: float | None = None

    def restore(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Restore each ``H x W x 3`` uint8 image; returns images of the same shapes."""
        groups, stacks = device_ops.to_device_by_shape(images, self.device)
        results: list[np.ndarray | None] = [None] * len(images)
        for group, out in zip(groups, device_ops.to_host(self.restore_stacks(stacks))):
            for i, image in zip(group, out):
                results[i] = image
        return results  # type: ignore[return-value]

    def restore_stacks(self, stacks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """:meth:`restore` for stacks of images on the device, each ``N x H x W x 3`` uint8 of
        one shape; the results stay there (for the sharpness measures), so an image crosses to
        the device once. The stacks that fall into one bucket shape run together, padded."""
        results: list[torch.Tensor | None] = [None] * len(stacks)
        by_bucket: dict[tuple[torch.dtype, int, int], list[int]] = defaultdict(list)
        # The self-ensemble flips and turns what it is given: padding on one side only would
        # turn with it, so it pads no more than the network needs.
        g = 4 if self.settings.self_ensemble else self.bucket
        for i, stack in enumerate(stacks):
            h, w = stack.shape[1:3]
            if max(h, w) > self.settings.tile:
                results[i] = torch.stack([self._restore_tiled(img) for img in stack])
            else:
                by_bucket[stack.dtype, -(-h // g) * g, -(-w // g) * g].append(i)
        for (_, bh, bw), members in by_bucket.items():
            padded = [_pad(stacks[i], bh, bw) for i in members]
            batch = padded[0] if len(padded) == 1 else torch.cat(padded)
            outs, start = [], 0
            while start < len(batch):
                outs.append(self._run_fitting(batch[start:start + self.batch_for(bh, bw)]))
                start += len(outs[-1])
            out = outs[0] if len(outs) == 1 else torch.cat(outs)
            start = 0
            for i in members:
                n, h, w = stacks[i].shape[:3]
                results[i] = out[start:start + n, :h, :w]
                start += n
        return results  # type: ignore[return-value]

    def _run_fitting(self, batch: torch.Tensor) -> torch.Tensor:
        """:meth:`_run`, halving the batch (and the actor's batch size from then on) while the
        device runs out of memory; a single image that does not fit raises."""
        try:
            return self._run(batch)
        except torch.OutOfMemoryError:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(batch) == 1:
                raise
        self.batch_size = max(1, min(self.batch_size or len(batch), len(batch) // 2))
        parts, start = [], 0
        while start < len(batch):  # the batch size may fall further on the way
            parts.append(self._run_fitting(batch[start:start + self.batch_size]))
            start += len(parts[-1])
        return torch.cat(parts)

    def batch_for(self, h: int, w: int) -> int:
        """Images of ``h x w`` per forward: the set batch size, or on CUDA what fits in 70% of
        the free memory, at the memory per pixel measured by one probe forward."""
        if self.batch_size is not None:
            return self.batch_size
        if self._bytes_per_pixel is None:
            self._bytes_per_pixel = self._probe_bytes_per_pixel()
        free, _ = torch.cuda.mem_get_info(self.device)
        cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        return batch_that_fits(0.7 * (free + cached), self._bytes_per_pixel, h, w)

    def _probe_bytes_per_pixel(self, side: int = 256) -> float:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        # Eager: a compile for the probe's shape alone would cost the actor a minute on a GPU,
        # and eager's intermediates are the larger, so the batch errs small.
        self._run(torch.zeros((2, side, side, 3), dtype=torch.uint8, device=self.device),
                  self.eager)
        return (torch.cuda.max_memory_allocated(self.device) - before) / (2 * side * side)

    def _restore_tiled(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[:2]
        overlap = self.settings.tile_overlap
        step = self.settings.tile - 2 * overlap
        out = torch.empty_like(img)
        for y in range(0, h, step):
            for x in range(0, w, step):
                y0, x0 = max(0, y - overlap), max(0, x - overlap)
                y1, x1 = min(h, y + step + overlap), min(w, x + step + overlap)
                restored = self._run(img[None, y0:y1, x0:x1])[0]
                out[y:y + step, x:x + step] = restored[y - y0:y - y0 + step, x - x0:x - x0 + step]
        return out

    @torch.inference_mode()
    def _run(self, batch: torch.Tensor, model: nn.Module | None = None) -> torch.Tensor:
        """``N x H x W x 3`` uint8 on the device (one shape) -> restored, the same."""
        model = self.model if model is None else model
        n, h, w, _ = batch.shape
        x = _pad_to_multiple(to_model_input(batch), 4).contiguous(
            memory_format=torch.channels_last)
        y = self._ensemble(x, model) if self.settings.self_ensemble else model(x)[-1]
        return from_model_output(y[:, :, :h, :w], batch.dtype)

    def _ensemble(self, x: torch.Tensor, model: nn.Module) -> torch.Tensor:
        total = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for k in range(4):
            for flip in (False, True):
                t = torch.rot90(x, k, (2, 3))
                y = model(t.flip(3) if flip else t)[-1].float()
                total += torch.rot90(y.flip(3) if flip else y, -k, (2, 3))
        return total / 8


MAX_BATCH = 128  # past this a GPU gains nothing (docs/performance.md, the H200)


def batch_that_fits(budget_bytes: float, bytes_per_pixel: float, h: int, w: int) -> int:
    """How many ``h x w`` images fit in ``budget_bytes`` at ``bytes_per_pixel``: 1 to
    MAX_BATCH."""
    return int(max(1, min(MAX_BATCH, budget_bytes // max(1.0, bytes_per_pixel * h * w))))


def _pad(img: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``img`` (``... x H x W x C``) extended to ``h x w`` by mirroring its edges, edge pixels
    included, as numpy's "symmetric" mode; any size, 1x1 too (mirrored again as needed)."""
    for dim, size in ((-3, h), (-2, w)):
        while img.shape[dim] < size:
            more = min(img.shape[dim], size - img.shape[dim])
            img = torch.cat([img, img.flip(dim).narrow(dim, 0, more)], dim)
    return img


def _pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    if not (ph or pw):
        return x
    # Reflection needs the pad to be smaller than the side; tiny images replicate instead.
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)
