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
from pathlib import Path

from pipeline.config import load_config
from pipeline.training import evaluation


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
    scores = evaluation.evaluate_all(config, args.benchmark_dir, args.sets, args.holdout_from,
                                     args.compare)
    label = Path(config.model.checkpoint or "random").name
    if config.inference.self_ensemble:
        label += " (self-ensemble x8)"
    print(evaluation.markdown(scores, label))
    if args.json:
        args.json.write_text(json.dumps({"checkpoint": config.model.checkpoint,
                                         "scores": [dataclasses.asdict(s) for s in scores]},
                                        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
