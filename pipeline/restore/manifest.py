"""Manifests and prefixes -> one row per image: (row, id, source_uri, error)."""

from __future__ import annotations

import csv
import json
import posixpath
import re
from collections.abc import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.imaging import IMAGE_SUFFIXES
from pipeline.restore import shard_input

MANIFEST_SUFFIXES = {".csv": "csv", ".jsonl": "json", ".ndjson": "json", ".json": "json",
                     ".parquet": "parquet"}
MAX_ID_LENGTH = 512
# File systems cap a name at 255 bytes; the output's extension (".webp" at most) takes 5.
MAX_SEGMENT_BYTES = 250

ROWS_SCHEMA = pa.schema([
    ("row", pa.int64()),  # position in the manifest: the key that makes each row count once
    ("id", pa.string()),
    ("source_uri", pa.string()),  # a shard's sample: {shard}#{its image member}
    ("error", pa.string()),  # set when the row is already known to fail (duplicate id, ...)
    *shard_input.COLUMNS,  # where a shard's sample lies in it; null for an image file
])


class ManifestError(ValueError):
    """The manifest as a whole is unusable; nothing has been processed."""


def load_rows(uri: str, options: Mapping | None = None, exclude: str | None = None,
              since: float | None = None,
              columns: tuple[str | None, str | None] = (None, None)) -> pa.Table:
    """Read a manifest file or list a prefix into the rows of a job.

    A manifest is CSV, JSON Lines or Parquet with a ``uri`` column and an optional ``id``
    column (header names trimmed; values are strings as written); relative URIs resolve against
    the manifest's directory. A prefix lists its images recursively (following symbolic links),
    with ids taken from the path relative to the prefix, without the extension; nothing under
    ``exclude`` (the job's output, when it lies inside the input) is listed. With ``since`` (a
    POSIX time) a prefix lists only images modified after it, and may then list none; so does
    an S3 Inventory report (Parquet with ``bucket`` and ``key`` columns instead of ``uri``, or
    the ``manifest.json`` of a whole report, naming its CSV, Parquet or ORC files), by its
    last-modified dates. Other manifests are read whole. WebDataset tar shards and Parquet files
    of images (``columns``: their image and id columns, None for the defaults) give a row per
    sample (see :mod:`pipeline.restore.shard_input`).

    Raises:
        ManifestError: the manifest cannot be read, has no ``uri`` column or a column of the
            wrong type, or the prefix holds no images.
    """
    suffix = posixpath.splitext(uri.rstrip("/"))[1].lower()
    if shard_input.is_pattern(uri):  # shards/{000000..000099}.tar
        return _shard_rows(shard_input.expand(uri), options, columns)
    fs, path = storage.filesystem(uri, options)
    try:
        is_file = fs.isfile(path)
    except Exception as e:
        raise ManifestError(f"cannot reach input {uri}: {e}") from e
    if is_file and posixpath.basename(path) == INVENTORY_MANIFEST:
        uris, ids = _read_inventory(uri, fs, path, options, since)
    elif is_file and suffix == ".parquet" and _holds_images(fs, path, columns[0]):
        return _shard_rows([uri], options, columns)
    elif is_file and suffix in MANIFEST_SUFFIXES:
        uris, ids = _read_manifest(uri, fs, path, MANIFEST_SUFFIXES[suffix], since)
    elif is_file and suffix == shard_input.SHARD_SUFFIX:
        return _shard_rows([uri], options, columns)
    elif is_file:
        raise ManifestError(f"{uri} is a file but not a manifest; expected one of "
                            f"{', '.join(sorted(MANIFEST_SUFFIXES))}, a WebDataset .tar or a "
                            "directory/prefix")
    else:
        skip = None
        if exclude and storage.same_store(exclude, uri):
            skip = storage.filesystem(exclude, options)[1]
        listed = _list_prefix(uri, fs, path, skip, since)
        if isinstance(listed, pa.Table):
            return listed
        return _shard_rows(listed, options, columns)  # a prefix of shards
    return _build_rows(uris, ids)


def _holds_images(fs, path: str, wanted: str | None) -> bool:
    """Whether a Parquet file holds images (rather than naming them: a ``uri`` column)."""
    try:
        with fs.open(path, "rb") as f:
            schema = pq.read_schema(f)
    except Exception:
        return False  # the manifest reader says what is wrong with it
    names = set(schema.names)
    return ("uri" not in names and not {"bucket", "key"} <= names  # a manifest, an inventory
            and shard_input.image_column(schema, wanted) is not None)


