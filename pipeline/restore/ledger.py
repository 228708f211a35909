"""The metrics rows: their schema, reading them back, and the job summary."""

from __future__ import annotations

import contextlib
import io
import json
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import safe_text, storage

METRICS_SCHEMA = pa.schema([
    ("row", pa.int64()),
    ("id", pa.string()),
    ("source_uri", pa.string()),
    ("output_uri", pa.string()),
    ("status", pa.string()),  # "ok" or "error"
    ("error", pa.string()),  # "stage: reason" for error rows, null for ok rows
    ("in_width", pa.int32()),  # the decoded thumbnail
    ("in_height", pa.int32()),
    ("out_width", pa.int32()),  # the restored image, 2x the input
    ("out_height", pa.int32()),
    ("lapvar_in", pa.float64()),  # measured on the bicubic 2x image ...
    ("lapvar_out", pa.float64()),  # ... and on the restored one, so the two compare
    ("tenengrad_in", pa.float64()),
    ("tenengrad_out", pa.float64()),
    ("bytes_in", pa.int64()),
    ("bytes_out", pa.int64()),
    ("read_s", pa.float64()),
    ("decode_s", pa.float64()),
    ("restore_s", pa.float64()),
    ("write_s", pa.float64()),
    ("model", pa.string()),
    ("checkpoint_sha256", pa.string()),
    ("settings_sha256", pa.string()),  # of the settings that change the output file
    ("device", pa.string()),
    ("precision", pa.string()),  # the weights' dtype the restore ran in: fp32, bf16, fp16
    ("run_id", pa.string()),
    ("finished_at", pa.timestamp("ms", tz="UTC")),
])

# The ledger's format, kept in each Parquet file's key-value metadata. Every release reads every
# earlier format, by column presence (a column a file lacks reads as nulls, whose meaning is
# in LEGACY_NULLS); a file of a newer format stops the run (exit 2) instead of being misread.
#   1  2026-11-25: the first release
#   2  2026-11-26: + precision
#   3  2026-11-27: + settings_sha256; the format key itself is written from 2026-12-04 on
LEDGER_FORMAT = 3
LEDGER_FORMAT_KEY = b"mimo_restore.ledger_format"

# What a null means in a column an earlier release did not write.
LEGACY_NULLS = {
    "precision": "not recorded (releases before 2026-11-26 ran fp32 or bf16 as configured)",
    "settings_sha256": "not recorded (releases before 2026-11-27): such an ok row counts as "
                       "made with the current output settings, as those releases took it; "
                       "--force redoes it",
}


class LedgerFormatError(ValueError):
    """A ledger file written by a newer release than this one."""


# Between stages each row also carries its pixels: the bicubic 2x image, then the restored one.
WORK_SCHEMA = METRICS_SCHEMA.append(pa.field("pixels", pa.large_binary()))


def to_table(rows: list[dict], schema: pa.Schema = WORK_SCHEMA) -> pa.Table:
    """Rows as dicts (missing keys are null) -> a table of exactly ``schema``. Pixels (bytes or
    uint8 arrays) are laid into the column's buffer directly, one copy each: Arrow's per-value
    builder copied a block's restored images several times as its buffer grew."""
    if "pixels" not in schema.names:
        return pa.Table.from_pylist(rows, schema=schema)
    i = schema.get_field_index("pixels")
    table = pa.Table.from_pylist([{k: v for k, v in row.items() if k != "pixels"} for row in rows],
                                 schema=schema.remove(i))
    return table.add_column(i, schema.field(i), pixels_array([row.get("pixels") for row in rows]))


