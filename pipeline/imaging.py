"""Pixels: decode any image within limits to upright RGB with its alpha, colour profile and
metadata; 2x bicubic upscale; encode with all of them."""

from __future__ import annotations

import io
import struct
import sys
import warnings
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from isal import isal_zlib
from PIL import Image

from pipeline import colour, image_metadata
from pipeline.config import LimitsConfig

OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
EXTENSIONS = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class ImageError(ValueError):
    """The bytes are not an image this pipeline can restore; the message is the row's reason."""


# The decoder's limits are the config's limits section (``max_error_rate`` is the run's).
DecodeLimits = LimitsConfig
DEFAULT_LIMITS = DecodeLimits()


@dataclass
class Decoded:
    """An input as the restoring stages need it: upright pixels in RGB, the alpha plane apart,
    and what the output must carry (the colour profile to embed, the metadata blocks)."""

    rgb: np.ndarray  # H x W x 3: uint8, or uint16 for 16-bit inputs
    alpha: np.ndarray | None  # H x W, the same dtype; None for inputs without transparency
    icc: bytes | None  # the profile the output embeds; None: untagged (sRGB)
    profile: str | None  # the input's profile, by its description; None: untagged
    colour: str  # how colour was handled (see pipeline.colour)
    blocks: dict[str, bytes]  # the input's EXIF, XMP and IPTC (see pipeline.image_metadata)
    notes: list[str]  # what could not be read or kept, for the row's record

    @property
    def depth(self) -> int:
        return 16 if self.rgb.dtype == np.uint16 else 8


