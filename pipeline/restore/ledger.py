"""The ledger: the metrics rows of every run into an output, as Parquet under ``metrics/``.

Its schema and format version, writing a run's rows as they arrive, reading every release's
files back, merging a run's small files, compacting the history, and the newest row per item.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage

logger = logging.getLogger(__name__)

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
    # What the copy kept of the original (see pipeline.imaging.read and image_metadata):
    ("alpha", pa.string()),  # "none", "kept", or "flattened over #rrggbb" (JPEG output)
    ("colour_profile", pa.string()),  # the input's ICC profile by description; null: none
    ("colour", pa.string()),  # "untagged (sRGB)", "profile kept", "converted to sRGB from ..."
    ("metadata_kept", pa.list_(pa.string())),  # of "exif", "xmp", "iptc", as the input had
    ("metadata_dropped", pa.list_(pa.string())),  # each with its reason
    ("bit_depth", pa.int32()),  # of the output, per channel: 8 or 16
    # With output.layout webdataset or parquet, output_uri names the shard, and these the image
    # within it: its member's name (tar) or key (Parquet), and a tar member's data offset.
    ("output_member", pa.string()),
    ("output_offset", pa.int64()),
])

# The ledger's format, kept in each Parquet file's key-value metadata. Every release reads every
# earlier format, by column presence (a column a file lacks reads as nulls, whose meaning is
# in LEGACY_NULLS); a file of a newer format stops the run (exit 2) instead of being misread.
#   1  2026-11-25: the first release
#   2  2026-11-26: + precision
#   3  2026-11-27: + settings_sha256; the format key itself is written from 2026-12-04 on
#   4  2026-12-05: + alpha, colour_profile, colour, metadata_kept, metadata_dropped, bit_depth
#   5  2026-12-06: + output_member, output_offset (shard layouts)
LEDGER_FORMAT = 5
LEDGER_FORMAT_KEY = b"mimo_restore.ledger_format"

# What a null means in a column an earlier release did not write.
LEGACY_NULLS = {
    "precision": "not recorded (releases before 2026-11-26 ran fp32 or bf16 as configured)",
    "settings_sha256": "not recorded (releases before 2026-11-27): such an ok row counts as "
                       "made with the current output settings, as those releases took it; "
                       "--force redoes it",
    # Releases before 2026-12-05 flattened transparency over white, ignored colour profiles,
    # wrote no metadata and 8 bits: that is what a null in these columns means.
    "alpha": "not recorded (earlier releases flattened transparency over white)",
    "colour_profile": "not recorded (earlier releases ignored embedded profiles)",
    "colour": "not recorded (earlier releases ignored embedded profiles)",
    "metadata_kept": "not recorded (earlier releases kept no metadata)",
    "metadata_dropped": "not recorded (earlier releases kept no metadata)",
    "bit_depth": "not recorded (earlier releases wrote 8 bits)",
    "output_member": "none: releases before 2026-12-06 wrote files only, named by output_uri",
    "output_offset": "none: releases before 2026-12-06 wrote files only, named by output_uri",
}


class LedgerFormatError(ValueError):
    """A ledger file written by a newer release than this one."""


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


# What planning reads of the ledger: which rows are done, by which run, model, checkpoint and
# settings. The repeated strings come as dictionaries: a tenth of the memory at a million rows.
LEDGER_SCHEMA = pa.schema([
    pa.field(f.name, pa.dictionary(pa.int32(), pa.string()))
    if f.name in ("status", "model", "checkpoint_sha256", "settings_sha256", "run_id") else f
    for f in METRICS_SCHEMA if f.name in (
        "row", "id", "source_uri", "status", "model", "checkpoint_sha256", "settings_sha256",
        "run_id", "finished_at")])


LEDGER_RETRY = storage.Retry()  # a ledger read: four tries over about 3.5 s


def read_metrics(metrics_uri: str, options: Mapping | None = None,
                 run_id: str | None = None,
                 schema: pa.Schema = METRICS_SCHEMA,
                 retry: storage.Retry = LEDGER_RETRY) -> pa.Table:
    """All metrics rows under ``metrics_uri`` (empty if there are none), or those of one run.

    Files are read in parallel, only the columns of ``schema``. One that is not Parquet is
    skipped (with a warning): a driver killed mid-write can leave a partial file, and
    its rows are simply redone by the next run. A storage error is retried (``retry``) and then
    raised (OSError), rather than redo the rows of a file that is fine.
    """
    fs, path = storage.filesystem(metrics_uri, options)
    try:
        files = sorted(f for f in fs.find(path) if f.endswith(".parquet"))
    except FileNotFoundError:
        files = []
    if run_id is not None:
        files = [f for f in files if f.rsplit("/", 1)[-1].startswith(f"run-{run_id}_")]

    def read(f: str) -> pa.Table | None:
        try:
            # A storage error is retried, then raised: treating the file as partial would redo
            # every row it holds.
            table = retry.call(_read_parquet, fs, f, schema)
        except FileNotFoundError:
            return None  # compacted away since the listing; the new file holds its rows
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            # Not Parquet (a partial write by a killed driver): its rows are redone.
            logger.warning(f"skipping unreadable metrics file {f}: {e}")
            return None
        # Another program's Parquet in metrics/ reads as all-null columns: not ledger rows.
        if table.num_rows and (table["status"].null_count or table["row"].null_count):
            logger.warning(f"skipping {f}: not a metrics file of this job (no row/status "
                           "columns)")
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
        footer = pq.ParquetFile(f).metadata  # read once, for both opens
        names = set(footer.schema.names)
        # Only columns the file has may be read as dictionaries: pyarrow fails on the others.
        dictionaries = [f.name for f in schema if pa.types.is_dictionary(f.type)
                        and f.name in names]
        pf = pq.ParquetFile(f, metadata=footer, read_dictionary=dictionaries)
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


def newest_first(table: pa.Table) -> pa.Table:
    """``table``'s rows, newest first: by run order (run ids begin with the run's start time,
    taken on the driver), then by the row's own time. Workers' clocks may disagree; one
    driver's clock orders runs. What "newest" means everywhere: the latest row per item here,
    an id's owner in planning."""
    if pa.types.is_dictionary(table.schema.field("run_id").type):  # dictionaries do not sort
        table = table.set_column(table.schema.get_field_index("run_id"), "run_id",
                                 table["run_id"].cast(pa.string()))
    return table.take(pc.sort_indices(table, sort_keys=[("run_id", "descending"),
                                                        ("finished_at", "descending")]))