def _shard_rows(uris: list[str], options: Mapping | None,
                columns: tuple[str | None, str | None]) -> pa.Table:
    """A row per sample of the WebDataset shards or Parquet files of images ``uris``."""
    tars = [u for u in uris if not u.endswith(shard_input.PARQUET_SUFFIX)]
    parquets = [u for u in uris if u.endswith(shard_input.PARQUET_SUFFIX)]
    parts = [shard_input.rows(tars, options),
             shard_input.parquet_rows(parquets, options, *columns)]
    merged = {name: parts[0][name] + parts[1][name] for name in parts[0]}
    extra = {name: pa.array(merged[name], kind) for name, kind in shard_input.COLUMNS}
    return _build_rows(pa.array(merged["uri"], pa.string()),
                       pa.array(merged["id"], pa.string()),
                       pa.array(merged["error"], pa.string()), extra)


INVENTORY_MANIFEST = "manifest.json"
# An inventory's CSV files have no header; these are its names for the columns used here.
_INVENTORY_CSV_NAMES = {"Bucket": "bucket", "Key": "key", "LastModifiedDate": "last_modified_date"}


def _read_inventory(uri, fs, path, options: Mapping | None,
                    since: float | None) -> tuple[pa.ChunkedArray, pa.ChunkedArray]:
    """The images of an S3 Inventory report from its ``manifest.json``: the files it names, in
    the destination bucket, read one after another and batch by batch, filtered column-wise.
    A nightly run plans over millions of keys from one report without listing them."""
    try:
        manifest = json.loads(fs.cat_file(path))
        fmt = manifest["fileFormat"].lower()
        destination = manifest["destinationBucket"].rsplit(":", 1)[-1]
        files = [f"s3://{destination}/{f['key']}" for f in manifest["files"]]
        schema = [name.strip() for name in manifest.get("fileSchema", "").split(",")]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ManifestError(f"{uri} is not an S3 Inventory manifest (fileFormat, "
                            f"destinationBucket and files): {e}") from e
    except Exception as e:
        raise ManifestError(f"cannot read inventory manifest {uri}: {e}") from e
    if fmt not in ("csv", "parquet", "orc"):
        raise ManifestError(f"inventory {uri}: file format {manifest['fileFormat']!r} is none "
                            "of CSV, Parquet, ORC")
    if fmt == "csv" and not {"Bucket", "Key"} <= set(schema):
        raise ManifestError(f"inventory {uri}: its fileSchema names no Bucket and Key columns")
    uris, ids = [], []
    for file in files:
        try:
            file_fs, file_path = storage.filesystem(file, options)
            with file_fs.open(file_path, "rb") as f:
                for batch in _inventory_batches(f, fmt, schema):
                    u, i = _inventory_rows(batch, since)
                    uris.append(u)
                    ids.append(i)
        except ManifestError:
            raise
        except Exception as e:
            raise ManifestError(f"cannot read inventory file {file} (named by {uri}): "
                                f"{e}") from e
    return pa.chunked_array(uris, pa.string()), pa.chunked_array(ids, pa.string())


def _inventory_batches(f, fmt: str, schema: list[str]):
    """Record batches of bucket, key and last_modified_date from one inventory file."""
    if fmt == "parquet":
        yield from _batches(f, "parquet")
        return
    if fmt == "orc":
        import pyarrow.orc as orc

        table = orc.ORCFile(f).read()
        wanted = [n for n in _WANTED if n in table.column_names]
        yield from table.select(wanted).to_batches(_BATCH_ROWS)
        return
    # CSV: gzip, no header, every value quoted; keys URL-encoded (form encoding: "+" for a
    # space, as AWS's own readers decode them), times ISO 8601 in UTC.
    names = [_INVENTORY_CSV_NAMES.get(n, f"_{i}") for i, n in enumerate(schema)]
    reader = pa_csv.open_csv(
        pa.CompressedInputStream(f, "gzip"),
        read_options=pa_csv.ReadOptions(column_names=names),
        convert_options=pa_csv.ConvertOptions(
            column_types={n: pa.string() for n in names},
            include_columns=[n for n in names if not n.startswith("_")]))
    for batch in reader:
        keys = pc.replace_substring(batch.column("key"), "+", " ")
        columns = {"bucket": batch.column("bucket"), "key": _url_decoded(keys)}
        if "last_modified_date" in batch.column_names:
            columns["last_modified_date"] = pc.cast(
                pc.replace_substring_regex(batch.column("last_modified_date"), "Z$", ""),
                pa.timestamp("ms")).cast(pa.timestamp("ms", tz="UTC"))
        yield pa.RecordBatch.from_pydict(columns)


