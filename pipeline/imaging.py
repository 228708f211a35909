"""Pixels: decode any image to upright RGB within limits, 2x bicubic upscale, encode."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
from isal import isal_zlib
from PIL import Image, ImageOps

from pipeline.config import LimitsConfig

OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
EXTENSIONS = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class ImageError(ValueError):
    """The bytes are not an image this pipeline can restore; the message is the row's reason."""


# The decoder's limits are the config's limits section (``max_error_rate`` is the run's).
DecodeLimits = LimitsConfig
DEFAULT_LIMITS = DecodeLimits()


def decode(data: bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> np.ndarray:
    """Decode to an upright ``H x W x 3`` uint8 RGB array.

    EXIF orientation is applied, animations give their first frame, 16- and 32-bit grey images
    are scaled to 8 bits by their bit depth and float images from their nominal 0-1 range, and
    transparency is composited over white (the output has no alpha channel).

    Raises:
        ImageError: empty, oversized, unreadable or truncated input, with a readable reason.
    """
    if not data:
        raise ImageError("empty file (0 bytes)")
    if len(data) > limits.max_bytes:
        raise ImageError(f"file is {len(data)} bytes, above the limit of {limits.max_bytes}")
    try:
        with warnings.catch_warnings():
            # Pillow warns, then raises, on bombs; our own limit below applies first.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > limits.max_pixels:
                raise ImageError(
                    f"image is {w}x{h} = {w * h} pixels, above the limit of {limits.max_pixels}"
                )
            img.load()
            img = ImageOps.exif_transpose(img)
            return _to_rgb(img)
    except ImageError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise ImageError(f"decompression bomb refused: {e}") from e
    except Image.UnidentifiedImageError as e:
        raise ImageError(f"not a recognised image format ({_sniff(data)})") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"cannot decode image: {e}") from e


def _to_rgb(img: Image.Image) -> np.ndarray:
    if img.mode.startswith("I") or img.mode == "F":
        # Pillow clips these to 8 bits on convert(); scale by the format's range instead, never
        # by the values (a dark 16-bit image is not an 8-bit one).
        wide = np.asarray(img, dtype=np.float64)
        peak = 1.0 if img.mode == "F" else _peak(img)
        grey = np.clip(np.rint(wide * (255.0 / peak)), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def _peak(img: Image.Image) -> float:
    """White of an integer grey image, from its bit depth: 16 bits for ``I;16*`` and PNG (Pillow
    reads 16-bit PNG as ``I`` in some versions), else TIFF's BitsPerSample; Pillow's ``I`` is a
    signed 32-bit integer."""
    if img.mode.startswith("I;16") or img.format == "PNG":
        return 65535.0
    bits = getattr(img, "tag_v2", {}).get(258)  # TIFF BitsPerSample
    bits = int(bits[0] if isinstance(bits, tuple) else bits) if bits else 32
    return float(2 ** (bits - 1) - 1 if bits == 32 else 2**bits - 1)


def _sniff(data: bytes) -> str:
    head = data[:64].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")):
        return "looks like an HTML page"
    if all(32 <= b < 127 or b in (9, 10, 13) for b in data[:512]):
        return "looks like text"
    return f"starts with bytes {data[:8].hex()}"


def upscale2x(rgb: np.ndarray) -> np.ndarray:
    """Bicubic 2x upscale; the model's input and the baseline it must beat."""
    h, w = rgb.shape[:2]
    return np.asarray(Image.fromarray(rgb).resize((2 * w, 2 * h), Image.BICUBIC))


def downscale2x(rgb: np.ndarray, method: int = Image.BICUBIC) -> np.ndarray:
    """Antialiased 2x downscale (Pillow scales the kernel, like MATLAB's imresize)."""
    h, w = rgb.shape[:2]
    return np.asarray(Image.fromarray(rgb).resize((w // 2, h // 2), method))


def encode(rgb: np.ndarray, fmt: str = "png", quality: int = 95, png_level: int = 1) -> bytes:
    """Encode ``H x W x 3`` uint8 as PNG (zlib level ``png_level``), JPEG or WebP."""
    if fmt == "png":
        return encode_png(rgb, png_level)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=OUTPUT_FORMATS[fmt], quality=quality)
    return buf.getvalue()


def encode_png(rgb: np.ndarray, level: int = 1) -> bytes:
    """``H x W x 3`` uint8 as an 8-bit RGB PNG, every row with the Sub filter, deflated at
    ``level``: 1-3 by ISA-L, which on a 480x320 photograph took 1.4 ms where zlib's level 1
    took 6.4 ms for the same size; 0 (stored) and 4-9 by zlib. Pillow's encoder, which tries
    filters per row, took 10 ms at its level 1, and the encode is most of the CPU work per
    image.
    """
    h, w, _ = rgb.shape
    pixels = np.ascontiguousarray(rgb, np.uint8).reshape(h, 3 * w)
    rows = np.empty((h, 1 + 3 * w), np.uint8)
    rows[:, 0] = 1  # filter type Sub: each byte less the same channel of the pixel to its left
    rows[:, 1:] = pixels
    rows[:, 4:] -= pixels[:, :-3]  # uint8 arithmetic wraps modulo 256, as PNG's filters do
    data = isal_zlib.compress(rows, level) if 1 <= level <= 3 else zlib.compress(rows, level)
    return b"".join([b"\x89PNG\r\n\x1a\n",
                     _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)),
                     _png_chunk(b"IDAT", data), _png_chunk(b"IEND", b"")])


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
