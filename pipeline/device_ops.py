"""The 2x upscale and the sharpness measures as tensor operations, run by the restoring actor on
its device. On a GPU this moves the per-image CPU work that set the pace (bicubic, two
sharpness measures per image) next to the model, and the CPU tasks ship the decoded thumbnail:
a quarter of the pixels of the 2x image.

The upscale is Pillow's bicubic (a = -0.5, as :func:`pipeline.imaging.upscale2x`), not
``F.interpolate``'s (a = -0.75), computed as Pillow computes it: the same resampling weights
(taps outside the image dropped, the rest renormalised), quantised to Pillow's 22 fractional bits,
the horizontal pass first and rounded to 8 bits in between. In float64 every sum is exact, so the
result equals Pillow's pixel for pixel.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Sequence

import numpy as np
import torch

from pipeline.sharpness import LUMA_WEIGHTS, laplacian_variance_of_luma, tenengrad_of_luma

_PRECISION_BITS = 22  # Pillow's fixed point for 8-bit images (Resample.c)


def _resampling_matrix(in_size: int, out_size: int) -> np.ndarray:
    """``out_size x in_size`` weights of Pillow's bicubic resize along one axis, as the
    integers (in units of 2**-22) Pillow uses."""
    a, scale = -0.5, in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    matrix = np.zeros((out_size, in_size))
    for out in range(out_size):
        center = (out + 0.5) * scale
        first = max(int(center - support + 0.5), 0)
        last = min(int(center + support + 0.5), in_size)
        x = np.abs((np.arange(first, last) - center + 0.5) / filterscale)
        w = np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                     np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))
        if w.sum():
            w = w / w.sum() * (1 << _PRECISION_BITS)
            matrix[out, first:last] = np.where(w < 0, np.ceil(w - 0.5), np.floor(w + 0.5))
    return matrix


@functools.lru_cache(maxsize=256)
def _matrix(in_size: int, out_size: int, device: torch.device) -> torch.Tensor:
    # Kept on the device: thumbnails' sizes repeat, and copying a fresh matrix (about 1 MB for
    # a 240-pixel side) to a GPU for each image would make the actor wait on it each time.
    return torch.from_numpy(_resampling_matrix(in_size, out_size)).to(device)


def _round(sums: torch.Tensor, peak: int) -> torch.Tensor:
    """Pillow's rounding of fixed-point sums: add a half, shift right, clip (to ``peak``)."""
    half, one = 1 << (_PRECISION_BITS - 1), 1 << _PRECISION_BITS
    return sums.add_(half).div_(one).floor_().clamp_(0, peak)


# 16-bit images live on the device as int32: torch's uint16 lacks most operations. Their values
# are 0-65535; an 8-bit image's are uint8.
WIDE = torch.int32


def peak_of(images: torch.Tensor) -> int:
    return 65535 if images.dtype == WIDE else 255


# Pixels per operation, by device. On a GPU a block's images of one shape go through the upscale
# and the measures together, one set of operations (kernel launches) per shape rather than per
# image, in parts small enough to bound the float temporaries (~0.4 GB at float64 x 3 channels).
# On a CPU, one image at a time: its temporaries stay in the cache (a stack of 16 480x320 images
# took 1.4-2.9x longer per image here).
_PART_PIXELS = {"cpu": 0, "cuda": 1 << 24}