def _url_decoded(keys: pa.Array) -> pa.Array:
    """Percent-decoding, per key only where a key has a ``%`` (rare in thumbnails' names)."""
    from urllib.parse import unquote

    encoded = pc.match_substring(keys, "%").fill_null(False)
    if not pc.any(encoded).as_py():
        return keys
    decoded = [unquote(k) for k in keys.filter(encoded).to_pylist()]
    return set_where(keys, encoded, decoded)


def _read_manifest(uri, fs, path, kind,
                   since: float | None = None) -> tuple[pa.ChunkedArray, pa.ChunkedArray]:
    """``uri`` and ``id`` columns of a manifest file, converted batch by batch: a manifest of
    millions of rows never holds more than one batch's intermediate columns at once."""
    base = uri.rsplit("/", 1)[0]
    uris, ids = [], []
    try:
        with fs.open(path, "rb") as f:
            for batch in _batches(f, kind):
                if "uri" not in batch.column_names and {"bucket", "key"} <= set(
                        batch.column_names):
                    u, i = _inventory_rows(batch, since)
                else:
                    u, i = _manifest_rows(uri, base, batch)
                uris.append(u)
                ids.append(i)
    except ManifestError:
        raise
    except Exception as e:
        raise ManifestError(f"cannot read manifest {uri}: {e}") from e
    return pa.chunked_array(uris, pa.string()), pa.chunked_array(ids, pa.string())


_BATCH_ROWS = 256 * 1024
_WANTED = ("uri", "id", "bucket", "key", "last_modified_date")


def _batches(f, kind: str):
    """Record batches of the manifest's wanted columns, header names trimmed; an empty
    manifest gives one empty batch, which still tells its columns."""
    if kind == "parquet":
        pf = pq.ParquetFile(f)
        names = {n.strip(): n for n in pf.schema_arrow.names}
        columns = [names[n] for n in _WANTED if n in names]
        schema = pa.schema([pf.schema_arrow.field(n) for n in columns])
        batches = pf.iter_batches(batch_size=_BATCH_ROWS, columns=columns)
    elif kind == "csv":
        header = next(csv.reader([f.readline().decode("utf-8-sig")]), [])
        f.seek(0)
        # Every column as text: ids like 007 or 1e5 must not become numbers.
        batches = pa_csv.open_csv(f, convert_options=pa_csv.ConvertOptions(
            column_types={name: pa.string() for name in header}))
        schema = batches.schema
    else:
        table = _read_json_lines(f)
        schema, batches = table.schema, table.to_batches()
    any_rows = False
    for batch in batches:
        any_rows = True
        yield batch.rename_columns([name.strip() for name in batch.column_names])
    if not any_rows:
        yield pa.RecordBatch.from_pylist([], schema).rename_columns(
            [name.strip() for name in schema.names])


def _manifest_rows(uri: str, base: str, batch: pa.RecordBatch) -> tuple[pa.Array, pa.Array]:
    if "uri" not in batch.column_names:
        raise ManifestError(f"manifest {uri} has no 'uri' column (columns: "
                            f"{', '.join(batch.column_names) or 'none'})")
    for name in ("uri", "id"):
        if name in batch.column_names:
            kind_ = batch.schema.field(name).type
            if not (pa.types.is_string(kind_) or pa.types.is_large_string(kind_)
                    or pa.types.is_null(kind_)):
                raise ManifestError(f"manifest {uri}: column '{name}' must hold text, "
                                    f"found {kind_}; write it as strings")
    uris = _resolve(base, _text(batch.column("uri")))
    ids = _text(batch.column("id")) if "id" in batch.column_names else _stem(uris)
    return uris, ids


