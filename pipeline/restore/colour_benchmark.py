"""Two ways to restore a wide-gamut photograph, measured in CIELAB (the measuring code of
``python -m jobs.benchmark_colour``): restore it in its own encoding and embed its profile (what
the job does), or convert it to sRGB first and tag sRGB.

The photo is an sRGB photograph whose numbers are read as Adobe RGB (1998), as a camera set to
Adobe RGB records a saturated scene: its reds and greens reach outside sRGB. Each way's 2x
output, seen through its own profile, is compared with the 2x bicubic of the original seen
through the original's profile: the model's change plus whatever the way loses.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageCms

from pipeline import colour, imaging
from pipeline.inference import InferenceSettings, Restorer
from pipeline.models import build_model, read_checkpoint

CHECKPOINT = "checkpoints/mimo-unet-thumb-x2.pt"
ADOBE_ICC = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "icc" / (
    "compatibleWithAdobeRGB1998.icc")


def _lab(rgb: np.ndarray, icc: bytes) -> np.ndarray:
    """8-bit RGB encoded in ``icc`` as float CIELAB (D50) through LittleCMS."""
    profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    lab = ImageCms.applyTransform(Image.fromarray(rgb), ImageCms.buildTransform(
        profile, ImageCms.createProfile("LAB"), "RGB", "LAB",
        renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC))
    a = np.asarray(lab)  # Pillow's LAB: L in 0-255 for 0-100, a and b as signed bytes
    ab = a[..., 1:].view(np.int8).astype(np.float64)
    return np.concatenate([a[..., :1] * (100 / 255), ab], axis=-1)


def measure(photo_path: Path, checkpoint: str = CHECKPOINT, side: int = 240) -> dict:
    adobe = ADOBE_ICC.read_bytes()
    srgb = colour.srgb_bytes()
    img = Image.open(photo_path).convert("RGB")
    scale = side / max(img.size)
    thumb = np.asarray(img.resize((round(img.width * scale), round(img.height * scale)),
                                  Image.BICUBIC))  # Adobe RGB numbers from here on
    restorer = Restorer(build_model("mimo-unet", read_checkpoint(checkpoint)),
                        torch.device("cpu"), InferenceSettings(precision="fp32"))
    reference = _lab(imaging.upscale2x(thumb), adobe)
    in_srgb = np.asarray(ImageCms.profileToProfile(
        Image.fromarray(thumb), ImageCms.ImageCmsProfile(io.BytesIO(adobe)),
        colour.srgb_profile(), renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC))
    back = _lab(in_srgb, srgb)
    outside = np.linalg.norm(back - _lab(thumb, adobe), axis=-1) > 2.0
    ways = {"own encoding, profile embedded": (thumb, adobe),
            "converted to sRGB, tagged sRGB": (in_srgb, srgb)}
    result = {"photo": photo_path.name, "size": f"{thumb.shape[1]}x{thumb.shape[0]}",
              "pixels_outside_srgb": float(outside.mean())}
    for name, (pixels, icc) in ways.items():
        big = imaging.upscale2x(pixels)
        out = restorer.restore([big])[0]
        delta = np.linalg.norm(_lab(out, icc) - reference, axis=-1)
        lost = np.linalg.norm(_lab(big, icc) - reference, axis=-1)  # the way alone, no model
        result[name] = {"mean_delta_e": float(delta.mean()),
                        "p95_delta_e": float(np.percentile(delta, 95)),
                        "without_model_mean_delta_e": float(lost.mean()),
                        "without_model_max_delta_e": float(lost.max())}
    return result


def render(results: list[dict]) -> str:
    lines = ["| photo | pixels outside sRGB | way | without the model: mean / max dE76 | "
             "restored: mean / p95 dE76 |", "|---|---|---|---|---|"]
    for r in results:
        for way in ("own encoding, profile embedded", "converted to sRGB, tagged sRGB"):
            w = r[way]
            lines.append(f"| {r['photo']} ({r['size']}) | {100 * r['pixels_outside_srgb']:.0f}% "
                         f"| {way} | {w['without_model_mean_delta_e']:.2f} / "
                         f"{w['without_model_max_delta_e']:.1f} | {w['mean_delta_e']:.2f} / "
                         f"{w['p95_delta_e']:.2f} |")
    return "\n".join(lines)
