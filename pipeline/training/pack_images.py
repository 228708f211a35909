"""Copy training images as lossless WebP, small enough to travel to a lent GPU machine.

The GPU machines take at most 64 MiB of working tree; BSD100 + Urban100 are 61 MB of PNG and
44 MB as lossless WebP (the pixels are identical). Names and folders are kept, so the sorted
list, and with it the held-out split, is the same as the originals'.

    python -m jobs.pack_training_images PHOTOS/ .gpu/train
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image


def pack(job: tuple[Path, Path]) -> int:
    src, dst = job
    dst.parent.mkdir(parents=True, exist_ok=True)
    rgb = Image.open(src).convert("RGB")
    rgb.save(dst, "WEBP", lossless=True, quality=100, method=4)
    if not np.array_equal(np.asarray(Image.open(dst).convert("RGB")), np.asarray(rgb)):
        raise SystemExit(f"{dst}: WebP round trip changed pixels")
    return dst.stat().st_size


def pack_folder(src_root: str, dst_root: str) -> tuple[int, int]:
    """Every PNG under ``src_root`` as lossless WebP under ``dst_root``; (images, bytes)."""
    src, dst = Path(src_root), Path(dst_root)
    jobs = [(p, dst / p.relative_to(src).with_suffix(".webp")) for p in sorted(src.rglob("*.png"))]
    with ProcessPoolExecutor() as pool:
        return len(jobs), sum(pool.map(pack, jobs))
