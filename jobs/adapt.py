"""Adapt a checkpoint to an archive of thumbnails without originals; keep it only if better.

    python -m jobs.adapt --archive s3://bucket/thumbs/ --base checkpoints/mimo-unet-thumb-x2.pt \
        --output s3://bucket/models/adapted.pt [--steps 500] [--storage runs --name adapt]

Writes the better of the adapted and the base model to --output, prints the held-out check and
writes it as JSON next to the output (``.json``).
"""

from __future__ import annotations

import argparse
import sys

from pipeline.safe_text import console_logging
from pipeline.training.adaptation import AdaptSettings, adapt


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
    with console_logging(stream="stdout"):
        report = adapt(AdaptSettings(**vars(args)))
    if report is None:
        return 1
    print(f"held-out check on {report['held_out_images']} thumbnails: base "
          f"{report['base_psnr_y']:.2f} dB, adapted {report['adapted_psnr_y']:.2f} dB "
          f"({report['gain_db']:+.2f}); kept the {report['kept']} model at {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
