from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SHARED_DIR", REPO.parent / "shared"))
OFFICIAL = SHARED / "fixtures" / "mimo_unet_official"


@pytest.fixture(scope="session")
def official_dir() -> Path:
    if not OFFICIAL.is_dir():
        pytest.fail(f"official fixtures not found at {OFFICIAL}; set SHARED_DIR")
    return OFFICIAL


def make_image(path: Path, size: tuple[int, int] = (24, 20), mode: str = "RGB", seed: int = 0,
               fmt: str | None = None) -> Path:
    """A small image with edges and texture, so that sharpness measures are non-trivial."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = ((xx // 4 + yy // 4) % 2) * 160 + 40
    pixels = np.stack([base, np.roll(base, 3, axis=1), 255 - base], axis=-1).astype(np.int16)
    pixels = np.clip(pixels + rng.integers(-20, 20, pixels.shape), 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt)
    return path