def latest_per_item(table: pa.Table) -> pa.Table:
    """The newest row (:func:`newest_first`) for each (id, source_uri): the merged state of
    several runs."""
    if not table.num_rows:
        return table
    # Items with one row (most of a ledger) are their own newest; only the rest are sorted.
    keys = item_keys(table)
    counts = pc.value_counts(keys)
    several = pc.is_in(keys, value_set=counts.field("values").filter(
        pc.greater(counts.field("counts"), 1)))
    numbered = table.select(["id", "source_uri", "run_id", "finished_at"]).append_column(
        "_i", pa.array(np.arange(table.num_rows, dtype=np.int64))).filter(several)
    newest = (newest_first(numbered).group_by(["id", "source_uri"], use_threads=False)
              .aggregate([("_i", "first")]))["_i_first"]
    keep = pa.concat_arrays([pc.indices_nonzero(pc.invert(several)).cast(pa.int64()),
                             newest.combine_chunks()])
    return table.take(keep.take(pc.sort_indices(keep)))  # in the ledger's own order


def item_keys(table: pa.Table) -> pa.Array:
    """One string per row naming its item, (id, source_uri), for set operations in Arrow.
    The separator is a control character, which ids cannot hold."""
    return pc.binary_join_element_wise(table["id"], table["source_uri"], "\x1f")
