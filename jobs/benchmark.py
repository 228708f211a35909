"""Throughput figures, each measured side by side in one run on this machine.

    python -m jobs.benchmark [--device auto|cpu|cuda] [--json bench.json] [--job N [--job-size WxH]]

Prints a Markdown table (and ``--json`` writes the same figures):
- the bare model on ``--size`` inputs: float32 eager at batch 1 (the baseline), then the
  precision the restore job picks (``inference.precision: auto``) with channels_last over several
  batch sizes; optionally ``--compile``; images/s, achieved TFLOP/s and, on a GPU, the fraction
  of the dense bf16 peak, and where a pass's time goes (convolutions, fused or element-wise
  kernels, the device idle) for the eager and the compiled model;
- the restorer (the actor's own code) over mixed thumbnail sizes, as a stream of them arrives;
- CPU milliseconds per image for each CPU stage of the job (decode, encode), and the CPU cores a
  GPU would need at the measured rate; the milliseconds per image of what the actor does around
  the model on its device (the 2x upscale, the sharpness measures);
- what a run of one tiny image costs before its image is done, on each engine;
- with ``--job N``: the whole ``jobs.restore`` process over N generated thumbnails on each
  engine, over the whole process and in steady state, its ratio to the simplest fast loop a
  user could write over the same files and to the bare model, and on a GPU how busy the GPU was.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from pipeline.restore.benchmark import CHECKPOINT, Settings, measure, render


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.benchmark",
                                description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--size", default="480x320", help="W x H of the model's input (the 2x image)")
    p.add_argument("--batches", default=None,
                   help="comma-separated batch sizes (default 1,8,32,64 on CUDA, 1,4 on CPU)")
    p.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    p.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                   help="also measure torch.compile at the largest batch (mode: default, "
                        "reduce-overhead, max-autotune, max-autotune-no-cudagraphs)")
    p.add_argument("--profile", action="store_true",
                   help="also say where a pass's time goes, eager and compiled, at the "
                        "largest batch: kinds of kernel and idle time (always on a GPU)")
    p.add_argument("--bare-only", action="store_true",
                   help="measure the bare model only (a compile mode's figure on its own)")
    p.add_argument("--job", type=int, default=0, metavar="N",
                   help="also run jobs.restore over N generated thumbnails, on each engine")
    p.add_argument("--job-size", default=None, metavar="WxH",
                   help="the thumbnails' size for --job (default: mixed, 100-260 px a side); "
                        "half of --size gives the bare model's input size")
    p.add_argument("--simulated-device", type=float, metavar="RATE",
                   help="instead: the whole job with the model's device work replaced by a "
                        "simulated device at RATE 480x320-equivalent images/s; its last line "
                        "says how busy that device was in the steady window")
    p.add_argument("--against", metavar="REV",
                   help="also run the whole job (--job, --simulated-device) as git revision REV "
                        "has it, each way just before this tree's: before and after in one run")
    p.add_argument("--checkpoint", default=CHECKPOINT)
    p.add_argument("--json", type=Path)
    p.add_argument("--render", type=Path, metavar="JSON",
                   help="print the tables of an earlier run's --json (one stopped early too)")

    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.render:
        print(render(json.loads(args.render.read_text())))
        return 0

    def save(result: dict) -> None:
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))

    names = {f.name for f in dataclasses.fields(Settings)}
    result = measure(Settings(**{k: v for k, v in vars(args).items() if k in names}), save)
    save(result)
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
