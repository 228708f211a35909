"""Train on one GPU (or CPU) for a fixed wall-clock budget, in plain PyTorch, without Ray.

    python -m jobs.train_one_gpu --train .gpu/train --init checkpoints/mimo-unet-thumb-x2.pt \\
        --schedule-seconds 1800 --seconds 440 --ema 0.999 --out chunk1/

See :mod:`pipeline.training.one_gpu` for what a chunk does and how chunks resume.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.training import one_gpu


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.train_one_gpu",
                                description=one_gpu.__doc__.splitlines()[0])
    p.add_argument("--train", required=True, action="append", help="prefix or manifest")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--init", help="start from this checkpoint (else from bicubic identity)")
    start.add_argument("--resume", help="continue the schedule of this chunk's last.pt")
    p.add_argument("--out", required=True, help="folder for best.pt, last.pt and history.json")
    p.add_argument("--seconds", type=float, required=True, help="this chunk's wall-clock budget")
    p.add_argument("--schedule-seconds", type=float,
                   help="length of the whole cosine schedule across chunks (default: --seconds)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--patch", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup-steps", type=int, default=300)
    p.add_argument("--val-every-s", type=float, default=40)
    p.add_argument("--loaders", type=int, default=14, help="DataLoader processes")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--degradation", action="append", default=[], metavar="FIELD=VALUE",
                   help="override one field of pipeline.training.degradations.Degradation, "
                        "e.g. jpeg_p=0.3")
    p.add_argument("--ema", type=float, default=0.0, metavar="DECAY",
                   help="validate and export an exponential moving average of the weights "
                        "(e.g. 0.999); 0: the weights themselves")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the training step's model (validation runs eagerly)")
    return p


def main(argv: list[str] | None = None) -> int:
    return one_gpu.train(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
