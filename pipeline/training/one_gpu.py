"""Train on one GPU for a fixed wall-clock budget, in plain PyTorch, where Ray is not installed.

The lent GPU machines have PyTorch but no Ray, and only minutes each, so `jobs.finetune` (Ray
Train) cannot run there. This runs the same pieces as its worker loop (pairs from
`pipeline.training.degradations`, the paper's loss, the held-out validation, the float16
export) with the pairs made by DataLoader processes, and a cosine schedule over time rather
than a step count. The checkpoint with the best held-out PSNR-Y is written to ``--out`` as it
appears, and ``last.pt`` at every validation, so a run cut off still leaves its best and a
point to resume.

One long schedule can run in chunks that each fit a lent machine's minutes: ``--schedule-seconds``
sets the cosine's length, ``--seconds`` this chunk's, and ``--resume last.pt`` continues where
that chunk's card says it stopped (weights, step count and schedule position):

    python -m jobs.train_one_gpu --train .gpu/train --init checkpoints/mimo-unet-thumb-x2.pt \
        --schedule-seconds 1800 --seconds 440 --ema 0.999 --out chunk1/
    python -m jobs.train_one_gpu --train .gpu/train --resume chunk1/last.pt \
        --schedule-seconds 1800 --seconds 440 --ema 0.999 --out chunk2/

A chunk resumes from the exported float16 weights (the moving average, with ``--ema``), not from
the optimizer's moments: the state that comes back from a lent machine must fit its 16 MiB file
limit, so Adam's moments restart, and ``--warmup-steps`` covers that restart.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.inference import to_model_input
from pipeline.models import build_model, read_checkpoint
from pipeline.training import degradations, trainer


class Pairs(IterableDataset):
    """An endless stream of (input, target) crops, images drawn in proportion to their area."""

    def __init__(self, images: list[np.ndarray], patch: int, seed: int,
                 degradation: degradations.Degradation):
        self.images, self.patch, self.seed, self.degradation = images, patch, seed, degradation
        self.weights = [im.shape[0] * im.shape[1] for im in images]

    def __iter__(self):
        info = get_worker_info()
        torch.set_num_threads(1)
        rng = random.Random(self.seed * 1000 + (info.id if info else 0))
        while True:
            hr = rng.choices(self.images, weights=self.weights)[0]
            src, ref = degradations.sample_pair(hr, self.patch, rng, self.degradation)
            yield np.ascontiguousarray(src), np.ascontiguousarray(ref)


def to_input(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    x = to_model_input(batch.to(device, non_blocking=True))
    return x.contiguous(memory_format=torch.channels_last)


def degradation_from(overrides: list[str]) -> degradations.Degradation:
    """``FIELD=VALUE`` strings over the default degradation's probabilities."""
    default = degradations.Degradation()
    fields = {f.name for f in dataclasses.fields(default)
              if isinstance(getattr(default, f.name), float)}
    changes = {}
    for item in overrides:
        name, _, value = item.partition("=")
        if name not in fields or not value:
            raise SystemExit(f"--degradation {item!r}: expected FIELD=VALUE with FIELD one of "
                             f"{sorted(fields)}")
        changes[name] = float(value)
    return dataclasses.replace(default, **changes)


