"""Restoration quality against high-resolution references, through the restore job itself.

Two protocols:
- ``standard``: the published x2 protocol: the set's MATLAB-bicubic LR images in, PSNR/SSIM on
  Y with a 2-pixel border shaved against HR.
- ``thumbnail``: how real thumbnails look: HR downscaled 2x with Pillow bicubic and saved as JPEG
  quality 85.
Bicubic is the pipeline's own 2x upscale of the same LR image.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline import imaging, sharpness
from pipeline.config import JobConfig
from pipeline.imaging import IMAGE_SUFFIXES
from pipeline.restore.run import run_restore
from pipeline.training import trainer


@dataclass
class Score:
    dataset: str
    protocol: str
    method: str
    images: int
    psnr_y: float  # on Y rounded to integers, as MATLAB's rgb2ycbcr: the published tables' ruler
    ssim_y: float
    colour_shift: float  # 8-bit levels of mean Cb/Cr drift from the reference
    overshoot: float  # Y levels beyond the reference's local range: ringing and halos
    psnr_y_unrounded: float  # on Y as floats: about 0.03-0.07 dB above psnr_y


def _rgb(path: Path) -> np.ndarray:
    # The pipeline's own decoder, so references are read exactly as inputs are.
    return imaging.decode(path.read_bytes(), imaging.DecodeLimits(max_pixels=64_000_000))


def make_thumbnails(hr_paths: list[Path], out_dir: Path, quality: int = 85) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in hr_paths:
        hr = _rgb(path)
        lr = imaging.downscale2x(hr[: hr.shape[0] // 2 * 2, : hr.shape[1] // 2 * 2])
        Image.fromarray(lr).save(out_dir / f"{path.stem}.jpg", quality=quality)


def side_by_side(*images: np.ndarray, gap: int = 4) -> np.ndarray:
    """Images of one height in a row on a white ground, for looking at artefacts."""
    h = max(im.shape[0] for im in images)
    row = np.full((h, sum(im.shape[1] for im in images) + gap * (len(images) - 1), 3), 255,
                  np.uint8)
    x = 0
    for im in images:
        row[:im.shape[0], x:x + im.shape[1]] = im[..., :3]
        x += im.shape[1] + gap
    return row


def evaluate_set(name: str, protocol: str, lr_dir: Path, hr_dir: Path, config: JobConfig,
                 compare_dir: Path | None = None) -> list[Score]:
    """Restore every image of ``lr_dir`` with ``config``'s model; score it and bicubic.

    ``compare_dir`` receives bicubic | model | reference side by side for every image."""
    with tempfile.TemporaryDirectory() as tmp:
        config = config.model_copy(update={
            "input": config.input.model_copy(update={"manifest": str(lr_dir)}),
            "output": config.output.model_copy(update={"uri": tmp, "format": "png"}),
        })
        summary = run_restore(config)
        if summary.errors or not summary.complete:
            raise RuntimeError(f"{name}: the restore job failed on some images:\n"
                               f"{summary.render()}")
        scores: dict[str, list[tuple[float, ...]]] = {"bicubic": [], "model": []}
        for lr_path in sorted(p for p in lr_dir.iterdir() if p.suffix.lower() in (".png", ".jpg")):
            lr = _rgb(lr_path)
            hr = _rgb(hr_dir / f"{lr_path.stem}.png")[: 2 * lr.shape[0], : 2 * lr.shape[1]]
            restored = _rgb(Path(tmp) / "images" / f"{lr_path.stem}.png")
            bicubic = imaging.upscale2x(lr)
            if compare_dir:
                compare_dir.mkdir(parents=True, exist_ok=True)
                sheet = side_by_side(bicubic, restored, hr)
                stem = f"{name}_{protocol.split()[0]}_{lr_path.stem}".replace(" ", "-")
                Image.fromarray(sheet).save(compare_dir / f"{stem}.png")
            for method, img in (("bicubic", bicubic), ("model", restored)):
                scores[method].append((
                    sharpness.psnr_y(img, hr), sharpness.ssim_y(img, hr),
                    sharpness.colour_shift(img, hr), sharpness.overshoot(img, hr),
                    sharpness.psnr_y(img, hr, rounded=False)))
    return [Score(name, protocol, method, len(v), *np.mean(v, axis=0).tolist())
            for method, v in scores.items()]


def markdown(scores: list[Score], model_label: str) -> str:
    lines = ["| dataset | protocol | images | bicubic PSNR-Y / SSIM | "
             f"{model_label} PSNR-Y / SSIM | gain (dB) | {model_label} PSNR-Y unrounded | "
             "colour shift | overshoot |",
             "|---|---|---|---|---|---|---|---|---|"]
    keyed = {(s.dataset, s.protocol, s.method): s for s in scores}
    for dataset, protocol in dict.fromkeys((s.dataset, s.protocol) for s in scores):
        b, m = keyed[dataset, protocol, "bicubic"], keyed[dataset, protocol, "model"]
        lines.append(f"| {dataset} | {protocol} | {b.images} | {b.psnr_y:.2f} / {b.ssim_y:.4f} | "
                     f"{m.psnr_y:.2f} / {m.ssim_y:.4f} | {m.psnr_y - b.psnr_y:+.2f} | "
                     f"{m.psnr_y_unrounded:.2f} | {b.colour_shift:.2f} / {m.colour_shift:.2f} | "
                     f"{b.overshoot:.3f} / {m.overshoot:.3f} |")
    lines.append("\nPSNR-Y and SSIM on Y rounded to integers (MATLAB's rgb2ycbcr on uint8, as the "
                 "published tables), 2-pixel border shaved; unrounded Y reads a little higher. "
                 "Colour shift: mean Cb/Cr drift from the reference, 8-bit levels. Overshoot: "
                 "mean Y levels beyond the reference's 3x3 range (ringing, halos). "
                 "Both bicubic / model.")
    return "\n".join(lines)


def evaluate_all(config: JobConfig, benchmark_dir: Path, sets: list[str],
                 holdout_from: Path | None = None,
                 compare_dir: Path | None = None) -> list[Score]:
    """Both protocols: each of ``sets`` as published (MATLAB-bicubic LR), then its HR images
    and ``holdout_from``'s held-out photographs as JPEG thumbnails; the scores of all."""
    scores = []
    for name in sets:
        root = benchmark_dir / name
        scores += evaluate_set(name, "standard", root / "LR_bicubic_x2", root / "HR",
                                          config, compare_dir=compare_dir)
    with tempfile.TemporaryDirectory() as tmp:
        thumbnail_sets = [(n, benchmark_dir / n / "HR") for n in sets]
        if holdout_from:
            thumbnail_sets.append(("held-out photos", _link_holdout(holdout_from, tmp)))
        for name, hr_dir in thumbnail_sets:
            thumbs = Path(tmp) / name
            make_thumbnails(sorted(hr_dir.glob("*.png")), thumbs)
            scores += evaluate_set(name, "thumbnail (JPEG q85)", thumbs, hr_dir, config,
                                              compare_dir=compare_dir)
    return scores


def _link_holdout(train_dir: Path, tmp: str) -> Path:
    """The held-out photographs of a training folder, linked under unique names."""
    paths = [p for p in train_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES]
    _, holdout = trainer.split_holdout(paths, trainer.TrainSettings.holdout_every)
    hr_dir = Path(tmp) / "holdout-hr"
    hr_dir.mkdir()
    for path in holdout:  # unique names: BSD100/img_001 and Urban100/img_001 both exist
        (hr_dir / f"{path.parent.name}_{path.stem}.png").symlink_to(path.resolve())
    return hr_dir
