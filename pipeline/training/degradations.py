"""Training pairs made the way real thumbnails are made.

A high-resolution crop is downscaled 2x (bicubic, area or Lanczos, with or without
antialiasing), maybe saved as JPEG at a random quality, maybe given mild noise, and finally
upscaled by the pipeline's own 2x bicubic, so that training sees exactly what inference sees.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline import imaging


@dataclass(frozen=True)
class Degradation:
    # Bicubic, the commonest thumbnailer kernel, three times as likely as each other one.
    kernels: tuple[str, ...] = ("bicubic", "bicubic", "bicubic", "area", "lanczos")
    aliased_p: float = 0.1  # share downscaled without antialiasing (naive resizers)
    jpeg_p: float = 0.4
    jpeg_quality: tuple[int, int] = (60, 95)
    noise_p: float = 0.15
    noise_sigma: tuple[float, float] = (0.5, 3.0)  # in 8-bit levels


_PIL = {"bicubic": Image.BICUBIC, "area": Image.BOX, "lanczos": Image.LANCZOS}
# JPEG works in 8x8 blocks of the small image and the resizers reach 4 pixels out; a margin
# this wide keeps the crop's border from looking unlike the inside of a real thumbnail.
MARGIN = 16


def downscale(hr: np.ndarray, kernel: str, antialias: bool) -> np.ndarray:
    if antialias:
        return imaging.downscale2x(hr, _PIL[kernel])
    x = torch.from_numpy(np.ascontiguousarray(hr)).permute(2, 0, 1)[None].float()
    mode = "bilinear" if kernel == "area" else "bicubic"
    y = F.interpolate(x, scale_factor=0.5, mode=mode, align_corners=False, antialias=False)
    return y[0].permute(1, 2, 0).round().clamp(0, 255).byte().numpy()


def degrade(hr: np.ndarray, rng: random.Random, d: Degradation) -> np.ndarray:
    """HR (even sides) -> a degraded 2x thumbnail -> the pipeline's bicubic 2x upscale."""
    lr = downscale(hr, rng.choice(d.kernels), antialias=rng.random() >= d.aliased_p)
    if rng.random() < d.noise_p:
        sigma = rng.uniform(*d.noise_sigma)
        noise = np.random.default_rng(rng.getrandbits(32)).normal(0, sigma, lr.shape)
        lr = np.clip(lr + noise, 0, 255).round().astype(np.uint8)
    if rng.random() < d.jpeg_p:
        buf = io.BytesIO()
        Image.fromarray(lr).save(buf, format="JPEG", quality=rng.randint(*d.jpeg_quality))
        lr = np.asarray(Image.open(buf).convert("RGB"))
    return imaging.upscale2x(lr)


def sample_pair(hr: np.ndarray, patch: int, rng: random.Random,
                d: Degradation) -> tuple[np.ndarray, np.ndarray]:
    """A random (input, target) crop of ``patch`` pixels, flipped and rotated at random."""
    h, w = hr.shape[:2]
    side = patch + 2 * MARGIN
    if h < side or w < side:
        raise ValueError(f"training image {w}x{h} is smaller than a {side}-pixel crop")
    y, x = 2 * rng.randrange((h - side) // 2 + 1), 2 * rng.randrange((w - side) // 2 + 1)
    crop = hr[y:y + side, x:x + side]
    src = degrade(crop, rng, d)[MARGIN:-MARGIN, MARGIN:-MARGIN]
    ref = crop[MARGIN:-MARGIN, MARGIN:-MARGIN]
    k = rng.randrange(4)
    src, ref = np.rot90(src, k), np.rot90(ref, k)
    if rng.random() < 0.5:
        src, ref = src[:, ::-1], ref[:, ::-1]
    return src, ref
