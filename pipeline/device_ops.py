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

import functools
from collections.abc import Sequence

import numpy as np
import torch

from pipeline import metrics

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


def _to_8bit(sums: torch.Tensor) -> torch.Tensor:
    """Pillow's rounding of fixed-point sums: add a half, shift right, clip."""
    half, one = 1 << (_PRECISION_BITS - 1), 1 << _PRECISION_BITS
    return sums.add_(half).div_(one).floor_().clamp_(0, 255)


def upscale2x(image: torch.Tensor) -> torch.Tensor:
    """``H x W x 3`` uint8 -> ``2H x 2W x 3`` uint8, on ``image``'s device."""
    h, w = image.shape[:2]
    x = image.to(torch.float64)
    x = _to_8bit(torch.einsum("ow,hwc->hoc", _matrix(w, 2 * w, x.device), x))
    x = _to_8bit(torch.einsum("oh,hwc->owc", _matrix(h, 2 * h, x.device), x))
    return x.to(torch.uint8)


def _luminance(image: torch.Tensor) -> torch.Tensor:
    # float64 where it is cheap (CPU), float32 on a GPU: the measures agree to ~1e-6 relative.
    dtype = torch.float64 if image.device.type == "cpu" else torch.float32
    weights = torch.tensor(metrics.LUMA_WEIGHTS, dtype=dtype, device=image.device)
    return image[..., :3].to(dtype) @ weights


def sharpness(images: Sequence[torch.Tensor]) -> list[tuple[float, float]]:
    """:func:`pipeline.metrics.laplacian_variance` and :func:`pipeline.metrics.tenengrad` of
    each image, computed on its device and brought to the host in one transfer: one wait for the
    device per batch instead of two per image."""
    if not images:
        return []
    values = []
    for image in images:
        y = _luminance(image)
        values += [metrics.laplacian_variance_of_luma(y), metrics.tenengrad_of_luma(y)]
    host = torch.stack([v.to(torch.float64) for v in values]).tolist()
    return list(zip(host[0::2], host[1::2]))


def to_host(images: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """The images' pixels on the host, in one device-to-host copy for all of them."""
    if not images:
        return []
    flat = torch.cat([image.reshape(-1) for image in images]).cpu().numpy()
    sizes = [image.numel() for image in images]
    parts = np.split(flat, np.cumsum(sizes)[:-1])
    return [part.reshape(image.shape) for part, image in zip(parts, images)]
