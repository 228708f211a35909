"""Planning at scale: seconds and peak driver memory to plan a run over a big manifest.

    python -m jobs.benchmark_plan [--rows 1000000 2000000 10000000] [--dir DIR] [--json PATH]

For each size it writes (once, under --dir) a Parquet manifest of that many rows and a ledger
with half of them restored by an earlier run, in files of 100k rows as a run writes them. It
then plans in a fresh process, twice: as ``jobs.restore --dry-run`` does (Arrow alone), and
with what a running driver has loaded besides (Ray, torch). Nothing is restored.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import DEFAULT_CONFIG, load_config
from pipeline.restore.ledger import METRICS_SCHEMA, write_table
from pipeline.restore.plan import output_settings_sha256

LEDGER_FILE_ROWS = 100_000  # what LedgerWriter writes per file


def make_inputs(root: Path, rows: int) -> Path:
    """``root/manifest.parquet`` and ``root/out/metrics/`` with the first half done."""
    if (root / "manifest.parquet").exists():
        return root
    config = load_config(DEFAULT_CONFIG)
    sha = hashlib.sha256(Path(config.model.checkpoint).read_bytes()).hexdigest()
    n = pa.array(np.arange(rows, dtype=np.int64))
    ids = pc.binary_join_element_wise(
        "shard", pc.cast(pc.divide(n, 1000), pa.string()), "/img", pc.cast(n, pa.string()), "")
    uris = pc.binary_join_element_wise("s3://bucket/thumbs/", ids, ".jpg", "")
    root.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"uri": uris, "id": ids}), root / "manifest.parquet")
    done = rows // 2
    now = pa.scalar(datetime.now(timezone.utc), pa.timestamp("ms", tz="UTC"))
    fixed = {"status": "ok", "model": config.model.name, "checkpoint_sha256": sha,
             "settings_sha256": output_settings_sha256(config),
             "run_id": "20260101T000000-aaaaaa"}
    for part, start in enumerate(range(0, done, LEDGER_FILE_ROWS)):
        k = min(LEDGER_FILE_ROWS, done - start)
        columns = {"row": n.slice(start, k), "id": ids.slice(start, k),
                   "source_uri": uris.slice(start, k),
                   "finished_at": pa.array(np.full(k, now.value), pa.timestamp("ms", tz="UTC")),
                   **{name: pa.array([value] * k, pa.string()) for name, value in fixed.items()}}
        table = pa.table({f.name: columns.get(f.name, pa.nulls(k, f.type))
                          for f in METRICS_SCHEMA}, schema=METRICS_SCHEMA)
        write_table(table, str(root / "out" / "metrics" /
                               f"run-20260101T000000-aaaaaa_p0_{part:05d}.parquet"))
    return root


def measure(root: Path) -> dict:
    """Plans once in this process (which should be fresh); seconds and peak RSS."""
    from pipeline.restore.plan import plan_restore

    config = load_config(DEFAULT_CONFIG, {"input.manifest": str(root / "manifest.parquet"),
                                          "output.uri": str(root / "out")})
    before = peak_rss_gb()
    t = time.perf_counter()
    plan = plan_restore(config)
    seconds = time.perf_counter() - t
    return {"seconds": round(seconds, 2), "imports_gb": round(before, 3),
            "peak_rss_gb": round(peak_rss_gb(), 3), "rows": plan.total,
            "to_do": plan.rows.num_rows}


def peak_rss_gb() -> float:
    """This process's peak resident memory. Not getrusage's ru_maxrss, which a child process
    inherits from its parent across fork and exec."""
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kb * 1024 / 1e9


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
            import pipeline.restore.ray_engine  # noqa: F401  (Ray, Ray Data, torch: a running driver's)
        print(json.dumps(measure(args.measure)))
        return 0
    base = args.dir or Path(tempfile.mkdtemp(prefix="plan-bench-"))
    results = []
    for rows in args.rows:
        root = make_inputs(base / f"rows-{rows}", rows)
        for label, extra in (("dry run (Arrow only)", []),
                             ("driver (with Ray, torch)", ["--driver-imports"])):
            out = subprocess.run([sys.executable, "-m", "jobs.benchmark_plan", "--measure",
                                  str(root), *extra], check=True, capture_output=True, text=True)
            results.append({"process": label, **json.loads(out.stdout.splitlines()[-1])})
            r = results[-1]
            print(f"{r['rows']:>10} rows  {label:<26} {r['seconds']:6.1f} s  "
                  f"peak RSS {r['peak_rss_gb']:.2f} GB (imports {r['imports_gb']:.2f} GB)  "
                  f"{r['to_do']} to do", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
