"""Train the restoration checkpoint from high-resolution images.

    python -m jobs.finetune --train-dir ../shared/data/train --run-dir runs/default \
        --export checkpoints/mimo-unet-thumb-x2.pt

Rerunning the same command resumes from ``{run-dir}/state.pt``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
from pathlib import Path

import torch

from pipeline import training
from pipeline.imaging import IMAGE_SUFFIXES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-dir", type=Path, action="append", required=True,
                        help="directory of high-resolution images (repeatable, recursive)")
    parser.add_argument("--run-dir", type=Path, required=True, help="checkpoints and log")
    parser.add_argument("--export", type=Path, help="write the float16 release checkpoint here")
    parser.add_argument("--init", help="start from this checkpoint instead of from scratch")
    parser.add_argument("--steps", type=int, default=training.TrainSettings.steps)
    parser.add_argument("--batch", type=int, default=training.TrainSettings.batch)
    parser.add_argument("--patch", type=int, default=training.TrainSettings.patch)
    parser.add_argument("--lr", type=float, default=training.TrainSettings.lr)
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--max-minutes", type=float, help="stop (resumably) after this long")
    parser.add_argument("--checkpoint-every-s", type=float, default=300.0)
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    paths = sorted(p for d in args.train_dir for p in d.rglob("*")
                   if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        parser.error(f"no images under {', '.join(map(str, args.train_dir))}")
    settings = training.TrainSettings(steps=args.steps, batch=args.batch, patch=args.patch,
                                      lr=args.lr)
    log_file = (args.run_dir / "train.log")
    args.run_dir.mkdir(parents=True, exist_ok=True)

    def log(line: str) -> None:
        print(line, flush=True)
        with log_file.open("a") as f:
            f.write(line + "\n")

    log(f"command: {' '.join(sys.argv)}")
    model, state = training.train(paths, args.run_dir, settings, init_checkpoint=args.init,
                                  checkpoint_every_s=args.checkpoint_every_s,
                                  max_minutes=args.max_minutes, log=log)
    if args.export:
        card = {"settings": dataclasses.asdict(settings), "steps_done": state.step,
                "train_minutes": round(state.elapsed_s / 60, 1),
                "train_images": len(paths), "data": [str(d) for d in args.train_dir],
                "hardware": f"{platform.processor() or platform.machine()}, "
                            f"{torch.get_num_threads()} torch threads",
                "validation": state.history[-1] if state.history else None}
        training.export(model, args.export, card)
        log(f"exported {args.export}: {json.dumps(card)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