def pixels_array(values: list) -> pa.Array:
    """A ``large_binary`` array of ``values`` (bytes, uint8 arrays or None)."""
    views = [None if v is None else np.frombuffer(v, np.uint8) if isinstance(v, bytes)
             else np.asarray(v, np.uint8).reshape(-1) for v in values]
    offsets = np.zeros(len(views) + 1, np.int64)
    np.cumsum([0 if v is None else v.size for v in views], out=offsets[1:])
    data = np.empty(offsets[-1], np.uint8)
    for view, start in zip(views, offsets):
        if view is not None:
            data[start:start + view.size] = view
    valid = np.array([v is not None for v in views], bool)
    nulls = len(views) - int(valid.sum())
    bitmap = pa.py_buffer(np.packbits(valid, bitorder="little")) if nulls else None
    return pa.Array.from_buffers(pa.large_binary(), len(views),
                                 [bitmap, pa.py_buffer(offsets), pa.py_buffer(data)], nulls)


def to_rows(table: pa.Table) -> list[dict]:
    """``table``'s rows as dicts, each row's pixels a read-only uint8 view of the table's own
    buffer (None where null) rather than a copy in a bytes object."""
    if "pixels" not in table.column_names:
        return table.to_pylist()
    rows = table.drop_columns(["pixels"]).to_pylist()
    for row, pixels in zip(rows, pixel_views(table.column("pixels"))):
        row["pixels"] = pixels
    return rows


def pixel_views(column: pa.ChunkedArray) -> list[np.ndarray | None]:
    """Each value of a binary column as a uint8 view of its buffer, None where null."""
    views: list[np.ndarray | None] = []
    for chunk in column.chunks:
        chunk = chunk.cast(pa.large_binary())
        _, offsets_buffer, data_buffer = chunk.buffers()
        start = chunk.offset
        offsets = np.frombuffer(offsets_buffer, np.int64)[start:start + len(chunk) + 1]
        data = (np.frombuffer(data_buffer, np.uint8) if data_buffer is not None
                else np.empty(0, np.uint8))
        nulls = chunk.is_null().to_numpy(zero_copy_only=False)
        views += [None if null else data[a:b]
                  for null, a, b in zip(nulls, offsets[:-1], offsets[1:])]
    return views


def write_table(table: pa.Table, uri: str, options: Mapping | None = None) -> None:
    """``table`` as one Parquet object at ``uri``, published whole (see storage)."""
    buf = io.BytesIO()
    table = table.select(METRICS_SCHEMA.names).cast(METRICS_SCHEMA)
    table = table.replace_schema_metadata({LEDGER_FORMAT_KEY: str(LEDGER_FORMAT).encode()})
    # Row groups of 64k rows: a reader of a compacted ledger goes through it in small steps.
    pq.write_table(table, buf, row_group_size=64 * 1024)
    storage.write_bytes_atomic(uri, buf.getvalue(), options)


class LedgerWriter:
    """Appends one run's metrics rows to Parquet files under ``metrics/``, each published whole.

    A file is written when ``rows_per_file`` rows have gathered or ``seconds_per_file`` have
    passed, whichever comes first: few files for a long run (the ledger every later run reads),
    and a killed driver loses at most the last few minutes of rows, which the next run redoes.
    """

    def __init__(self, metrics_uri: str, options: Mapping | None, prefix: str,
                 rows_per_file: int = 100_000, seconds_per_file: float = 300.0):
        self.metrics_uri, self.options, self.prefix = metrics_uri, options, prefix
        self.rows_per_file, self.seconds_per_file = rows_per_file, seconds_per_file
        self.pending: list[pa.Table] = []
        self.rows_written: list[pa.ChunkedArray] = []  # the "row" column of everything written
        self.files = 0
        self.opened = time.time()

    def write(self, table: pa.Table) -> None:
        self.pending.append(table)
        if (sum(t.num_rows for t in self.pending) >= self.rows_per_file
                or time.time() - self.opened >= self.seconds_per_file):
            self.flush()

    def flush(self) -> None:
        table = pa.concat_tables(self.pending) if self.pending else None
        self.pending, self.opened = [], time.time()
        if table is None or not table.num_rows:
            return
        name = f"{self.prefix}_{self.files:05d}.parquet"
        write_table(table, storage.join(self.metrics_uri, name), self.options)
        self.files += 1
        self.rows_written.append(table["row"])

    def written_rows(self) -> pa.Array:
        """Manifest row numbers of every row written so far."""
        chunks = [c for col in self.rows_written for c in col.chunks]
        return pa.concat_arrays(chunks) if chunks else pa.array([], pa.int64())