def decode(data: bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> np.ndarray:
    """Decode to an upright ``H x W x 3`` uint8 RGB array, transparency composited over white
    (for training, evaluation and the report; the restore job keeps alpha: :func:`read`)."""
    image = read(data, limits)
    return flatten(to_8bit(image.rgb), None if image.alpha is None else to_8bit(image.alpha))


def read(data: bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> Decoded:
    """Decode any image within ``limits``: EXIF orientation applied, the first frame of an
    animation, colour through its ICC profile (:func:`pipeline.colour.manage`), 16-bit RGB and
    grey kept at 16 bits, 32-bit and float grey scaled to 16 bits by their nominal range, and
    the colour under fully transparent pixels filled from their visible neighbours.

    Raises:
        ImageError: empty, oversized, unreadable or truncated input, or a colour profile that
            the pixels need and that cannot be used, with a readable reason.
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
            tiles = list(img.tile)  # load() forgets them; a 16-bit image decodes them again
            img.load()
            return _read(img, data, tiles)
    except ImageError:
        raise
    except colour.ColourError as e:
        raise ImageError(str(e)) from e
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise ImageError(f"decompression bomb refused: {e}") from e
    except Image.UnidentifiedImageError as e:
        raise ImageError(f"not a recognised image format ({_sniff(data)})") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"cannot decode image: {e}") from e


def _read(img: Image.Image, data: bytes, tiles: list) -> Decoded:
    blocks, unreadable = image_metadata.read_blocks(img)
    notes = [f"{name} (unreadable)" for name in unreadable]
    try:
        orientation = int(img.getexif().get(_ORIENTATION, 1))
    except Exception:
        orientation = 1
    managed = colour.manage(img)
    wide = _wide(img, data, tiles, notes) if managed.image is img else None
    if wide is not None:
        rgb, alpha = wide[..., :3], wide[..., 3] if wide.shape[2] == 4 else None
    else:
        rgb, alpha = _planes(managed.image)
    if alpha is not None:
        rgb = bleed(rgb, alpha > 0)
    rgb, alpha = _upright(rgb, orientation), None if alpha is None else _upright(alpha,
                                                                                 orientation)
    return Decoded(np.ascontiguousarray(rgb), None if alpha is None else
                   np.ascontiguousarray(alpha), managed.icc, managed.profile,
                   managed.handling, blocks, notes)


_ORIENTATION = 0x0112


def _upright(a: np.ndarray, orientation: int) -> np.ndarray:
    """``a`` turned as EXIF ``orientation`` says (Pillow's ``ImageOps.exif_transpose``)."""
    return {2: lambda: a[:, ::-1], 3: lambda: a[::-1, ::-1], 4: lambda: a[::-1],
            5: lambda: a.swapaxes(0, 1), 6: lambda: np.rot90(a, -1),
            7: lambda: a.swapaxes(0, 1)[::-1, ::-1], 8: lambda: np.rot90(a, 1)}.get(
        orientation, lambda: a)()


def _planes(img: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    if img.mode.startswith("I") or img.mode == "F":
        # Pillow clips these to 8 bits on convert(); scale by the format's range instead, never
        # by the values (a dark 16-bit image is not an 8-bit one), to 16 bits.
        wide = np.asarray(img, dtype=np.float64)
        peak = 1.0 if img.mode == "F" else _peak(img)
        grey = np.clip(np.rint(wide * (65535.0 / peak)), 0, 65535).astype(np.uint16)
        return np.repeat(grey[:, :, None], 3, axis=2), None
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = np.asarray(img.convert("RGBA"), dtype=np.uint8)
        return rgba[..., :3], rgba[..., 3]
    return np.asarray(img.convert("RGB"), dtype=np.uint8), None


def _peak(img: Image.Image) -> float:
    """White of an integer grey image, from its bit depth: 16 bits for ``I;16*`` and PNG (Pillow
    reads 16-bit PNG as ``I`` in some versions), else TIFF's BitsPerSample; Pillow's ``I`` is a
    signed 32-bit integer."""
    if img.mode.startswith("I;16") or img.format == "PNG":
        return 65535.0
    bits = getattr(img, "tag_v2", {}).get(258)  # TIFF BitsPerSample
    bits = int(bits[0] if isinstance(bits, tuple) else bits) if bits else 32
    return float(2 ** (bits - 1) - 1 if bits == 32 else 2**bits - 1)


# Pillow decodes 16-bit RGB(A) to 8 bits: its unpacker keeps each sample's high byte. Decoding
# the same tiles again with the other byte order's unpacker keeps the low bytes instead, through
# Pillow's own decoders (PNG filters, TIFF compressions) and with no second library.
_OTHER_ORDER = {";16B": ";16L", ";16L": ";16B", ";16N": ";16B" if sys.byteorder == "little"
                else ";16L"}


def _wide(img: Image.Image, data: bytes, tiles: list, notes: list[str]) -> np.ndarray | None:
    """The 16-bit samples of a 16-bit RGB or RGBA image (``H x W x C`` uint16) decoded from
    ``tiles`` (its tiles before loading), else None."""
    rawmodes = [t.args if isinstance(t.args, str) else t.args[0] if isinstance(t.args, tuple)
                and t.args else None for t in tiles]
    if not rawmodes or not all(isinstance(r, str) and r[-4:] in _OTHER_ORDER for r in rawmodes):
        return None
    if img.mode not in ("RGB", "RGBA"):
        notes.append(f"16-bit {img.mode} read as 8 bits (Pillow has no 16-bit {img.mode})")
        return None
    high = np.asarray(img)
    again = Image.open(io.BytesIO(data))
    again.tile = [t._replace(args=_swap(t.args) if isinstance(t.args, str)
                             else (_swap(t.args[0]), *t.args[1:])) for t in tiles]
    low = np.asarray(again)
    if low.shape != high.shape:
        notes.append("16 bits unreadable, read as 8 bits")
        return None
    return (high.astype(np.uint16) << 8) | low


def _swap(rawmode: str) -> str:
    return rawmode[:-4] + _OTHER_ORDER[rawmode[-4:]]


def to_8bit(a: np.ndarray) -> np.ndarray:
    """Pixels of either depth as uint8 (16-bit values rounded to the nearest 8-bit level)."""
    if a.dtype == np.uint8:
        return a
    return ((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def flatten(rgb: np.ndarray, alpha: np.ndarray | None,
            background: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """``rgb`` composited over ``background`` by ``alpha`` (same depth), as a viewer shows it."""
    if alpha is None:
        return rgb
    peak = 65535.0 if rgb.dtype == np.uint16 else 255.0
    a = alpha.astype(np.float32)[..., None] / peak
    bg = np.asarray(background, np.float32) * (peak / 255.0)
    out = rgb.astype(np.float32) * a + bg * (1.0 - a)
    return np.clip(np.rint(out), 0, peak).astype(rgb.dtype)


def bleed(rgb: np.ndarray, known: np.ndarray) -> np.ndarray:
    """``rgb`` with the colour of each pixel that is not ``known`` (fully transparent) replaced by
    the mean colour of its nearest known pixels, by push-pull over a pyramid of 2x2 means.

    Why: the colour under transparent pixels is invisible but not harmless: the bicubic and the
    network mix it into the visible edge (a dark or light halo when it is black or white). With
    it filled from the edge's own colours, both see a plain continuation of the image and the
    visible pixels are restored as in an opaque one; their alpha then cuts the result. The
    alternative, restoring premultiplied colour and dividing by the upscaled alpha afterwards,
    shows the network dark fringes it was not trained on and divides its errors by alphas near
    zero, which amplifies them at exactly the soft edges that matter.
    """
    if known.all() or not known.any():
        return rgb
    c = rgb.astype(np.float32) * known[..., None]
    w = known.astype(np.float32)
    levels = [(c, w)]
    while max(w.shape) > 1:
        c, w = _half_sum(c), _half_sum(w)
        levels.append((c, w))
    fill = levels[-1][0] / np.maximum(levels[-1][1], 1e-9)[..., None]
    for c, w in reversed(levels[:-1]):
        up = fill.repeat(2, 0).repeat(2, 1)[:w.shape[0], :w.shape[1]]
        fill = np.where(w[..., None] > 0, c / np.maximum(w, 1e-9)[..., None], up)
    out = rgb.copy()
    peak = np.iinfo(rgb.dtype).max
    out[~known] = np.clip(np.rint(fill[~known]), 0, peak).astype(rgb.dtype)
    return out


def _half_sum(a: np.ndarray) -> np.ndarray:
    """Sums of 2x2 blocks (an odd last row or column summed alone)."""
    h, w = a.shape[:2]
    a = np.pad(a, [(0, h % 2), (0, w % 2)] + [(0, 0)] * (a.ndim - 2))
    return a.reshape(a.shape[0] // 2, 2, a.shape[1] // 2, 2, *a.shape[2:]).sum(axis=(1, 3))


def upscale_alpha(alpha: np.ndarray) -> np.ndarray:
    """An alpha plane (uint8 or uint16) 2x by bicubic, in float: fully transparent areas stay
    0 and opaque ones the peak (the kernel's weights sum to one; overshoot is clipped)."""
    h, w = alpha.shape
    peak = np.iinfo(alpha.dtype).max
    big = Image.fromarray(alpha.astype(np.float32), "F").resize((2 * w, 2 * h), Image.BICUBIC)
    return np.clip(np.rint(np.asarray(big)), 0, peak).astype(alpha.dtype)


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


def encode(rgb: np.ndarray, fmt: str = "png", quality: int = 95, png_level: int = 1,
           alpha: np.ndarray | None = None, icc: bytes | None = None,
           blocks: Mapping[str, bytes] | None = None) -> bytes:
    """Encode ``H x W x 3`` pixels (uint8, or uint16 for 16-bit PNG) with their ``alpha`` plane
    as PNG (zlib level ``png_level``), JPEG or WebP (8 bits, ``quality``), embedding the ICC
    profile ``icc`` and the metadata ``blocks`` (see :mod:`pipeline.image_metadata`). JPEG has
    no alpha: flatten first."""
    blocks = blocks or {}
    if fmt == "png":
        return encode_png(rgb, png_level, alpha, icc, blocks)
    if fmt == "jpeg" and alpha is not None:
        raise ValueError("JPEG has no alpha channel: flatten the image first")
    pixels = to_8bit(rgb) if alpha is None else np.dstack([to_8bit(rgb), to_8bit(alpha)])
    options = {"quality": quality}
    if icc:
        options["icc_profile"] = icc
    if "exif" in blocks:
        options["exif"] = EXIF_HEADER + blocks["exif"]
    if "xmp" in blocks:
        options["xmp"] = blocks["xmp"]
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=OUTPUT_FORMATS[fmt], **options)
    data = buf.getvalue()
    if fmt == "jpeg" and "iptc" in blocks:
        data = _with_app13(data, blocks["iptc"])
    return data


EXIF_HEADER = image_metadata.EXIF_HEADER
# What each output format can carry of the metadata blocks.
CARRIES = {"png": {"exif", "xmp", "iptc"}, "jpeg": {"exif", "xmp", "iptc"},
           "webp": {"exif", "xmp"}}


def encode_png(rgb: np.ndarray, level: int = 1, alpha: np.ndarray | None = None,
               icc: bytes | None = None, blocks: Mapping[str, bytes] | None = None) -> bytes:
    """``H x W x 3`` pixels (uint8 or uint16) and their alpha as an RGB or RGBA PNG of 8 or 16
    bits, every row with the Sub filter, deflated at ``level``: 1-3 by ISA-L, which on a
    480x320 photograph took 1.4 ms where zlib's level 1 took 6.4 ms for the same size; 0
    (stored) and 4-9 by zlib. Pillow's encoder, which tries filters per row, took 10 ms at its
    level 1, and the encode is most of the CPU work per image. The profile goes in ``iCCP``,
    EXIF in ``eXIf``, XMP in an ``iTXt`` and IPTC in a ``zTXt`` as ImageMagick and ExifTool
    write it ("Raw profile type iptc").
    """
    blocks = blocks or {}
    h, w, _ = rgb.shape
    pixels = rgb if alpha is None else np.dstack([rgb, alpha])
    channels, depth = pixels.shape[2], 16 if pixels.dtype == np.uint16 else 8
    if depth == 16:
        pixels = pixels.astype(">u2")
    flat = np.ascontiguousarray(pixels).view(np.uint8).reshape(h, -1)
    bpp = channels * depth // 8
    rows = np.empty((h, 1 + flat.shape[1]), np.uint8)
    rows[:, 0] = 1  # filter type Sub: each byte less the same byte of the pixel to its left
    rows[:, 1:] = flat
    rows[:, 1 + bpp:] -= flat[:, :-bpp]  # uint8 arithmetic wraps modulo 256, as PNG's filters do
    data = isal_zlib.compress(rows, level) if 1 <= level <= 3 else zlib.compress(rows, level)
    chunks = [_png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, 2 if channels == 3
                                              else 6, 0, 0, 0))]
    if icc:
        chunks.append(_png_chunk(b"iCCP", b"ICC profile\0\0" + zlib.compress(icc)))
    if "exif" in blocks:
        chunks.append(_png_chunk(b"eXIf", blocks["exif"]))
    if "xmp" in blocks:
        chunks.append(_png_chunk(b"iTXt", b"XML:com.adobe.xmp\0\0\0\0\0" + blocks["xmp"]))
    if "iptc" in blocks:
        iptc = blocks["iptc"].hex()
        lines = "\n".join(iptc[i:i + 72] for i in range(0, len(iptc), 72))
        text = f"\niptc\n{len(blocks['iptc']):8d}\n{lines}\n"
        chunks.append(_png_chunk(b"zTXt", b"Raw profile type iptc\0\0"
                                 + zlib.compress(text.encode())))
    return b"".join([b"\x89PNG\r\n\x1a\n", *chunks, _png_chunk(b"IDAT", data),
                     _png_chunk(b"IEND", b"")])


def _with_app13(jpeg: bytes, iptc: bytes) -> bytes:
    """``jpeg`` with the IPTC-IIM datasets in an APP13 segment (Photoshop's resource 0x0404),
    after the APPn segments the encoder wrote."""
    resource = (b"8BIM" + struct.pack(">H", 0x0404) + b"\0\0" + struct.pack(">I", len(iptc))
                + iptc + b"\0" * (len(iptc) % 2))
    payload = b"Photoshop 3.0\0" + resource
    if len(payload) + 2 > 0xFFFF:
        raise ValueError(f"IPTC block of {len(iptc)} bytes does not fit one JPEG segment")
    i = 2
    while jpeg[i] == 0xFF and 0xE0 <= jpeg[i + 1] <= 0xEF:
        i += 2 + struct.unpack(">H", jpeg[i + 2:i + 4])[0]
    return jpeg[:i] + b"\xff\xed" + struct.pack(">H", len(payload) + 2) + payload + jpeg[i:]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
