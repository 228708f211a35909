"""Run records: each run's settings, checkpoint and counts as JSON under ``{output}/runs/``.

The ledger says what happened to each image; a record says how the run was configured. Records
are a convenience: one that cannot be read is skipped with a warning, never an error.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from datetime import datetime

from pipeline import safe_text, storage

logger = logging.getLogger(__name__)

# Run records' format, in each record's "format" key.
#   1  2026-11-27: no "format" key
#   2  2026-12-04: "format"; secrets redacted
RUN_RECORD_FORMAT = 2


def write_run_record(output_uri: str, record: Mapping, options: Mapping | None = None) -> str:
    """One run's settings, checkpoint and counts as JSON under ``{output}/runs/``: the ledger
    says what happened to each image, this says how the run was configured. Credentials in
    it (URLs' userinfo and tokens, storage options, the environment's) are redacted."""
    uri = storage.join(output_uri, "runs", f"run-{record['run_id']}.json")
    record = safe_text.redact_obj({"format": RUN_RECORD_FORMAT, **record}, options)
    data = json.dumps(record, indent=2, sort_keys=True, default=str).encode()
    storage.write_bytes_atomic(uri, data, options)
    return uri


def read_run_records(output_uri: str, options: Mapping | None = None) -> list[dict]:
    """The run records under ``{output}/runs/``, oldest first (run ids sort by start time),
    redacted as written today, including those an earlier release wrote.

    A record that cannot be read or is not one (bad JSON, fields of the wrong type) is skipped
    with a warning: records are a convenience, the ledger is the truth.
    """
    fs, files = _record_files(output_uri, options)
    records = [record for record in (_read(fs, f, options) for f in files) if record]
    return sorted(records, key=lambda r: r["run_id"])


def newest_run_record(output_uri: str, options: Mapping | None = None,
                      wanted: Callable[[dict], bool] = lambda record: True) -> dict | None:
    """The newest usable run record for which ``wanted`` holds, reading records newest first
    until one does: a nightly run reads one record, not every earlier night's."""
    fs, files = _record_files(output_uri, options)
    for f in reversed(files):
        record = _read(fs, f, options)
        if record and wanted(record):
            return record
    return None


def _record_files(output_uri: str, options: Mapping | None):
    """The filesystem and the record files under ``{output}/runs/``, oldest first."""
    fs, path = storage.filesystem(storage.join(output_uri, "runs"), options)
    try:
        names = fs.ls(path, detail=False)
    except FileNotFoundError:
        names = []
    return fs, sorted(f for f in names
                      if f.rsplit("/", 1)[-1].startswith("run-") and f.endswith(".json"))


def _read(fs, f: str, options: Mapping | None) -> dict | None:
    """The record in file ``f``, redacted; None, with a warning, when it is not usable."""
    try:
        record = json.loads(fs.cat_file(f))
        problem = run_record_problem(record)
    except (OSError, ValueError) as e:
        problem = f"{e.__class__.__name__}: {e}"
    if problem:
        logger.warning(f"skipping run record {f}: {problem}")
        return None
    return safe_text.redact_obj(record, options)


def run_record_problem(record) -> str | None:
    """Why ``record`` is not a run record this release can use, or None."""
    if not isinstance(record, dict):
        return f"not a JSON object but {type(record).__name__}"
    if not isinstance(record.get("run_id"), str):
        return "no run_id"
    if not isinstance(record.get("format", 1), int) or record.get("format", 1) > RUN_RECORD_FORMAT:
        return f"format {record.get('format')!r}, newer than this release reads"
    for name in ("images_per_s", "ok", "errors", "rows_done"):
        if record.get(name) is not None and not isinstance(record[name], (int, float)):
            return f"{name} is not a number"
    for name in ("started_at", "listed_at", "finished_at"):
        if record.get(name) is not None:
            try:
                datetime.fromisoformat(str(record[name]))
            except ValueError:
                return f"{name} is not a time: {str(record[name])[:40]!r}"
    if record.get("config") is not None and not isinstance(record["config"], dict):
        return "config is not an object"
    return None
