"""Report on an output's metrics: all runs merged, the newest row per image.

    python -m jobs.report OUTPUT_URI [--config PATH] [--errors N] [--compact] [--html PAGE]
                                     [--remove-orphans]

``--compact`` folds the history into one table of the newest row per image (one Parquet file),
so that later runs and reports read one file instead of every run's. ``--html PAGE`` writes a
self-contained page (counts, error reasons, sharpness histograms, stage times, a before/after
gallery, the newest run's settings); PAGE may be a local path or a URI. With shard layouts it
counts the shards no ledger row names (a killed run's, a retried task's) and their bytes, and
on S3 the shard uploads never completed (parts stored, billed, and shown by no listing);
``--remove-orphans`` removes both, holding the output's lease so that no run writes meanwhile.
"""

from __future__ import annotations

import argparse
import logging
import sys
import uuid
from collections import Counter

from pipeline import storage
from pipeline.config import ConfigError, load_config
from pipeline.restore import shards
from pipeline.restore.lease import Lease
from pipeline.restore.ledger import LedgerFormatError, compact, latest_per_item, read_metrics
from pipeline.restore.report_page import write_report
from pipeline.safe_text import console_logging, for_console, printable


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.report",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("output", help="the job's output URI (holds metrics/)")
    parser.add_argument("--config", help="job config, for its storage settings")
    parser.add_argument("--errors", type=int, default=10, help="error reasons to list")
    parser.add_argument("--compact", action="store_true",
                        help="replace the metrics files with one of the newest row per image")
    parser.add_argument("--html", metavar="PAGE",
                        help="also write the report as one self-contained HTML page")
    parser.add_argument("--remove-orphans", action="store_true",
                        help="remove the shards no ledger row names (taking the output's "
                             "lease: refused while a run writes into it)")
    args = parser.parse_args(argv)
    with console_logging(level=logging.WARNING):  # skipped files and records, on stderr
        return _report(args)


def _report(args: argparse.Namespace) -> int:
    options = None

    def say(text: str, stream=sys.stdout) -> None:  # ids and reasons come from the input
        print(for_console(text, options), file=stream)

    def warn(text: str) -> None:
        say(text, sys.stderr)

    try:
        options = load_config(args.config, {"input.manifest": "unused"}).storage.fsspec_options()
        metrics_uri = storage.join(args.output, "metrics")
        everything = read_metrics(metrics_uri, options)
    except (ConfigError, LedgerFormatError) as e:
        warn(f"error: {e}")
        return 2
    if not everything.num_rows:
        warn(f"error: no metrics under {metrics_uri}")
        return 2
    latest = latest_per_item(everything)
    if args.compact:
        replaced = compact(metrics_uri, latest, options)
        say(f"compacted {replaced} metrics file(s) into one of {latest.num_rows} rows")
    runs = sorted(set(everything["run_id"].to_pylist()))
    status = Counter(latest["status"].to_pylist())
    say(f"{metrics_uri}: {len(runs)} run(s), {everything.num_rows} rows, "
        f"{latest.num_rows} images")
    for name, count in sorted(status.items()):
        say(f"  {printable(str(name), newlines=False)}: {count}")
    reasons = Counter(e for e, s in zip(latest["error"].to_pylist(), latest["status"].to_pylist())
                      if s != "ok")
    for reason, count in reasons.most_common(args.errors):
        say(f"  x{count}  {printable(str(reason), newlines=False)}")
    left = shards.orphans(args.output, set(everything["output_uri"].to_pylist()), options)
    uploads = shards.unfinished_uploads(args.output, options)
    if (left or uploads) and args.remove_orphans:
        return _remove_orphans(args.output, options, say, warn)
    if left:
        say(f"  orphaned shards: {len(left)}, {sum(size for _, size in left):,} bytes, named "
            "by no ledger row (left by a killed run or a retried task); remove them with: "
            f"python -m jobs.report {args.output} --remove-orphans")
    if uploads:
        say(f"  unfinished shard uploads: {len(uploads)}, {sum(s for *_, s in uploads):,} "
            "bytes in their parts, stored and billed though no listing shows them (a run "
            "killed while writing them, or one writing now); abort them with: "
            f"python -m jobs.report {args.output} --remove-orphans")
    if args.html:
        page = write_report(args.output, args.html, options, latest=latest)
        say(f"report page: {page}")
    return 0


def _remove_orphans(output: str, options, say, warn) -> int:
    """The orphaned shards removed under the output's lease: a run writing now has shards
    that its ledger rows do not name yet, and must not lose them."""
    lease = Lease(output, f"report-{uuid.uuid4().hex[:8]}", options)
    try:
        lease.acquire()
    except (ConfigError, OSError) as e:
        warn(f"error: orphans not removed: {e}")
        return 2
    try:  # what the ledger names now, with the lease held
        named = set(read_metrics(storage.join(output, "metrics"), options)[
            "output_uri"].to_pylist())
        left = shards.orphans(output, named, options)
        fs, _ = storage.filesystem(output, options)
        if left:
            fs.rm([name for name, _ in left])
        say(f"  removed {len(left)} orphaned shard(s), {sum(s for _, s in left):,} bytes")
        uploads = shards.unfinished_uploads(output, options)
        if uploads:
            shards.abort_uploads(uploads, output, options)
            say(f"  aborted {len(uploads)} unfinished shard upload(s), "
                f"{sum(s for *_, s in uploads):,} bytes")
    finally:
        lease.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
