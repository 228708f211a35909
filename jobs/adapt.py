"""Adapt a checkpoint to an archive of thumbnails without originals; keep it only if better.

    python -m jobs.adapt --archive s3://bucket/thumbs/ --base checkpoints/mimo-unet-thumb-x2.pt \
        --output s3://bucket/models/adapted.pt [--steps 500] [--storage runs --name adapt]

Writes the better of the adapted and the base model to --output, prints the held-out check and
writes it as JSON next to the output (``.json``).
"""

from __future__ import annotations

import argparse
import json
import sys

from pipeline import storage
from pipeline.config import FinetuneConfig, StorageConfig
from pipeline.models import Checkpoint, CheckpointError, build_model, read_checkpoint
from pipeline.training import adaptation, trainer
from pipeline.training.finetune import finetune


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.adapt",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--archive", action="append", required=True,
                        help="prefix or manifest of the archive's thumbnails (repeatable)")
    parser.add_argument("--base", required=True, help="the checkpoint to start from")
    parser.add_argument("--output", required=True, help="where the chosen checkpoint goes")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--cpus-per-worker", type=int)
    parser.add_argument("--storage", default="runs")
    parser.add_argument("--name", default="adapt")
    parser.add_argument("--min-gain-db", type=float, default=0.05,
                        help="keep the adapted model only if it wins by at least this much")
    parser.add_argument("--endpoint-url")
    args = parser.parse_args(argv)

    options = StorageConfig(endpoint_url=args.endpoint_url).fsspec_options()
    train_uris, held_out = trainer.split_holdout(trainer.list_images(args.archive, options),
                                                  trainer.TrainSettings.holdout_every // 2)
    held_out_images = trainer.load_images(held_out, options)
    patch = adaptation.patch_for(held_out_images + trainer.load_images(train_uris, options))

    adapted_uri = storage.join(args.storage, f"{args.name}-adapted.pt")
    # The held-out part must never reach training, so finetune gets the rest as a manifest.
    train_part = storage.join(args.storage, f"{args.name}-train.jsonl")
    storage.write_bytes_atomic(train_part, "".join(
        json.dumps({"uri": u}) + "\n" for u in train_uris).encode(), options)
    exported = _exported_after(adapted_uri, args.steps, options)
    if exported:
        print(f"{adapted_uri} has its {args.steps} steps already (a rerun): checking it again")
    else:
        status = finetune(FinetuneConfig(
            train=[train_part], storage=args.storage, name=args.name, init=args.base,
            steps=args.steps, lr=args.lr, batch=args.batch, patch=patch, workers=args.workers,
            checkpoint_every=max(1, args.steps // 5), export=adapted_uri,
            cpus_per_worker=args.cpus_per_worker, endpoint_url=args.endpoint_url))
        if status:
            return status
        exported = read_checkpoint(adapted_uri, options)

    base = build_model("mimo-unet", args.base, storage_options=options)
    adapted = build_model("mimo-unet", exported)
    report = {"archive": args.archive, "train_images": len(train_uris),
              "held_out_images": len(held_out), "steps": args.steps,
              "base_psnr_y": adaptation.self_supervised_psnr(base, held_out_images),
              "adapted_psnr_y": adaptation.self_supervised_psnr(adapted, held_out_images)}
    report["gain_db"] = report["adapted_psnr_y"] - report["base_psnr_y"]
    report["kept"] = "adapted" if report["gain_db"] >= args.min_gain_db else "base"
    chosen = adapted_uri if report["kept"] == "adapted" else args.base
    storage.write_bytes_atomic(args.output, storage.read_bytes(chosen, options), options)
    storage.write_bytes_atomic(args.output.rsplit(".", 1)[0] + ".json",
                               json.dumps(report, indent=2).encode(), options)
    print(f"held-out check on {len(held_out)} thumbnails: base {report['base_psnr_y']:.2f} dB, "
          f"adapted {report['adapted_psnr_y']:.2f} dB ({report['gain_db']:+.2f}); "
          f"kept the {report['kept']} model at {args.output}")
    return 0


def _exported_after(uri: str, steps: int, options: dict) -> Checkpoint | None:
    """This run's (its --name in its --storage) exported model, if it was exported after
    ``steps`` steps already: the export is written last, so a rerun after a failed check or a
    lost output need not start the trainer again. With more steps asked for, the trainer
    resumes the run."""
    try:
        checkpoint = read_checkpoint(uri, options)
        card = json.loads(checkpoint.meta["model_card"])
    except (FileNotFoundError, CheckpointError, KeyError, ValueError):
        return None
    return checkpoint if card.get("steps_done", 0) >= steps else None


if __name__ == "__main__":
    sys.exit(main())
