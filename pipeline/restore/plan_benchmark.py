"""Planning at scale: seconds and peak driver memory to plan a run over a big manifest (the
measuring code of ``python -m jobs.benchmark_plan``, whose docstring says what it does)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
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


def run_sizes(sizes: list[int], base: Path, on_result=None) -> list[dict]:
    """For each size, the inputs made (once) under ``base`` and planned in a fresh process,
    as a dry run does and with a driver's imports; ``on_result`` sees each figure as it comes."""
    results = []
    for rows in sizes:
        root = make_inputs(base / f"rows-{rows}", rows)
        for label, extra in (("dry run (Arrow only)", []),
                             ("driver (with Ray, torch)", ["--driver-imports"])):
            out = subprocess.run([sys.executable, "-m", "jobs.benchmark_plan", "--measure",
                                  str(root), *extra], check=True, capture_output=True, text=True)
            results.append({"process": label, **json.loads(out.stdout.splitlines()[-1])})
            if on_result:
                on_result(results[-1])
    return results

