"""Manifests and prefixes -> one row per image: (row, id, source_uri, error)."""

from __future__ import annotations

import posixpath
from collections.abc import Mapping

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.imaging import IMAGE_SUFFIXES

MANIFEST_SUFFIXES = {".csv": "csv", ".jsonl": "json", ".ndjson": "json", ".json": "json",
                     ".parquet": "parquet"}
MAX_ID_LENGTH = 512

ROWS_SCHEMA = pa.schema([
    ("row", pa.int64()),  # position in the manifest: the key that makes each row count once
    ("id", pa.string()),
    ("source_uri", pa.string()),
    ("error", pa.string()),  # set when the row is already known to fail (duplicate id, ...)
])


class ManifestError(ValueError):
    """The manifest as a whole is unusable; nothing has been processed."""


def load_rows(uri: str, options: Mapping | None = None) -> pa.Table:
    """Read a manifest file or list a prefix into the rows of a job.

    A manifest is CSV, JSON Lines or Parquet with a ``uri`` column and an optional ``id``
    column; relative URIs resolve against the manifest's directory. A prefix lists its images
    recursively, with ids taken from the path relative to the prefix, without the extension.

    Raises:
        ManifestError: the manifest cannot be read, has no ``uri`` column, or the prefix holds
            no images.
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
        uris, ids = _list_prefix(uri, fs, path)
    return _build_rows(uris, ids)


def _read_manifest(uri, fs, path, kind) -> tuple[list[str | None], list[str | None]]:
    try:
        if kind == "parquet":
            table = pq.read_table(path, filesystem=fs)
        else:
            with fs.open(path, "rb") as f:
                if kind == "csv":
                    # Everything as text: ids like 007 must not become integers.
                    table = pa_csv.read_csv(f, convert_options=pa_csv.ConvertOptions(
                        column_types={"uri": pa.string(), "id": pa.string()}))
                else:
                    table = pa_json.read_json(f)
    except Exception as e:
        raise ManifestError(f"cannot read manifest {uri}: {e}") from e
    if "uri" not in table.column_names:
        raise ManifestError(f"manifest {uri} has no 'uri' column (columns: "
                            f"{', '.join(table.column_names) or 'none'})")
    base = uri.rsplit("/", 1)[0]
    uris = [_resolve(base, u) for u in _as_strings(table.column("uri"))]
    ids = (_as_strings(table.column("id")) if "id" in table.column_names
           else [_stem(u) if u else None for u in uris])
    return uris, ids


def _as_strings(column: pa.ChunkedArray) -> list[str | None]:
    return [None if v is None else str(v) for v in column.to_pylist()]


def _resolve(base: str, uri: str | None) -> str | None:
    if not uri or not uri.strip():
        return None
    if "://" in uri or uri.startswith("/"):
        return uri
    return f"{base}/{uri}"


def _stem(uri: str) -> str:
    return posixpath.splitext(posixpath.basename(uri))[0]


def _list_prefix(uri, fs, path) -> tuple[list[str], list[str]]:
    try:
        if not fs.exists(path):
            raise ManifestError(f"input {uri} does not exist")
        found = sorted(p for p in fs.find(path) if p.lower().endswith(IMAGE_SUFFIXES))
    except ManifestError:
        raise
    except Exception as e:
        raise ManifestError(f"cannot list {uri}: {e}") from e
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
        ValueError: empty, absolute, ``..``, backslash or control characters, or too long.
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
