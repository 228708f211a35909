"""Decoding every kind of input to upright RGB, limits, upscale and encode."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline import imaging
from pipeline.imaging import DecodeLimits, ImageError

from .conftest import REPO


def _bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


RGB = Image.fromarray(np.random.default_rng(0).integers(0, 255, (12, 20, 3), dtype=np.uint8))


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "RGBA", "LA", "CMYK", "I;16", "1"])
def test_modes_become_rgb(mode):
    img = RGB.convert(mode) if mode != "I;16" else Image.fromarray(
        np.arange(240, dtype=np.uint16).reshape(12, 20) * 250)
    fmt = "JPEG" if mode == "CMYK" else "TIFF" if mode == "LA" else "PNG"
    out = imaging.decode(_bytes(img, fmt))
    assert out.shape == (12, 20, 3) and out.dtype == np.uint8


def test_sixteen_bit_keeps_its_range():
    wide = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert imaging.decode(_bytes(wide, "PNG")).min() == 255


def test_transparent_pixels_become_white():
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert (imaging.decode(_bytes(rgba, "PNG")) == 255).all()


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    out = imaging.decode(_bytes(RGB, "JPEG", exif=exif.tobytes()))
    assert out.shape == (20, 12, 3)


def test_animated_gif_gives_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    out = imaging.decode(buf.getvalue())
    assert out[0, 0, 0] > 200 and out[0, 0, 2] < 50


@pytest.mark.parametrize("data, reason", [
    (b"", "empty file"),
    (b"hello, this is text\n", "looks like text"),
    (b"<!DOCTYPE html><html><body>503</body></html>", "HTML page"),
    (bytes(range(256)) * 4, "not a recognised image"),
    (_bytes(RGB, "JPEG")[:60], "cannot decode"),
    (_bytes(RGB, "PNG")[:-30], "cannot decode"),
])
def test_bad_input_has_a_reason(data, reason):
    with pytest.raises(ImageError, match=reason):
        imaging.decode(data)


def test_limits_apply_before_decoding():
    big = _bytes(Image.new("RGB", (300, 300)), "PNG")
    with pytest.raises(ImageError, match="above the limit of 1000"):
        imaging.decode(big, DecodeLimits(max_pixels=1000))
    with pytest.raises(ImageError, match="bytes, above the limit"):
        imaging.decode(big, DecodeLimits(max_bytes=10))


def test_decompression_bomb_is_refused_cheaply():
    # A 1-bit PNG declaring 30000 x 30000 pixels in a few kilobytes.
    bomb = _bytes(Image.new("1", (30000, 30000)), "PNG")
    assert len(bomb) < 200_000
    with pytest.raises(ImageError, match="decompression bomb refused"):
        imaging.decode(bomb)


def test_upscale_doubles_and_preserves_flat_colour():
    flat = np.full((5, 7, 3), 77, np.uint8)
    up = imaging.upscale2x(flat)
    assert up.shape == (10, 14, 3) and (up == 77).all()


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_encode_round_trips(fmt):
    rgb = np.asarray(RGB)
    back = np.asarray(Image.open(io.BytesIO(imaging.encode(rgb, fmt, 100))).convert("RGB"))
    assert back.shape == rgb.shape
    if fmt == "png":
        assert (back == rgb).all()


@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (7, 1), (31, 17)])
@pytest.mark.parametrize("level", [0, 1, 9])
def test_png_writer_is_lossless_at_every_shape_and_level(shape, level):
    rgb = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), dtype=np.uint8)
    with Image.open(io.BytesIO(imaging.encode_png(rgb, level))) as img:
        assert (img.mode, img.size) == ("RGB", shape[::-1])
        assert (np.asarray(img) == rgb).all()
    view = np.asarray(RGB)[1:, ::2]  # not contiguous
    assert (np.asarray(Image.open(io.BytesIO(imaging.encode_png(view, level)))) == view).all()


def test_png_writer_compresses_photographs_like_pillow():
    photo = np.asarray(Image.open(sorted((REPO / "samples" / "thumbnails").glob("*.png"))[0])
                       .convert("RGB"))
    ours = len(imaging.encode_png(photo, 1))
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, "PNG", compress_level=1)
    assert ours < 1.1 * len(buf.getvalue())
