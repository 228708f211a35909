"""Sharpness and fidelity measures on luminance."""

from __future__ import annotations

import numpy as np

# BT.601 luma weights; the same Y as MATLAB's rgb2ycbcr up to its offset and range.
_LUMA = np.array([0.299, 0.587, 0.114])


def luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., :3].astype(np.float64) @ _LUMA


def laplacian_variance(rgb: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian of the luminance (valid region); 0 below 3x3."""
    y = luminance(rgb)
    if min(y.shape) < 3:
        return 0.0
    lap = y[:-2, 1:-1] + y[2:, 1:-1] + y[1:-1, :-2] + y[1:-1, 2:] - 4.0 * y[1:-1, 1:-1]
    return float(lap.var())


def tenengrad(rgb: np.ndarray) -> float:
    """Mean squared Sobel gradient magnitude of the luminance (valid region); 0 below 3x3."""
    y = luminance(rgb)
    if min(y.shape) < 3:
        return 0.0
    gx = (y[:-2, 2:] + 2 * y[1:-1, 2:] + y[2:, 2:]) - (y[:-2, :-2] + 2 * y[1:-1, :-2] + y[2:, :-2])
    gy = (y[2:, :-2] + 2 * y[2:, 1:-1] + y[2:, 2:]) - (y[:-2, :-2] + 2 * y[:-2, 1:-1] + y[:-2, 2:])
    return float(np.mean(gx * gx + gy * gy))


def y_channel(rgb: np.ndarray) -> np.ndarray:
    """Y of MATLAB's rgb2ycbcr (range 16-235) as float, the SR papers' PSNR channel."""
    return 16.0 + rgb[..., :3].astype(np.float64) @ np.array([65.481, 128.553, 24.966]) / 255.0


def psnr_y(restored: np.ndarray, reference: np.ndarray, shave: int = 2) -> float:
    """PSNR on Y with ``shave`` border pixels removed; inf for identical images."""
    a, b = y_channel(restored), y_channel(reference)
    if shave:
        a, b = a[shave:-shave, shave:-shave], b[shave:-shave, shave:-shave]
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)
