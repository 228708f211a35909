"""Colour: every embedded ICC profile honoured through LittleCMS (Pillow's ``ImageCms``).

RGB inputs are restored in their own encoding and the output embeds the very same profile, so a
colour-managed viewer shows the copy's colours as it showed the original's, wide gamuts included;
converting to sRGB instead clips every colour outside sRGB (measured on wide-gamut photos:
docs/faithful-copies.md). Pixels that are not RGB (CMYK, Lab, grey with a grey profile) are
converted to sRGB through their profile and tagged sRGB. An untagged input is sRGB, and its
output untagged.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass

from PIL import Image, ImageCms

UNTAGGED = "untagged (sRGB)"
KEPT = "profile kept"  # restored in the input's own encoding, the profile embedded unchanged


class ColourError(ValueError):
    """A profile that the pixels need converted through cannot be used."""


@dataclass
class Managed:
    image: Image.Image  # RGB-family, grey or palette pixels, ready to become arrays
    icc: bytes | None  # the profile the output embeds; None: untagged
    profile: str | None  # the input profile's description; None: untagged
    handling: str  # UNTAGGED, KEPT or "converted to sRGB from ..."


@functools.lru_cache(maxsize=1)
def srgb_profile() -> ImageCms.ImageCmsProfile:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


@functools.lru_cache(maxsize=1)
def srgb_bytes() -> bytes:
    return srgb_profile().tobytes()


@functools.lru_cache(maxsize=1)
def _lab_to_srgb() -> ImageCms.ImageCmsTransform:
    return ImageCms.buildTransform(ImageCms.createProfile("LAB"), srgb_profile(), "LAB", "RGB")


def describe(icc: bytes | ImageCms.ImageCmsProfile) -> str:
    """The profile's own description (of its bytes, or of it opened), or a word on why there
    is none."""
    try:
        profile = _open(icc) if isinstance(icc, bytes) else icc
        return ImageCms.getProfileDescription(profile).strip() or "(no description)"
    except ColourError:
        return "unreadable profile"


def _open(icc: bytes) -> ImageCms.ImageCmsProfile:
    try:
        return ImageCms.ImageCmsProfile(io.BytesIO(icc))
    except (OSError, ImageCms.PyCMSError, ValueError, TypeError) as e:
        raise ColourError(f"embedded ICC profile is unreadable ({e})") from e


def _space(profile: ImageCms.ImageCmsProfile) -> str:
    return profile.profile.xcolor_space.strip()


def manage(img: Image.Image) -> Managed:
    """``img`` in RGB, grey or palette form with the profile its output should embed.

    Raises:
        ColourError: CMYK, Lab or grey pixels whose profile cannot be read or does not fit them.
    """
    icc = img.info.get("icc_profile") or None
    if img.mode == "CMYK":
        if icc is None:  # Pillow's own formula, as viewers without colour management show it
            return Managed(img.convert("RGB"), None, None,
                           "converted from CMYK without a profile (naive formula)")
        return _converted(img, icc, "CMYK", "CMYK", "RGB")
    if img.mode == "LAB":
        rgb = ImageCms.applyTransform(img, _lab_to_srgb())
        return Managed(rgb, srgb_bytes(), "CIE L*a*b* (D50)", "converted to sRGB from Lab")
    if img.mode == "YCbCr":
        img = img.convert("RGB")
    if icc is None:
        return Managed(img, None, None, UNTAGGED)
    if img.mode in ("L", "LA"):
        return _grey(img, icc)
    if img.mode.startswith("I") or img.mode == "F":
        # LittleCMS through Pillow converts 8-bit pixels only: the 16-bit grey stays grey.
        return Managed(img, None, describe(icc),
                       "grey profile not applied to 16-bit grey (taken as sRGB grey)")
    try:
        profile = _open(icc)
    except ColourError:
        # Carried unchanged: any viewer then treats the copy as it treats the original.
        return Managed(img, icc, "unreadable profile", "unreadable profile carried unchanged")
    if _space(profile) != "RGB":
        return Managed(img, None, describe(profile), f"{_space(profile)} profile on RGB pixels "
                       "ignored, as viewers do (taken as sRGB)")
    return Managed(img, icc, describe(profile), KEPT)


def _grey(img: Image.Image, icc: bytes) -> Managed:
    alpha = img.getchannel("A") if img.mode == "LA" else None
    managed = _converted(img.convert("L"), icc, "GRAY", "L", "RGB")
    if alpha is not None:
        managed.image = Image.merge("RGBA", (*managed.image.split(), alpha))
    return managed


def _converted(img: Image.Image, icc: bytes, space: str, mode: str, out_mode: str) -> Managed:
    profile = _open(icc)
    if _space(profile) != space:
        raise ColourError(f"embedded ICC profile is for {_space(profile)}, not the image's "
                          f"{space} pixels")
    try:
        rgb = ImageCms.profileToProfile(img.convert(mode), profile, srgb_profile(),
                                        outputMode=out_mode)
    except ImageCms.PyCMSError as e:
        raise ColourError(f"cannot convert through the embedded ICC profile ({e})") from e
    name = {"CMYK": "CMYK", "GRAY": "grey"}[space]
    return Managed(rgb, srgb_bytes(), describe(profile), f"converted to sRGB from {name}")
