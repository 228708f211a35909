"""Restore thumbnails 2x with MIMO-UNet on Ray Data.

    python -m jobs.restore [--config PATH] [--manifest URI] [--output URI] [--checkpoint URI]
                           [--since TIME|last] [--device auto|cpu|cuda]
                           [--engine auto|ray|local] [--compile MODE] [--self-ensemble]
                           [--metadata keep|strip-location|strip]
                           [--layout files|webdataset|parquet] [--images-per-shard N]
                           [--force] [--dry-run] [--verbose]

A rerun into the same output skips images already restored with the same checkpoint;
--dry-run prints what a run would do (rows total, done, to do) and touches nothing.

Exit status: 0 when every manifest row has exactly one metrics row (per-image failures are
rows with status 'error'), 1 when rows went missing, 2 for a bad config or unusable input, 3
when error rows exceed limits.max_error_rate of the input (default half), 4 when a stage
failed outside its per-image handling (a bug or a broken environment; its traceback is
printed, and the rows restored before it stay done), 5 when the output stopped taking writes
during the run (full disk, quota, permission: free space and rerun; it does the rest).
"""

from __future__ import annotations

import argparse
import sys

from pipeline.config import DEFAULT_CONFIG, ConfigError, load_config
from pipeline.restore.manifest import ManifestError
from pipeline.restore.plan import plan_restore
from pipeline.safe_text import console_logging, for_console


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.restore",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML job config")
    parser.add_argument("--manifest", help="manifest file or prefix URI (overrides input.manifest)")
    parser.add_argument("--output", help="output URI (overrides output.uri)")
    parser.add_argument("--checkpoint", help="checkpoint path or URI (overrides model.checkpoint)")
    parser.add_argument("--since", metavar="TIME",
                        help="list only images modified after TIME (ISO 8601) or 'last' (the "
                             "newest earlier run's start); overrides input.since")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"],
                        help="overrides inference.device")
    parser.add_argument("--engine", choices=["auto", "ray", "local"],
                        help="what runs the stages: Ray Data, or one local worker process "
                             "without Ray (overrides resources.engine)")
    parser.add_argument("--compile", choices=["none", "default", "reduce-overhead"],
                        help="torch.compile the model in each actor: faster on long runs, "
                             "after a compile per image shape (overrides inference.compile)")
    parser.add_argument("--self-ensemble", action="store_true", default=None,
                        help="average over 8 flips/rotations: a little sharper, 8x slower "
                             "(sets inference.self_ensemble)")
    parser.add_argument("--metadata", choices=["keep", "strip-location", "strip"],
                        help="the input's EXIF/XMP/IPTC in the output: kept (made true), "
                             "without location, or none (overrides output.metadata)")
    parser.add_argument("--layout", choices=["files", "webdataset", "parquet"],
                        help="the restored images as files, or in shards: WebDataset tar or "
                             "Parquet (overrides output.layout)")
    parser.add_argument("--images-per-shard", type=int, metavar="N",
                        help="images in each shard (overrides output.images_per_shard)")
    parser.add_argument("--force", action="store_true",
                        help="redo images already restored into this output")
    parser.add_argument("--dry-run", action="store_true",
                        help="plan only: count the rows done and to do, touch no image")
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray Data's own progress and logs")
    return parser


def config_of(args: argparse.Namespace):
    """The job's config: the file, with the flags given on the command line over it."""
    return load_config(args.config, {
        "input.manifest": args.manifest, "input.since": args.since, "output.uri": args.output,
        "model.checkpoint": args.checkpoint, "inference.device": args.device,
        "resources.engine": args.engine, "inference.self_ensemble": args.self_ensemble,
        "inference.compile": args.compile, "output.metadata": args.metadata,
        "output.layout": args.layout, "output.images_per_shard": args.images_per_shard,
    })


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # The library's notes: beside the summary on stdout; off the plan's stdout in a dry run.
    with console_logging(stream="stderr" if args.dry_run else "stdout"):
        return _main(args)


def _main(args: argparse.Namespace) -> int:
    try:
        config = config_of(args)
        if args.dry_run:
            print(for_console(plan_restore(config, force=args.force).render()))
            return 0
    except (ConfigError, ManifestError, FileNotFoundError) as e:
        _warn(f"error: {e}")
        return 2
    return _run(config, args)


def _warn(text: str) -> None:
    # Ids, keys and error messages come from the input, URLs may carry credentials.
    print(for_console(text), file=sys.stderr)


def _run(config, args) -> int:
    # torch (and Ray, for its engine) load here, for a real run only: a dry run plans with
    # Arrow alone.
    from pipeline.models import CheckpointError
    from pipeline.restore.engine import StageError
    from pipeline.restore.run import OutputUnwritable, run_restore

    try:
        summary = run_restore(config, force=args.force, verbose=args.verbose)
    except (ConfigError, ManifestError, CheckpointError, FileNotFoundError) as e:
        # all raised before any work starts
        _warn(f"error: {e}")
        return 2
    except StageError as e:
        _warn(f"error: {e}")
        return 4
    except OutputUnwritable as e:
        _warn(f"error: {e}")
        return 5
    print(for_console(summary.render()))
    if not summary.complete:
        return 1
    return 3 if summary.too_many_errors else 0


if __name__ == "__main__":
    sys.exit(main())
