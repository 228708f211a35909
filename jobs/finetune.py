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
import dataclasses
import json
import platform
import sys
from pathlib import Path

import pyarrow.fs as pafs
import ray
import torch
from ray.train import CheckpointConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from pipeline import storage
from pipeline.config import ConfigError, StorageConfig, load_finetune_config
from pipeline.training import trainer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
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
    return argparse.Namespace(**config.model_dump())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    options = StorageConfig(endpoint_url=args.endpoint_url).fsspec_options()
    if args.init and "://" not in args.init:
        args.init = str(Path(args.init).resolve())  # Ray Train workers run in another folder
    settings = trainer.TrainSettings(**{
        name: getattr(args, name) for name in ("steps", "batch", "patch", "lr",
                                               "checkpoint_every", "seed")
        if getattr(args, name) is not None})
    images, holdout = trainer.split_holdout(trainer.list_images(args.train, options),
                                             settings.holdout_every)
    print(f"training images: {len(images)}, held out for validation: {len(holdout)}")
    if not ray.is_initialized():
        ray.init()
    cpus = args.cpus_per_worker or (
        1 if args.gpu else max(1, int(ray.cluster_resources().get("CPU", 1)) // args.workers))
    fs, path = storage.filesystem(args.storage, options)
    if "://" not in args.storage:
        path = str(Path(path).resolve())
    torch_trainer = TorchTrainer(
        trainer.train_loop_per_worker,
        train_loop_config={"settings": dataclasses.asdict(settings), "images": images,
                           "holdout": holdout, "init": args.init, "options": options,
                           "threads": cpus},
        scaling_config=ScalingConfig(num_workers=args.workers, use_gpu=args.gpu,
                                     resources_per_worker={"CPU": cpus}),
        run_config=RunConfig(name=args.name, storage_path=path,
                             storage_filesystem=pafs.PyFileSystem(pafs.FSSpecHandler(fs)),
                             checkpoint_config=CheckpointConfig(
                                 num_to_keep=2, checkpoint_score_attribute="val_psnr_y",
                                 checkpoint_score_order="max")),
    )
    result = torch_trainer.fit()
    if result.error:
        print(f"error: training failed: {result.error}", file=sys.stderr)
        return 1
    with result.checkpoint.as_directory() as d:
        _, latest = trainer.load_trained(Path(d), settings.model)
    history = json.loads(latest["history"])
    print(json.dumps(history[-1]))
    # Ray keeps the latest checkpoint and the best by held-out PSNR; the best is released.
    best = max(result.best_checkpoints, key=lambda c: c[1].get("val_psnr_y", float("-inf")))[0]
    with best.as_directory() as d:
        model, saved = trainer.load_trained(Path(d), settings.model)
    if args.export:
        card = {"settings": dataclasses.asdict(settings), "steps_done": latest["step"],
                "released_step": saved["step"],
                "train_minutes": round(latest["elapsed_s"] / 60, 1),
                "train_images": len(images), "data": args.train, "init": args.init,
                "workers": args.workers,
                "hardware": "GPU" if args.gpu else f"CPU ({platform.machine()})",
                "torch": torch.__version__, "validation": history}
        trainer.export(model, args.export, card, options)
        print(f"exported {args.export}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
