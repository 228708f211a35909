"""Sharpness and fidelity measures on luminance."""

from __future__ import annotations

import numpy as np

# BT.601 luma weights; the same Y as MATLAB's rgb2ycbcr up to its offset and range.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
_LUMA = np.array(LUMA_WEIGHTS)


def luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., :3].astype(np.float64) @ _LUMA


def laplacian_variance(rgb: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian of the luminance (valid region); 0 below 3x3."""
    return float(laplacian_variance_of_luma(luminance(rgb)))


def tenengrad(rgb: np.ndarray) -> float:
    """Mean squared Sobel gradient magnitude of the luminance (valid region); 0 below 3x3."""
    return float(tenengrad_of_luma(luminance(rgb)))


# The two measures on luminance planes given as a numpy array or a torch tensor (on any
# device): slicing and arithmetic are the same in both, so the actor's device and the CPU share
# one definition (see pipeline.device_ops). The planes are the last two axes: a stack of images
# gives one value per image, from one set of operations for all of them. The values are left
# where they were computed (0-d for one plane): a GPU's results then cross to the host together.

def laplacian_variance_of_luma(y):
    if min(y.shape[-2:]) < 3:
        return y.sum(axis=(-2, -1)) * 0.0
    lap = (y[..., :-2, 1:-1] + y[..., 2:, 1:-1] + y[..., 1:-1, :-2] + y[..., 1:-1, 2:]
           - 4.0 * y[..., 1:-1, 1:-1])
    return ((lap - lap.mean(axis=(-2, -1))[..., None, None]) ** 2).mean(axis=(-2, -1))


def tenengrad_of_luma(y):
    if min(y.shape[-2:]) < 3:
        return y.sum(axis=(-2, -1)) * 0.0
    gx = ((y[..., :-2, 2:] + 2 * y[..., 1:-1, 2:] + y[..., 2:, 2:])
          - (y[..., :-2, :-2] + 2 * y[..., 1:-1, :-2] + y[..., 2:, :-2]))
    gy = ((y[..., 2:, :-2] + 2 * y[..., 2:, 1:-1] + y[..., 2:, 2:])
          - (y[..., :-2, :-2] + 2 * y[..., :-2, 1:-1] + y[..., :-2, 2:]))
    return (gx * gx + gy * gy).mean(axis=(-2, -1))


def y_channel(rgb: np.ndarray, rounded: bool = True) -> np.ndarray:
    """Y of MATLAB's rgb2ycbcr (range 16-235), the SR papers' PSNR channel.

    Args:
        rounded: round to integers, as rgb2ycbcr does for uint8 images: the ruler of the
            published tables. Unrounded Y reads about 0.03-0.07 dB higher.
    """
    y = 16.0 + rgb[..., :3].astype(np.float64) @ np.array([65.481, 128.553, 24.966]) / 255.0
    return np.floor(y + 0.5) if rounded else y  # MATLAB rounds halves away from zero


def psnr_y(restored: np.ndarray, reference: np.ndarray, shave: int = 2,
           rounded: bool = True) -> float:
    """PSNR on Y (rounded as the published tables, unless ``rounded=False``) with ``shave``
    border pixels removed; inf for identical images."""
    a, b = y_channel(restored, rounded), y_channel(reference, rounded)
    if shave:
        a, b = a[shave:-shave, shave:-shave], b[shave:-shave, shave:-shave]
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)


def _gaussian_blur(x: np.ndarray, sigma: float = 1.5, radius: int = 5) -> np.ndarray:
    """Separable Gaussian filter, valid region only (as SSIM's reference implementation)."""
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k /= k.sum()
    rows = sum(k[i] * x[:, i:x.shape[1] - 2 * radius + i] for i in range(2 * radius + 1))
    return sum(k[i] * rows[i:rows.shape[0] - 2 * radius + i, :] for i in range(2 * radius + 1))


def ssim_y(restored: np.ndarray, reference: np.ndarray, shave: int = 2) -> float:
    """SSIM (Wang et al. 2004: 11x11 Gaussian, sigma 1.5) on Y with ``shave`` pixels removed."""
    a, b = y_channel(restored), y_channel(reference)
    if shave:
        a, b = a[shave:-shave, shave:-shave], b[shave:-shave, shave:-shave]
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_a, mu_b = _gaussian_blur(a), _gaussian_blur(b)
    var_a = _gaussian_blur(a * a) - mu_a**2
    var_b = _gaussian_blur(b * b) - mu_b**2
    cov = _gaussian_blur(a * b) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(ssim_map.mean())


def colour_shift(restored: np.ndarray, reference: np.ndarray) -> float:
    """Drift of the mean colour in 8-bit levels: |d mean Cb| + |d mean Cr| (BT.601)."""
    cbcr = np.array([[-0.168736, 0.5], [-0.331264, -0.418688], [0.5, -0.081312]])
    a = restored[..., :3].astype(np.float64) @ cbcr
    b = reference[..., :3].astype(np.float64) @ cbcr
    return float(np.abs(a.mean(axis=(0, 1)) - b.mean(axis=(0, 1))).sum())


def overshoot(restored: np.ndarray, reference: np.ndarray, shave: int = 2) -> float:
    """Ringing and halos: the mean amount (Y levels) by which the restored image leaves the
    range of the reference's 3x3 neighbourhood, pixel by pixel. 0 when it never does."""
    a, b = y_channel(restored, rounded=False), y_channel(reference, rounded=False)
    h, w = b.shape
    shifted = [b[dy:h - 2 + dy, dx:w - 2 + dx] for dy in range(3) for dx in range(3)]
    hi, lo = np.max(shifted, axis=0), np.min(shifted, axis=0)
    a = a[1:-1, 1:-1]
    out = np.maximum(a - hi, 0) + np.maximum(lo - a, 0)
    s = max(0, shave - 1)
    return float(out[s:out.shape[0] - s, s:out.shape[1] - s].mean())
