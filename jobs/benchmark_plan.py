"""Planning at scale: seconds and peak driver memory to plan a run over a big manifest.

    python -m jobs.benchmark_plan [--rows 1000000 2000000 10000000] [--dir DIR] [--json PATH]

For each size it writes (once, under --dir) a Parquet manifest of that many rows and a ledger
with half of them restored by an earlier run, in files of 100k rows as a run writes them. It
then plans in a fresh process, twice: as ``jobs.restore --dry-run`` does (Arrow alone), and
with what a running driver has loaded besides (Ray, torch). Nothing is restored.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from pipeline.restore.plan_benchmark import measure, run_sizes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.benchmark_plan",
                                description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 2_000_000])
    p.add_argument("--dir", type=Path, help="where the inputs are made (and kept); a temp dir")
    p.add_argument("--json", type=Path)
    p.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # the child process
    p.add_argument("--driver-imports", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure:
        if args.driver_imports:
            import pipeline.restore.ray_engine  # noqa: F401  (Ray, Ray Data, torch: a driver's)
        print(json.dumps(measure(args.measure)))
        return 0

    def show(r: dict) -> None:
        print(f"{r['rows']:>10} rows  {r['process']:<26} {r['seconds']:6.1f} s  "
              f"peak RSS {r['peak_rss_gb']:.2f} GB (imports {r['imports_gb']:.2f} GB)  "
              f"{r['to_do']} to do", flush=True)

    results = run_sizes(args.rows, args.dir or Path(tempfile.mkdtemp(prefix="plan-bench-")), show)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
