"""Fine-tuning on Ray Train: data-parallel workers, checkpoints kept in a run's storage (the
same name resumes), the best by held-out PSNR-Y exported as the release checkpoint."""

from __future__ import annotations

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
from pipeline.config import FinetuneConfig, StorageConfig
from pipeline.training import trainer


def finetune(config: FinetuneConfig) -> int:
    """Train on Ray Train as ``config`` says (resuming its run name in its storage), then
    export the checkpoint with the best held-out PSNR-Y; returns the exit status."""
    options = StorageConfig(endpoint_url=config.endpoint_url).fsspec_options()
    if config.init and "://" not in config.init:  # Ray Train workers run in another folder
        config = config.model_copy(update={"init": str(Path(config.init).resolve())})
    settings = trainer.TrainSettings(**{
        name: getattr(config, name) for name in ("steps", "batch", "patch", "lr",
                                               "checkpoint_every", "seed")
        if getattr(config, name) is not None})
    images, holdout = trainer.split_holdout(trainer.list_images(config.train, options),
                                             settings.holdout_every)
    print(f"training images: {len(images)}, held out for validation: {len(holdout)}")
    if not ray.is_initialized():
        ray.init()
    cpus = config.cpus_per_worker or (
        1 if config.gpu else max(1, int(ray.cluster_resources().get("CPU", 1)) // config.workers))
    fs, path = storage.filesystem(config.storage, options)
    if "://" not in config.storage:
        path = str(Path(path).resolve())
    torch_trainer = TorchTrainer(
        trainer.train_loop_per_worker,
        train_loop_config={"settings": dataclasses.asdict(settings), "images": images,
                           "holdout": holdout, "init": config.init, "options": options,
                           "threads": cpus},
        scaling_config=ScalingConfig(num_workers=config.workers, use_gpu=config.gpu,
                                     resources_per_worker={"CPU": cpus}),
        run_config=RunConfig(name=config.name, storage_path=path,
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
    if config.export:
        card = {"settings": dataclasses.asdict(settings), "steps_done": latest["step"],
                "released_step": saved["step"],
                "train_minutes": round(latest["elapsed_s"] / 60, 1),
                "train_images": len(images), "data": config.train, "init": config.init,
                "workers": config.workers,
                "hardware": "GPU" if config.gpu else f"CPU ({platform.machine()})",
                "torch": torch.__version__, "validation": history}
        trainer.export(model, config.export, card, options)
        print(f"exported {config.export}")
    return 0