def merge_run_files(metrics_uri: str, run_id: str, options: Mapping | None = None,
                    rows_per_file: int = 100_000) -> int:
    """Fold one run's small metrics files into files of ``rows_per_file`` rows, once the run is
    over: a slow run writes a file every few minutes (so that a killed driver loses little),
    and the ledger every later run reads should not keep them all. Files are read one at a
    time and at most ``rows_per_file`` rows are held. The merged files are written before the
    small ones are removed, so a crash in between leaves rows twice, which readers take as one
    (the newest row per item), never none.

    Returns:
        How many files were replaced (0 when the run's files were already few enough).
    """
    fs, path = storage.filesystem(metrics_uri, options)
    try:
        files = sorted(f for f in fs.find(path)
                       if f.rsplit("/", 1)[-1].startswith(f"run-{run_id}_")
                       and f.endswith(".parquet"))
    except FileNotFoundError:
        return 0
    rows = {}
    for f in files:
        with fs.open(f, "rb") as fh:
            rows[f] = pq.ParquetFile(fh).metadata.num_rows
    small = [f for f in files if rows[f] < rows_per_file]
    if len(small) <= max(1, -(-sum(rows[f] for f in small) // rows_per_file)):
        return 0
    merged, pending = [], []  # merged: paths in fs

    def write(table: pa.Table) -> None:
        uri = storage.join(metrics_uri, f"run-{run_id}_merged_{len(merged):05d}.parquet")
        write_table(table, uri, options)
        merged.append(storage.filesystem(uri, options)[1])

    try:
        for f in small:
            pending.append(_read_parquet(fs, f, METRICS_SCHEMA))
            table = pa.concat_tables(pending)
            while table.num_rows >= rows_per_file:
                write(table.slice(0, rows_per_file))
                table = table.slice(rows_per_file)
            pending = [table]
        if pending[0].num_rows:
            write(pending[0])
    except Exception:
        for merged_path in merged:  # the small files stay, and no row is left twice
            with contextlib.suppress(OSError):
                fs.rm_file(merged_path)
        raise
    for f in small:
        fs.rm_file(f)
    return len(small)


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


def read_run_records(output_uri: str, options: Mapping | None = None,
                     log=None) -> list[dict]:
    """The run records under ``{output}/runs/``, oldest first (run ids sort by start time),
    redacted as written today, including those an earlier release wrote.

    A record that cannot be read or is not one (bad JSON, fields of the wrong type) is skipped
    with a message to ``log``: records are a convenience, the ledger is the truth.
    """
    fs, path = storage.filesystem(storage.join(output_uri, "runs"), options)
    try:
        files = sorted(f for f in fs.ls(path, detail=False)
                       if f.rsplit("/", 1)[-1].startswith("run-") and f.endswith(".json"))
    except FileNotFoundError:
        return []
    records = []
    for f in files:
        try:
            record = json.loads(fs.cat_file(f))
            problem = run_record_problem(record)
        except (OSError, ValueError) as e:
            problem = f"{e.__class__.__name__}: {e}"
        if problem:
            if log:
                log(f"skipping run record {f}: {problem}")
            continue
        records.append(safe_text.redact_obj(record, options))
    return sorted(records, key=lambda r: r["run_id"])


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


# What planning reads of the ledger: which rows are done, by which run, model, checkpoint and
# settings. The repeated strings come as dictionaries: a tenth of the memory at a million rows.
LEDGER_SCHEMA = pa.schema([
    pa.field(f.name, pa.dictionary(pa.int32(), pa.string()))
    if f.name in ("status", "model", "checkpoint_sha256", "settings_sha256", "run_id") else f
    for f in METRICS_SCHEMA if f.name in (
        "row", "id", "source_uri", "status", "model", "checkpoint_sha256", "settings_sha256",
        "run_id", "finished_at")])


def read_metrics(metrics_uri: str, options: Mapping | None = None,
                 run_id: str | None = None, log=None,
                 schema: pa.Schema = METRICS_SCHEMA, attempts: int = 4) -> pa.Table:
    """All metrics rows under ``metrics_uri`` (empty if there are none), or those of one run.

    Files are read in parallel, only the columns of ``schema``. One that is not Parquet is
    skipped (with a message to ``log``): a driver killed mid-write can leave a partial file, and
    its rows are simply redone by the next run. A storage error is retried ``attempts`` times
    and then raised (OSError), rather than redo the rows of a file that is fine.
    """
    fs, path = storage.filesystem(metrics_uri, options)
    try:
        files = sorted(f for f in fs.find(path) if f.endswith(".parquet"))
    except FileNotFoundError:
        files = []
    if run_id is not None:
        files = [f for f in files if f.rsplit("/", 1)[-1].startswith(f"run-{run_id}_")]

    def read(f: str) -> pa.Table | None:
        for attempt in range(attempts):
            try:
                table = _read_parquet(fs, f, schema)
                break
            except FileNotFoundError:
                return None  # compacted away since the listing; the new file holds its rows
            except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
                # Not Parquet (a partial write by a killed driver): its rows are redone.
                if log:
                    log(f"skipping unreadable metrics file {f}: {e}")
                return None
            except OSError:
                # The storage failed, not the file: treating it as partial would redo every
                # row it holds, so it is read again, and the run stops if it stays unreadable.
                if attempt == attempts - 1:
                    raise
                time.sleep(min(8.0, 0.5 * 2 ** attempt))
        # Another program's Parquet in metrics/ reads as all-null columns: not ledger rows.
        if table.num_rows and (table["status"].null_count or table["row"].null_count):
            if log:
                log(f"skipping {f}: not a metrics file of this job (no row/status columns)")
            return None
        return table

    with ThreadPoolExecutor(max_workers=8) as pool:
        tables = [t for t in pool.map(read, files) if t is not None]
    return pa.concat_tables(tables) if tables else schema.empty_table()


def ledger_format(metadata: Mapping | None) -> int:
    """The ledger format a file's key-value metadata names; files written before the key
    existed are of format 3 at most, and read by column presence like every format."""
    value = (metadata or {}).get(LEDGER_FORMAT_KEY)
    if value is None:
        return LEDGER_FORMAT
    try:
        return int(value)
    except ValueError:
        raise LedgerFormatError(f"unreadable ledger format {value!r}") from None


def _read_parquet(fs, path: str, schema: pa.Schema, batch_rows: int = 64 * 1024) -> pa.Table:
    """The columns of ``schema`` (null where the file lacks one: an earlier release's ledger),
    read in batches: a file of a million rows never holds more than one batch's pages at once.

    Raises:
        LedgerFormatError: the file was written by a newer release.
    """
    with fs.open(path, "rb") as f:
        names = set(pq.read_schema(f).names)
        f.seek(0)
        # Only columns the file has may be read as dictionaries: pyarrow fails on the others.
        dictionaries = [f.name for f in schema if pa.types.is_dictionary(f.type)
                        and f.name in names]
        pf = pq.ParquetFile(f, read_dictionary=dictionaries)
        version = ledger_format(pf.schema_arrow.metadata)
        if version > LEDGER_FORMAT:
            raise LedgerFormatError(
                f"{path} is a ledger of format {version}, written by a newer release; this "
                f"one reads formats up to {LEDGER_FORMAT}: upgrade to read this output")
        present = [n for n in schema.names if n in pf.schema_arrow.names]
        batches = list(pf.iter_batches(batch_size=batch_rows, columns=present))
    n = sum(b.num_rows for b in batches)
    columns = {}
    for name in present:
        columns[name] = pa.chunked_array([b.column(name) for b in batches],
                                         pf.schema_arrow.field(name).type)
    return pa.table({f.name: columns[f.name].cast(f.type) if f.name in columns
                     else pa.nulls(n, f.type) for f in schema}, schema=schema)


def compact(metrics_uri: str, latest: pa.Table, options: Mapping | None = None) -> int:
    """Replace the metrics files under ``metrics_uri`` by one holding ``latest`` (the newest row
    per item, read from them). The new file is written first and only the files that existed
    before are removed, so a reader or a run writing meanwhile loses nothing.

    Returns:
        How many files were replaced.
    """
    fs, path = storage.filesystem(metrics_uri, options)
    before = [f for f in fs.find(path) if f.endswith(".parquet")]
    name = f"compacted-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}.parquet"
    target = storage.join(metrics_uri, name)
    write_table(latest, target, options)
    written = storage.filesystem(target, options)[1]
    for f in before:
        if f != written:
            fs.rm_file(f)
    return len(before)


def latest_per_item(table: pa.Table) -> pa.Table:
    """The newest row for each (id, source_uri): the merged state of several runs.

    Newest by run order first (run ids begin with the run's start time, taken on the driver),
    then by the row's own time: workers' clocks may disagree, one driver's clock orders runs."""
    if not table.num_rows:
        return table
    # Items with one row (most of a ledger) are their own newest; only the rest are sorted.
    keys = item_keys(table)
    counts = pc.value_counts(keys)
    several = pc.is_in(keys, value_set=counts.field("values").filter(
        pc.greater(counts.field("counts"), 1)))
    numbered = table.select(["id", "source_uri", "run_id", "finished_at"]).append_column(
        "_i", pa.array(np.arange(table.num_rows, dtype=np.int64))).filter(several)
    newest = (numbered.sort_by([("run_id", "descending"), ("finished_at", "descending")])
              .group_by(["id", "source_uri"], use_threads=False)
              .aggregate([("_i", "first")]))["_i_first"]
    keep = pa.concat_arrays([pc.indices_nonzero(pc.invert(several)).cast(pa.int64()),
                             newest.combine_chunks()])
    return table.take(keep.take(pc.sort_indices(keep)))  # in the ledger's own order


def item_keys(table: pa.Table) -> pa.Array:
    """One string per row naming its item, (id, source_uri), for set operations in Arrow.
    The separator is a control character, which ids cannot hold."""
    return pc.binary_join_element_wise(table["id"], table["source_uri"], "\x1f")


@dataclass
class Summary:
    rows_expected: int
    rows: int
    ok: int
    errors: int
    seconds: float
    images_per_s: float
    mean_lapvar_gain: float | None  # mean of lapvar_out / lapvar_in over ok rows
    mean_tenengrad_gain: float | None
    images_uri: str
    metrics_uri: str
    run_id: str
    skipped: int = 0  # rows restored by an earlier run with the same checkpoint
    max_error_rate: float = 1.0  # of the input's rows; more error rows than this fail the run
    missing_rows: list[int] = field(default_factory=list)
    duplicate_rows: list[int] = field(default_factory=list)
    top_errors: list[tuple[str, int]] = field(default_factory=list)
    report_uri: str | None = None  # the HTML report, when the run wrote one

    @property
    def complete(self) -> bool:
        """Every manifest row has exactly one metrics row."""
        return not self.missing_rows and not self.duplicate_rows and self.rows == self.rows_expected

    @property
    def error_rate(self) -> float:
        """Error rows of this run over the rows of the whole input (skipped ones count too)."""
        return self.errors / max(1, self.rows_expected + self.skipped)

    @property
    def too_many_errors(self) -> bool:
        return self.error_rate > self.max_error_rate

    def render(self) -> str:
        def gain(v: float | None) -> str:
            return "n/a" if v is None else f"x{v:.2f}"

        lines = [
            f"run {self.run_id}: {self.rows}/{self.rows_expected} rows, "
            f"{self.ok} ok, {self.errors} error"
            + (f"; {self.skipped} skipped (already restored)" if self.skipped else ""),
            f"  {self.images_per_s:.2f} images/s ({self.seconds:.1f} s wall)",
            f"  sharpness vs bicubic: laplacian variance {gain(self.mean_lapvar_gain)}, "
            f"tenengrad {gain(self.mean_tenengrad_gain)}",
            f"  images:  {self.images_uri}",
            f"  metrics: {self.metrics_uri}",
        ]
        if self.report_uri:
            lines.append(f"  report:  {self.report_uri}")
        for reason, count in self.top_errors:  # from the input: one line each, no escapes
            lines.append(f"  error x{count}: {safe_text.printable(reason, newlines=False)}")
        if self.missing_rows:
            lines.append(f"  MISSING manifest rows: {self.missing_rows[:20]}")
        if self.duplicate_rows:
            lines.append(f"  DUPLICATED manifest rows: {self.duplicate_rows[:20]}")
        if self.too_many_errors:
            lines.append(f"  TOO MANY ERRORS: {100 * self.error_rate:.0f}% of the input, above "
                         f"limits.max_error_rate ({100 * self.max_error_rate:.0f}%)")
        return "\n".join(lines)


def mean_gain(ok: pa.Table, measure: str) -> float | None:
    """Mean of ``{measure}_out / {measure}_in`` over ``ok`` rows with a positive ``_in``: how many
    times sharper than bicubic, on average."""
    if not ok.num_rows:
        return None
    before = ok[f"{measure}_in"].to_numpy(zero_copy_only=False)
    after = ok[f"{measure}_out"].to_numpy(zero_copy_only=False)
    keep = before > 0
    return float((after[keep] / before[keep]).mean()) if keep.any() else None


# What summarize reads of a run's rows.
SUMMARY_SCHEMA = pa.schema([METRICS_SCHEMA.field(n) for n in (
    "row", "status", "error", "lapvar_in", "lapvar_out", "tenengrad_in", "tenengrad_out")])


def summarize(table: pa.Table, expected_rows: pa.Array | pa.ChunkedArray, seconds: float,
              images_uri: str, metrics_uri: str, run_id: str, skipped: int = 0,
              max_error_rate: float = 1.0) -> Summary:
    """Counts, speed and sharpness of one run, and which manifest rows lack or repeat a row;
    all column-wise, so a run of millions of rows is checked in Arrow's time and memory."""
    ok = table.filter(pc.equal(table["status"], "ok"))
    counts = pc.value_counts(table["row"])
    repeated = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    missing = expected_rows.filter(pc.invert(pc.is_in(expected_rows, value_set=table["row"])))
    errors = table["error"].filter(pc.not_equal(table["status"], "ok"))
    kinds = pc.value_counts(pc.utf8_trim_whitespace(
        pc.replace_substring_regex(errors, _ERROR_KIND, r"\1"))).to_pylist()
    kinds.sort(key=lambda k: -k["counts"])
    return Summary(
        rows_expected=len(expected_rows), rows=table.num_rows, ok=ok.num_rows,
        errors=table.num_rows - ok.num_rows,
        seconds=seconds, images_per_s=ok.num_rows / seconds if seconds > 0 else 0.0,
        mean_lapvar_gain=mean_gain(ok, "lapvar"), mean_tenengrad_gain=mean_gain(ok, "tenengrad"),
        images_uri=images_uri, metrics_uri=metrics_uri, run_id=run_id, skipped=skipped,
        max_error_rate=max_error_rate,
        missing_rows=sorted(missing.to_pylist()),
        duplicate_rows=sorted(repeated.to_pylist()),
        top_errors=[(k["values"] or "", k["counts"]) for k in kinds[:5]],
    )


def error_kind(error: str) -> str:
    """``stage: kind`` (the first two clauses), so thousands of similar errors read as one."""
    return ":".join(error.split(":")[:2]).strip()


# error_kind as a regular expression, for whole columns.
_ERROR_KIND = r"(?s)^([^:]*(?::[^:]*)?).*$"