def _parts(stack: torch.Tensor, scale: int = 1) -> list[torch.Tensor]:
    """``N x H x W x C`` in slices of at most the device's part size in pixels (``scale``: of
    the output), one image at least."""
    budget = _PART_PIXELS.get(stack.device.type, _PART_PIXELS["cuda"])
    step = max(1, budget // (scale * scale * stack.shape[1] * stack.shape[2]))
    return [stack[i:i + step] for i in range(0, len(stack), step)]


def upscale2x(images: torch.Tensor) -> torch.Tensor:
    """``H x W x 3`` uint8 (or 16-bit, :data:`WIDE`), or a stack ``N x H x W x 3`` of images of
    one shape, -> ``(N x) 2H x 2W x 3`` of the same dtype, on the images' device."""
    if images.dim() == 3:
        return upscale2x(images[None])[0]
    n, h, w, c = images.shape
    peak = peak_of(images)
    out = torch.empty((n, 2 * h, 2 * w, c), dtype=images.dtype, device=images.device)
    start = 0
    for part in _parts(images, scale=2):
        x = part.to(torch.float64)
        x = _round(torch.einsum("ow,nhwc->nhoc", _matrix(w, 2 * w, x.device), x), peak)
        x = _round(torch.einsum("oh,nhwc->nowc", _matrix(h, 2 * h, x.device), x), peak)
        out[start:start + len(part)] = x
        start += len(part)
    return out


def _luminance(image: torch.Tensor) -> torch.Tensor:
    # float64 where it is cheap (CPU), float32 on a GPU: the measures agree to ~1e-6 relative.
    dtype = torch.float64 if image.device.type == "cpu" else torch.float32
    # 16-bit images are measured on the 8-bit scale, so that every row's measures compare.
    scale = 255.0 / peak_of(image)
    weights = torch.tensor(LUMA_WEIGHTS, dtype=dtype, device=image.device) * scale
    return image[..., :3].to(dtype) @ weights


def sharpness(stacks: Sequence[torch.Tensor]) -> list[tuple[float, float]]:
    """:func:`pipeline.sharpness.laplacian_variance` and :func:`pipeline.sharpness.tenengrad` of
    each image of ``stacks`` (each an ``H x W x 3`` image or an ``N x H x W x 3`` stack of one
    shape), in order, on the host (one wait for the device per call)."""
    return [(a, b) for a, b in sharpness_on_device(stacks).to(torch.float64).tolist()]


def sharpness_on_device(stacks: Sequence[torch.Tensor]) -> torch.Tensor:
    """:func:`sharpness` left on the device, an ``N x 2`` tensor, computed a stack at a time
    without waiting for the device."""
    values = []
    for stack in stacks:
        for part in _parts(stack if stack.dim() == 4 else stack[None]):
            y = _luminance(part)
            values.append(torch.stack([laplacian_variance_of_luma(y),
                                       tenengrad_of_luma(y)], dim=-1))
    return torch.cat(values) if values else torch.empty((0, 2), dtype=torch.float64)


def to_device_by_shape(arrays: Sequence[np.ndarray],
                       device: torch.device) -> tuple[list[list[int]], list[torch.Tensor]]:
    """``arrays`` grouped by shape and dtype (their indices, groups in order of first
    appearance) and each group as one stack on ``device`` (see :func:`stacks_to_device`)."""
    by_shape: dict[tuple, list[int]] = {}
    for i, array in enumerate(arrays):
        by_shape.setdefault((array.shape, array.dtype.str), []).append(i)
    groups = list(by_shape.values())
    return groups, stacks_to_device([[arrays[i] for i in group] for group in groups], device)


_HOST_DTYPES = {np.dtype(np.uint8): torch.uint8, np.dtype(np.uint16): WIDE}


def stacks_to_device(groups: Sequence[Sequence[np.ndarray]],
                     device: torch.device) -> list[torch.Tensor]:
    """Each group of host arrays of one shape and dtype (uint8, or uint16 which arrives as
    :data:`WIDE`) as one ``N x ...`` tensor on ``device``. The groups of a dtype are laid out in
    one buffer (pinned, for a GPU) and cross in one non-blocking copy."""
    stacks: list[torch.Tensor | None] = [None] * len(groups)
    for source, dtype in _HOST_DTYPES.items():
        mine = [i for i, group in enumerate(groups) if group[0].dtype == source]
        if not mine:
            continue
        sizes = [len(groups[i]) * groups[i][0].size for i in mine]
        host = torch.empty(sum(sizes), dtype=dtype, pin_memory=device.type == "cuda")
        flat, offset = host.numpy(), 0
        for i in mine:
            for array in groups[i]:
                flat[offset:offset + array.size] = array.reshape(-1)
                offset += array.size
        on_device = host.to(device, non_blocking=True)
        offset = 0
        for i, size in zip(mine, sizes):
            stacks[i] = on_device[offset:offset + size].view(len(groups[i]), *groups[i][0].shape)
            offset += size
    missing = [group[0].dtype for group, stack in zip(groups, stacks) if stack is None]
    if missing:
        raise TypeError(f"images must be uint8 or uint16, not {missing[0]}")
    return stacks  # type: ignore[return-value]


class HostCopy:
    """Tensors on their way to the host: one copy per dtype, into pinned memory without waiting
    on a GPU, so the host can do other work meanwhile. :meth:`arrays` reads them once the device
    is past the copy (a :class:`Fence` made after it reached)."""

    def __init__(self, tensors: Sequence[torch.Tensor]):
        self.tensors = list(tensors)
        self.flat: dict[torch.dtype, torch.Tensor] = {}
        for dtype in dict.fromkeys(t.dtype for t in self.tensors):
            flat = torch.cat([t.reshape(-1) for t in self.tensors if t.dtype == dtype])
            if flat.device.type != "cpu":
                host = torch.empty(flat.shape, dtype=dtype, pin_memory=True)
                flat = host.copy_(flat, non_blocking=True)
            self.flat[dtype] = flat

    def arrays(self) -> list[np.ndarray]:
        """The tensors' values as host arrays, in order; 16-bit images (:data:`WIDE`) as
        uint16."""
        out: list[np.ndarray | None] = [None] * len(self.tensors)
        for dtype, flat in self.flat.items():
            mine = [i for i, t in enumerate(self.tensors) if t.dtype == dtype]
            values = flat.numpy()
            if dtype == WIDE:
                values = values.astype(np.uint16)
            parts = np.split(values, np.cumsum([self.tensors[i].numel() for i in mine])[:-1])
            for i, part in zip(mine, parts):
                out[i] = part.reshape(self.tensors[i].shape)
        return out  # type: ignore[return-value]


def to_host(tensors: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """The tensors' values on the host, in one device-to-host copy per dtype, waiting for them;
    16-bit images (:data:`WIDE`) come back as uint16."""
    copy = HostCopy(tensors)
    if any(t.device.type == "cuda" for t in copy.tensors):
        torch.cuda.synchronize()
    return copy.arrays()


class Fence:
    """How far the work launched on ``device`` had got when this was made. On a GPU, an event
    in its queue: the host goes on while the device works, and waits (:meth:`reached`) only for
    results it needs, in a thread that yields its core (a blocking-sync event) and the GIL. On a
    CPU, torch's work is done when its call returns: nothing to wait for."""

    def __init__(self, device: torch.device):
        self.event = None
        if device.type == "cuda":
            self.event = torch.cuda.Event(blocking=True)
            self.event.record()

    async def reached(self) -> None:
        if self.event is not None and not self.event.query():
            await asyncio.to_thread(self.event.synchronize)