def _read_json_lines(f) -> pa.Table:
    """``uri`` and ``id`` of each line, as written: numbers keep their text (``1e5`` stays
    ``1e5``, not ``100000.0``), since ids are names, not quantities."""
    columns: dict[str, list] = {"uri": [], "id": []}
    seen: set[str] = set()
    for number, line in enumerate(f, 1):
        if not line.strip():
            continue
        record = json.loads(line, parse_int=str, parse_float=str)
        if not isinstance(record, dict):
            raise ManifestError(f"line {number} is not a JSON object")
        record = {key.strip(): value for key, value in record.items()}
        seen.update(record)
        for name, values in columns.items():
            value = record.get(name)
            if value is not None and not isinstance(value, str):
                raise ManifestError(f"line {number}: '{name}' must be text or a number, "
                                    f"found {type(value).__name__}")
            values.append(value)
    return pa.table({k: pa.array(v, pa.string()) for k, v in columns.items() if k in seen})


def _text(column: pa.Array) -> pa.Array:
    return column.cast(pa.string())


def _resolve(base: str, uris: pa.Array) -> pa.Array:
    """Blank URIs become null; relative ones are joined to the manifest's directory."""
    blank = pc.equal(pc.utf8_trim_whitespace(uris), "")
    absolute = pc.or_(pc.match_substring(uris, "://"), pc.starts_with(uris, "/"))
    joined = pc.binary_join_element_wise(base, uris, "/")
    return pc.if_else(blank, pa.scalar(None, pa.string()), pc.if_else(absolute, uris, joined))


def _stem(uris: pa.Array) -> pa.Array:
    """The file name without its extension (as posixpath.splitext: a leading dot stays)."""
    name = pc.replace_substring_regex(uris, r"^.*/", "")
    return pc.replace_substring_regex(name, r"^(.+)\.[^.]*$", r"\1")


def _list_prefix(uri, fs, path, skip: str | None,
                 since: float | None = None) -> pa.Table | list[str]:
    """The rows of the images under ``uri``; or, where it holds no images but WebDataset
    shards (else Parquet files), the shards' URIs."""
    try:
        if not fs.exists(path):
            raise ManifestError(f"input {uri} does not exist")
        # A run whose output lies inside its input must not restore its own outputs next time.
        listed = storage.list_files(fs, path, modified_after=since, exclude=skip)
    except ManifestError:
        raise
    except Exception as e:
        raise ManifestError(f"cannot list {uri}: {e}") from e
    found = [p for p in listed if p.lower().endswith(IMAGE_SUFFIXES)]
    protocol = uri.split("://", 1)[0] + "://" if "://" in uri else ""
    if protocol == "file://":
        protocol = ""
    if not found:
        for suffix in (shard_input.SHARD_SUFFIX, shard_input.PARQUET_SUFFIX):
            shards = [protocol + p for p in listed if p.endswith(suffix)]
            if shards:
                return shards
    if not found and since is None:
        raise ManifestError(f"no images ({', '.join(IMAGE_SUFFIXES)}) or WebDataset shards "
                            f"(.tar) under {uri}")
    root = path.rstrip("/") + "/"
    uris = [protocol + p if protocol else p for p in found]
    ids = [posixpath.splitext(p[len(root):])[0] for p in found]
    return _build_rows(pa.array(uris, pa.string()), pa.array(ids, pa.string()))


def output_key(image_id: str) -> str:
    """The id as a relative key under ``{output}/images/``; refuses anything that could escape.

    Raises:
        ValueError: empty, absolute, ``..``, backslash or control characters, too long, or a
            path segment too long for a file name.
    """
    if not image_id or not image_id.strip():
        raise ValueError("empty id")
    if len(image_id) > MAX_ID_LENGTH:
        raise ValueError(f"id longer than {MAX_ID_LENGTH} characters")
    if any(ord(c) < 32 for c in image_id) or "\\" in image_id:
        raise ValueError("id contains a control character or backslash")
    if image_id.startswith("/"):
        raise ValueError("id is an absolute path")
    parts = image_id.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError("id has an empty, '.' or '..' path segment")
    longest = max(len(p.encode("utf-8")) for p in parts)
    if longest > MAX_SEGMENT_BYTES:
        raise ValueError(f"id has a path segment of {longest} bytes in UTF-8; file names hold "
                         f"at most {MAX_SEGMENT_BYTES} (with the extension, 255)")
    return image_id


