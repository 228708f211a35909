"""Score a checkpoint against bicubic on Set5/Set14 and on JPEG thumbnails, via the restore job.

    python -m jobs.evaluate --checkpoint checkpoints/mimo-unet-thumb-x2.pt \
        --benchmark-dir BENCH [--holdout-from PHOTOS/] [--json scores.json] [--compare sheets/]

BENCH holds BENCH/Set5/HR/*.png and BENCH/Set5/LR_bicubic_x2/*.png (same names), likewise Set14.

Prints a Markdown table; ``--json`` also writes the scores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

from pipeline.config import load_config
from pipeline.imaging import IMAGE_SUFFIXES
from pipeline.training import evaluation, trainer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.evaluate",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="job config for model/inference settings")
    parser.add_argument("--checkpoint", help="checkpoint path or URI (default: the config's)")
    parser.add_argument("--benchmark-dir", type=Path, required=True,
                        help="holds Set5/ and Set14/ with HR/ and LR_bicubic_x2/")
    parser.add_argument("--sets", nargs="+", default=["Set5", "Set14"])
    parser.add_argument("--holdout-from", type=Path,
                        help="training directory whose held-out images (never trained on) join "
                             "the thumbnail protocol, picked as jobs.finetune picks them")
    parser.add_argument("--json", type=Path, help="write the scores here")
    parser.add_argument("--compare", type=Path,
                        help="write bicubic | model | reference sheets here, to look at")
    parser.add_argument("--self-ensemble", action="store_true", default=None,
                        help="restore with inference.self_ensemble (8 flips/rotations)")
    args = parser.parse_args(argv)

    config = load_config(args.config, {"model.checkpoint": args.checkpoint,
                                       "input.manifest": "unused",
                                       "inference.self_ensemble": args.self_ensemble})
    scores = []
    for name in args.sets:
        root = args.benchmark_dir / name
        scores += evaluation.evaluate_set(name, "standard", root / "LR_bicubic_x2", root / "HR",
                                          config, compare_dir=args.compare)
    with tempfile.TemporaryDirectory() as tmp:
        thumbnail_sets = [(n, args.benchmark_dir / n / "HR") for n in args.sets]
        if args.holdout_from:
            thumbnail_sets.append(("held-out photos", _link_holdout(args.holdout_from, tmp)))
        for name, hr_dir in thumbnail_sets:
            thumbs = Path(tmp) / name
            evaluation.make_thumbnails(sorted(hr_dir.glob("*.png")), thumbs)
            scores += evaluation.evaluate_set(name, "thumbnail (JPEG q85)", thumbs, hr_dir, config,
                                              compare_dir=args.compare)
    label = Path(config.model.checkpoint or "random").name
    if config.inference.self_ensemble:
        label += " (self-ensemble x8)"
    print(evaluation.markdown(scores, label))
    if args.json:
        args.json.write_text(json.dumps({"checkpoint": config.model.checkpoint,
                                         "scores": [dataclasses.asdict(s) for s in scores]},
                                        indent=2))
    return 0


def _link_holdout(train_dir: Path, tmp: str) -> Path:
    paths = [p for p in train_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES]
    _, holdout = trainer.split_holdout(paths, trainer.TrainSettings.holdout_every)
    hr_dir = Path(tmp) / "holdout-hr"
    hr_dir.mkdir()
    for path in holdout:  # unique names: BSD100/img_001 and Urban100/img_001 both exist
        (hr_dir / f"{path.parent.name}_{path.stem}.png").symlink_to(path.resolve())
    return hr_dir


if __name__ == "__main__":
    sys.exit(main())
