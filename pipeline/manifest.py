"""Manifests and prefixes -> one row per image: (row, id, source_uri, error)."""

from __future__ import annotations

import csv
import json
import posixpath
from collections.abc import Mapping

import fsspec
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.imaging import IMAGE_SUFFIXES

MANIFEST_SUFFIXES = {".csv": "csv", ".jsonl": "json", ".ndjson": "json", ".json": "json",
                     ".parquet": "parquet"}
MAX_ID_LENGTH = 512
# File systems cap a name at 255 bytes; the output's extension (".webp" at most) takes 5.
MAX_SEGMENT_BYTES = 250

ROWS_SCHEMA = pa.schema([
    ("row", pa.int64()),  # position in the manifest: the key that makes each row count once
    ("id", pa.string()),
    ("source_uri", pa.string()),
    ("error", pa.string()),  # set when the row is already known to fail (duplicate id, ...)
])


class ManifestError(ValueError):
    """The manifest as a whole is unusable; nothing has been processed."""


def load_rows(uri: str, options: Mapping | None = None, exclude: str | None = None) -> pa.Table:
    """Read a manifest file or list a prefix into the rows of a job.

    A manifest is CSV, JSON Lines or Parquet with a ``uri`` column and an optional ``id``
    column (header names trimmed; values are strings as written); relative URIs resolve against
    the manifest's directory. A prefix lists its images recursively (following symbolic links),
    with ids taken from the path relative to the prefix, without the extension; nothing under
    ``exclude`` (the job's output, when it lies inside the input) is listed.

    Raises:
        ManifestError: the manifest cannot be read, has no ``uri`` column or a column of the
            wrong type, or the prefix holds no images.
    """
    suffix = posixpath.splitext(uri.rstrip("/"))[1].lower()
    fs, path = storage.filesystem(uri, options)
    try:
        is_file = fs.isfile(path)
    except Exception as e:
        raise ManifestError(f"cannot reach input {uri}: {e}") from e
    if is_file and suffix in MANIFEST_SUFFIXES:
        uris, ids = _read_manifest(uri, fs, path, MANIFEST_SUFFIXES[suffix])
    elif is_file:
        raise ManifestError(f"{uri} is a file but not a manifest; expected one of "
                            f"{', '.join(sorted(MANIFEST_SUFFIXES))} or a directory/prefix")
    else:
        skip = None
        if exclude and _protocol(exclude) == _protocol(uri):
            skip = storage.filesystem(exclude, options)[1].rstrip("/") + "/"
        uris, ids = _list_prefix(uri, fs, path, skip)
    return _build_rows(uris, ids)


def _read_manifest(uri, fs, path, kind) -> tuple[list[str | None], list[str | None]]:
    try:
        if kind == "parquet":
            table = pq.read_table(path, filesystem=fs)
        elif kind == "csv":
            with fs.open(path, "rb") as f:
                header = next(csv.reader([f.readline().decode("utf-8-sig")]), [])
            with fs.open(path, "rb") as f:
                # Every column as text: ids like 007 or 1e5 must not become numbers.
                table = pa_csv.read_csv(f, convert_options=pa_csv.ConvertOptions(
                    column_types={name: pa.string() for name in header}))
        else:
            with fs.open(path, "rb") as f:
                table = _read_json_lines(f)
    except ManifestError:
        raise
    except Exception as e:
        raise ManifestError(f"cannot read manifest {uri}: {e}") from e
    table = table.rename_columns([name.strip() for name in table.column_names])
    if "uri" not in table.column_names:
        raise ManifestError(f"manifest {uri} has no 'uri' column (columns: "
                            f"{', '.join(table.column_names) or 'none'})")
    for name in ("uri", "id"):
        if name in table.column_names:
            kind_ = table.schema.field(name).type
            if not (pa.types.is_string(kind_) or pa.types.is_large_string(kind_)
                    or pa.types.is_null(kind_)):
                raise ManifestError(f"manifest {uri}: column '{name}' must hold text, "
                                    f"found {kind_}; write it as strings")
    base = uri.rsplit("/", 1)[0]
    uris = [_resolve(base, u) for u in table.column("uri").to_pylist()]
    ids = (table.column("id").to_pylist() if "id" in table.column_names
           else [_stem(u) if u else None for u in uris])
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


def _resolve(base: str, uri: str | None) -> str | None:
    if not uri or not uri.strip():
        return None
    if "://" in uri or uri.startswith("/"):
        return uri
    return f"{base}/{uri}"


def _stem(uri: str) -> str:
    return posixpath.splitext(posixpath.basename(uri))[0]


def _protocol(uri: str) -> str:
    return fsspec.core.split_protocol(uri)[0] or "file"


def _list_prefix(uri, fs, path, skip: str | None) -> tuple[list[str], list[str]]:
    try:
        if not fs.exists(path):
            raise ManifestError(f"input {uri} does not exist")
        found = [p for p in storage.list_files(fs, path) if p.lower().endswith(IMAGE_SUFFIXES)]
    except ManifestError:
        raise
    except Exception as e:
        raise ManifestError(f"cannot list {uri}: {e}") from e
    if skip:
        # A run whose output lies inside its input must not restore its own outputs next time.
        found = [p for p in found if not p.startswith(skip)]
    if not found:
        raise ManifestError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {uri}")
    root = path.rstrip("/") + "/"
    protocol = uri.split("://", 1)[0] + "://" if "://" in uri else ""
    if protocol == "file://":
        protocol = ""
    uris = [protocol + p if protocol else p for p in found]
    ids = [posixpath.splitext(p[len(root):])[0] for p in found]
    return uris, ids


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


def _build_rows(uris: list[str | None], ids: list[str | None]) -> pa.Table:
    first_seen: dict[str, int] = {}
    errors: list[str | None] = []
    for i, (uri, image_id) in enumerate(zip(uris, ids)):
        error = None
        if uri is None:
            error = "manifest row has an empty uri"
        elif image_id is None:
            error = "manifest row has an empty id"
        else:
            try:
                output_key(image_id)
            except ValueError as e:
                error = f"unsafe id: {e}"
        if error is None:
            if image_id in first_seen:
                error = f"duplicate id {image_id!r} (first at manifest row {first_seen[image_id]})"
            else:
                first_seen[image_id] = i
        errors.append(error)
    return pa.table({"row": list(range(len(uris))), "id": ids, "source_uri": uris,
                     "error": errors}, schema=ROWS_SCHEMA)
