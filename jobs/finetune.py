"""Train the restoration checkpoint from high-resolution images on Ray Train.

    python -m jobs.finetune --config configs/train.yaml                    # one CPU worker
    ray job submit --working-dir . -- python -m jobs.finetune --config configs/train.yaml \
        --workers 8 --gpu --storage s3://bucket/runs                       # 8 GPUs, DDP

``--train`` takes prefixes or manifests on any fsspec URI (repeatable). Starting the same
``--name`` in the same ``--storage`` again resumes from its latest checkpoint. One CPU worker by
default; ``--workers N --gpu`` trains data-parallel on N GPUs.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.config import ConfigError, FinetuneConfig, load_finetune_config
from pipeline.training import trainer
from pipeline.training.finetune import finetune


def parse_args(argv: list[str] | None = None) -> FinetuneConfig:
    """Flags, over the values of ``--config`` (validated as :class:`FinetuneConfig`)."""
    parser = argparse.ArgumentParser(prog="python -m jobs.finetune",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML file of these options; flags override it")
    parser.add_argument("--train", action="append",
                        help="prefix or manifest of high-resolution images (repeatable)")
    parser.add_argument("--storage", help="where runs keep checkpoints (URI; default runs)")
    parser.add_argument("--name", help="run name; the same name resumes")
    parser.add_argument("--export", help="write the float16 release checkpoint here (URI)")
    parser.add_argument("--init", help="start from this checkpoint instead of from scratch")
    parser.add_argument("--workers", type=int)
    parser.add_argument("--gpu", action="store_true", default=None, help="one GPU per worker")
    parser.add_argument("--cpus-per-worker", type=int,
                        help="CPUs (and torch threads) per worker; default: the cluster's CPUs "
                             "shared among the workers, or 1 with --gpu")
    for name in ("steps", "batch", "patch", "checkpoint_every", "seed"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int,
                            help=f"default {getattr(trainer.TrainSettings, name)}")
    parser.add_argument("--lr", type=float, help=f"default {trainer.TrainSettings.lr}")
    parser.add_argument("--endpoint-url", help="S3-compatible endpoint for --train/--storage")
    args = parser.parse_args(argv)
    flags = {k: v for k, v in vars(args).items() if k != "config"}
    try:
        config = load_finetune_config(args.config, flags)
    except ConfigError as e:
        parser.error(str(e))
    if not config.train:
        parser.error("no training images: give --train (or `train:` in --config)")
    return config


def main(argv: list[str] | None = None) -> int:
    return finetune(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
