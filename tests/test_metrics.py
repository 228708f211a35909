from __future__ import annotations

import numpy as np

from pipeline import imaging, sharpness


def _checker(size=32):
    yy, xx = np.mgrid[0:size, 0:size]
    return np.repeat((((xx // 4 + yy // 4) % 2) * 255).astype(np.uint8)[..., None], 3, axis=2)


def test_flat_image_has_no_sharpness():
    flat = np.full((16, 16, 3), 128, np.uint8)
    assert sharpness.laplacian_variance(flat) == 0.0
    assert sharpness.tenengrad(flat) == 0.0


def test_blur_lowers_both_measures():
    sharp = _checker()
    blurred = imaging.upscale2x(imaging.downscale2x(sharp))
    assert sharpness.laplacian_variance(blurred) < sharpness.laplacian_variance(sharp)
    assert sharpness.tenengrad(blurred) < sharpness.tenengrad(sharp)


def test_tiny_images_are_defined():
    assert sharpness.laplacian_variance(np.zeros((2, 2, 3), np.uint8)) == 0.0


def test_psnr_y():
    img = _checker()
    assert sharpness.psnr_y(img, img) == float("inf")
    noisy = np.clip(img.astype(int) + 8, 0, 255).astype(np.uint8)
    assert 20 < sharpness.psnr_y(noisy, img) < 40
    # Y of white is 235 and of black 16, as MATLAB's rgb2ycbcr.
    assert round(sharpness.y_channel(np.array([[[255, 255, 255]]]))[0, 0], 3) == 235.0


def test_psnr_on_the_published_ruler_rounds_y_as_matlab():
    # rgb2ycbcr(uint8([100 150 200])) is 137 (136.88 before rounding); (1, 2, 3) gives 18 (17.56).
    pixels = np.array([[[100, 150, 200], [1, 2, 3]]], np.uint8)
    np.testing.assert_array_equal(sharpness.y_channel(pixels), [[137.0, 18.0]])
    np.testing.assert_allclose(sharpness.y_channel(pixels, rounded=False), [[136.88, 17.559]],
                               atol=5e-3)
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    noisy = np.clip(ref + rng.normal(0, 2, ref.shape), 0, 255).astype(np.uint8)
    # Rounding adds its own error to small differences, so the published ruler reads lower.
    assert sharpness.psnr_y(noisy, ref) < sharpness.psnr_y(noisy, ref, rounded=False)


def test_overshoot_sees_bicubic_ringing_but_not_blur():
    edges = (_checker() * (150 / 255) + 50).astype(np.uint8)  # room above and below for ringing
    ringing = imaging.upscale2x(imaging.downscale2x(edges))
    smooth = (edges.astype(float) + np.roll(edges, 1, axis=1)) / 2  # blur stays inside the range
    assert sharpness.overshoot(edges, edges) == 0.0
    assert sharpness.overshoot(smooth.round().astype(np.uint8), edges) == 0.0
    assert sharpness.overshoot(ringing, edges) > 1.0


def test_colour_shift_measures_a_tint_not_luminance():
    img = np.random.default_rng(0).integers(40, 200, (24, 24, 3)).astype(np.uint8)
    assert sharpness.colour_shift(img, img) == 0.0
    brighter = img + np.uint8(10)
    assert sharpness.colour_shift(brighter, img) < 1e-9
    redder = img.copy()
    redder[..., 0] += 10
    assert 5.0 < sharpness.colour_shift(redder, img) < 7.0