def _inventory_rows(table: pa.RecordBatch, since: float | None) -> tuple[pa.Array, pa.Array]:
    """An S3 Inventory report in Parquet (columns bucket, key, last_modified_date, ...): every
    object of a bucket, images among others. Keeps the images, modified after ``since`` when
    given, as ``s3://bucket/key`` with the key less its extension as id, all column-wise: a
    nightly inventory of millions of objects costs Arrow's time, not Python's per object."""
    keys = _text(table.column("key"))
    keep = pc.match_substring_regex(
        pc.utf8_lower(keys), "(" + "|".join(re.escape(s) for s in IMAGE_SUFFIXES) + ")$")
    if since is not None and "last_modified_date" in table.column_names:
        modified = table.column("last_modified_date")
        when = pa.scalar(int(since * 1000), pa.timestamp("ms", tz="UTC")).cast(modified.type)
        keep = pc.and_(keep, pc.greater(modified, when))
    keep = keep.fill_null(False)
    keys = keys.filter(keep)
    buckets = _text(table.column("bucket")).filter(keep)
    uris = pc.binary_join_element_wise("s3:", "", buckets, keys, "/")
    return uris, pc.replace_substring_regex(keys, r"\.[^./]*$", "")


# Anything output_key might refuse; only these rows are checked one by one, for its message.
_SUSPECT_ID = r"^\s*$|[\x00-\x1f\\]|^/|(^|/)\.{0,2}(/|$)"


def repeated_values(values: pa.ChunkedArray) -> pa.Array:
    """The values that occur more than once (nulls aside), found by sorting: a hash table of
    millions of strings, as value_counts builds, costs several times their size."""
    ordered = values.take(pc.sort_indices(values))
    return pc.unique(ordered[1:].filter(pc.equal(ordered[1:], ordered[:-1])))


def _unsafe_reason(image_id: str) -> str | None:
    try:
        output_key(image_id)
    except ValueError as e:
        return f"unsafe id: {e}"
    return None


def set_where(error, mask, reasons: list) -> pa.Array:
    """``error`` with the rows where ``mask`` holds set to ``reasons``, in order."""
    def whole(a):
        return a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a
    return pc.replace_with_mask(whole(error), whole(mask), pa.array(reasons, pa.string()))


def _build_rows(uris: pa.ChunkedArray, ids: pa.ChunkedArray, error: pa.Array | None = None,
                extra: Mapping[str, pa.Array] | None = None) -> pa.Table:
    """Rows with their errors found column-wise: empty fields, unsafe ids, repeated ids
    (besides ``error``, those known already); ``extra``: the shard columns, null if None."""
    n = len(uris)
    if error is None:
        error = pa.nulls(n, pa.string())
    suspect = pc.or_(pc.match_substring_regex(ids, _SUSPECT_ID),
                     pc.or_(pc.greater(pc.utf8_length(ids), MAX_ID_LENGTH),
                            pc.greater(pc.binary_length(ids), MAX_SEGMENT_BYTES)))
    suspect = suspect.fill_null(False)
    if pc.any(suspect).as_py():
        reasons = [_unsafe_reason(i) for i in ids.filter(suspect).to_pylist()]
        error = set_where(error, suspect, reasons)
    error = pc.if_else(pc.is_null(ids), "manifest row has an empty id", error)
    error = pc.if_else(pc.is_null(uris), "manifest row has an empty uri", error)
    # An id's first clean row keeps it; later clean rows with the same id are errors. Only the
    # rows of the (rare) repeated ids are walked one by one.
    clean = pc.is_null(error)
    repeated = repeated_values(ids)
    if len(repeated):
        candidates = pc.and_(clean, pc.is_in(ids, value_set=repeated))
        first: dict[str, int] = {}
        reasons = []
        for i, image_id in zip(pc.indices_nonzero(candidates).to_pylist(),
                               ids.filter(candidates).to_pylist()):
            reasons.append(None if first.setdefault(image_id, i) == i else
                           f"duplicate id {image_id!r} (first at manifest row {first[image_id]})")
        error = set_where(error, candidates, reasons)
    extra = extra or {name: pa.nulls(n, kind) for name, kind in shard_input.COLUMNS}
    return pa.table({"row": pa.array(np.arange(n, dtype=np.int64)), "id": ids,
                     "source_uri": uris, "error": error, **extra}, schema=ROWS_SCHEMA)
