"""Report on an output's metrics: all runs merged, the newest row per image.

    python -m jobs.report OUTPUT_URI [--config PATH] [--errors N] [--compact] [--html PAGE]

``--compact`` folds the history into one table of the newest row per image (one Parquet file),
so that later runs and reports read one file instead of every run's. ``--html PAGE`` writes a
self-contained page (counts, error reasons, sharpness histograms, stage times, a before/after
gallery, the newest run's settings); PAGE may be a local path or a URI.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

from pipeline import storage
from pipeline.config import ConfigError, load_config
from pipeline.report_page import write_report
from pipeline.results import compact, latest_per_item, read_metrics


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
    args = parser.parse_args(argv)
    try:
        options = load_config(args.config, {"input.manifest": "unused"}).storage.fsspec_options()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    metrics_uri = storage.join(args.output, "metrics")
    everything = read_metrics(metrics_uri, options, log=lambda m: print(m, file=sys.stderr))
    if not everything.num_rows:
        print(f"error: no metrics under {metrics_uri}", file=sys.stderr)
        return 2
    latest = latest_per_item(everything)
    if args.compact:
        replaced = compact(metrics_uri, latest, options)
        print(f"compacted {replaced} metrics file(s) into one of {latest.num_rows} rows")
    runs = sorted(set(everything["run_id"].to_pylist()))
    status = Counter(latest["status"].to_pylist())
    print(f"{metrics_uri}: {len(runs)} run(s), {everything.num_rows} rows, "
          f"{latest.num_rows} images")
    for name, count in sorted(status.items()):
        print(f"  {name}: {count}")
    reasons = Counter(e for e, s in zip(latest["error"].to_pylist(), latest["status"].to_pylist())
                      if s != "ok")
    for reason, count in reasons.most_common(args.errors):
        print(f"  x{count}  {reason}")
    if args.html:
        print(f"report page: {write_report(args.output, args.html, options, latest=latest)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