def train(args: argparse.Namespace) -> int:
    """One chunk of training as ``args`` (:func:`jobs.train_one_gpu.build_parser`) describe it;
    returns the exit status."""

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    s = trainer.TrainSettings(batch=args.batch, patch=args.patch, lr=args.lr, seed=args.seed,
                               warmup_steps=args.warmup_steps,
                               degradation=degradation_from(args.degradation))
    uris, holdout = trainer.split_holdout(trainer.list_images(args.train), s.holdout_every)
    images, val_images = trainer.load_images(uris), trainer.load_images(holdout)
    print(f"{len(images)} training images, {len(holdout)} held out; device {device}", flush=True)

    schedule = args.schedule_seconds or args.seconds
    done_s, done_steps = 0.0, 0  # of the schedule, before this chunk
    if args.resume:
        earlier = json.loads(read_checkpoint(args.resume).meta["model_card"])["schedule"]
        if earlier["seconds"] != schedule:
            raise SystemExit(f"--resume {args.resume} belongs to a {earlier['seconds']} s schedule;"
                             f" give --schedule-seconds {earlier['seconds']}")
        done_s, done_steps = earlier["done_s"], earlier["steps"]
        print(f"resuming at {done_s:.0f} of {schedule:.0f} s, step {done_steps}", flush=True)
    model = build_model(s.model, args.init or args.resume)
    if not (args.init or args.resume):
        trainer.start_as_identity(model)
    model = model.train().to(device, memory_format=torch.channels_last)
    # The compiled module shares the eager one's parameters; validation's other shapes use
    # the eager one, so nothing recompiles.
    step_model = torch.compile(model) if args.compile else model
    optimizer = torch.optim.Adam(model.parameters(), lr=s.lr)
    # The average damps the step-to-step swing of the held-out score, so the best one is less
    # a matter of which step validation happened to land on.
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.ema)) if args.ema else None
    if ema:  # counts the starting weights as the first average, not the weights after step 1
        ema.update_parameters(model)
    kept = ema.module if ema else model  # what is validated and exported
    loader = DataLoader(Pairs(images, s.patch, s.seed, s.degradation), batch_size=s.batch,
                        num_workers=args.loaders, pin_memory=device.type == "cuda",
                        prefetch_factor=4 if args.loaders else None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def card(step: int, elapsed: float, history: list) -> dict:
        return {"settings": dataclasses.asdict(s), "steps_done": step, "released_step": step,
                "train_minutes": round(elapsed / 60, 1), "train_images": len(images),
                "data": args.train, "init": args.init or args.resume, "workers": 1,
                "hardware": torch.cuda.get_device_name() if device.type == "cuda"
                else f"CPU ({platform.machine()})",
                "torch": torch.__version__, "trainer": "jobs.train_one_gpu",
                "seconds": args.seconds, "ema": args.ema, "validation": history,
                "schedule": {"seconds": schedule, "done_s": done_s + elapsed,
                             "steps": done_steps + step}}

    first = trainer.validate(kept, val_images, s.val_crop, device)
    print(f"start: held-out PSNR-Y {first['val_psnr_y']:.2f} "
          f"(bicubic {first['val_bicubic_psnr_y']:.2f})", flush=True)
    history = [{"step": 0, "elapsed_s": 0, **first}]
    best = first["val_psnr_y"]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=s.bf16)
    step, running, waited = 0, 0.0, 0.0
    started = last_val = time.time()
    batches = iter(loader)
    while True:
        elapsed = time.time() - started
        done = elapsed >= args.seconds
        if done or time.time() - last_val >= args.val_every_s:
            last_val = time.time()
            record = {"step": step, "elapsed_s": round(elapsed), "loss": running,
                      "lr": optimizer.param_groups[0]["lr"],
                      **trainer.validate(kept, val_images, s.val_crop, device)}
            history.append(record)
            print(f"step {step}: {step / max(elapsed, 1e-9):.1f} steps/s "
                  f"(waiting for data {100 * waited / max(elapsed, 1e-9):.0f}%), loss "
                  f"{running:.4f}, held-out PSNR-Y {record['val_psnr_y']:.2f}", flush=True)
            (out / "history.json").write_text(json.dumps(history, indent=1))
            if record["val_psnr_y"] > best:
                best = record["val_psnr_y"]
                trainer.export(kept, str(out / "best.pt"), card(step, elapsed, history))
            trainer.export(kept, str(out / "last.pt"), card(step, elapsed, history))
            if done:
                print(f"best held-out PSNR-Y {best:.2f}", flush=True)
                return 0
        warmup = min(1.0, (step + 1) / s.warmup_steps)
        lr = warmup * trainer.cosine_lr(s, (done_s + elapsed) / schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        t = time.time()
        src, ref = next(batches)
        x, y = to_input(src, device), to_input(ref, device)
        waited += time.time() - t
        with autocast:
            outputs = step_model(x)
        loss = trainer.mimo_loss(outputs, y, s.fft_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if ema:
            ema.update_parameters(model)
        step += 1
        if step % 25 == 0:  # .item() syncs the GPU; not every step
            running = 0.9 * running + 0.1 * loss.item() if running else loss.item()

