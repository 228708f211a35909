"""WebDataset tar shards as input: one manifest row per sample, read by ranged reads.

A shard is indexed once while the run is planned (its headers, read in large blocks: a few
requests per shard, never one per image); the preparing task then reads its block's samples
of a shard with one ranged read. Members are grouped into samples as WebDataset groups them:
the key is a member's name up to the first dot of its file name, the rest its extension. A
sample's image is its first member with an image extension; its other members (captions,
JSON, class labels) are carried to the output unchanged. A truncated shard loses only what it
does not hold: the samples before the cut are read as usual, a member cut short is an error
row.
"""

from __future__ import annotations

import bisect
import itertools
import json
import re
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.imaging import IMAGE_SUFFIXES

SHARD_SUFFIX = ".tar"
INDEX_BLOCK = 32 << 20  # bytes per read while indexing a remote shard
_IMAGE_EXTENSIONS = {s.lstrip(".") for s in IMAGE_SUFFIXES}

CARRIED_TYPE = pa.list_(pa.struct([("name", pa.string()), ("offset", pa.int64()),
                                   ("size", pa.int64())]))
# Columns a shard's rows add to the manifest's rows (null for an image that is a file).
COLUMNS = [("source_shard", pa.string()), ("source_offset", pa.int64()),
           ("source_size", pa.int64()), ("carried", CARRIED_TYPE)]


def expand(uri: str) -> list[str]:
    """Brace patterns as WebDataset writes them: ``shards/{000000..000099}.tar`` (a numeric
    range, zero-padded as its first bound is) and ``{a,b}`` (a list), nested or repeated."""
    found = re.search(r"\{([^{}]*)\}", uri)
    if not found:
        return [uri]
    body, head, tail = found.group(1), uri[:found.start()], uri[found.end():]
    numbers = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numbers:
        first, last = numbers.groups()
        choices = [str(i).zfill(len(first)) for i in range(int(first), int(last) + 1)]
    else:
        choices = body.split(",")
    return [uri for choice in choices for uri in expand(head + choice + tail)]


def is_pattern(uri: str) -> bool:
    return re.search(r"\{[^{}]*(\.\.|,)[^{}]*\}", uri) is not None


@dataclass
class Sample:
    key: str
    image: tarfile.TarInfo | None = None
    others: list[tarfile.TarInfo] = field(default_factory=list)
    error: str | None = None


def split_name(name: str) -> tuple[str, str]:
    """A member's (key, extension), as WebDataset splits them; a leading ``./`` (``tar -C dir
    -cf shard.tar .``) is no part of the key."""
    while name.startswith("./"):
        name = name[2:]
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


def index(uri: str, options: Mapping | None = None) -> list[Sample]:
    """The samples of shard ``uri`` in order, each with its image member and the rest.

    Raises:
        OSError: the shard cannot be read at all.
    """
    fs, path = storage.filesystem(uri, options)
    members, cut = [], None
    with fs.open(path, "rb", block_size=INDEX_BLOCK) as f:
        size = f.size if hasattr(f, "size") else fs.size(path)  # an open file knows its size
        try:
            with tarfile.open(fileobj=f, mode="r:") as tar:
                for member in tar:
                    if member.isfile():
                        members.append(member)
        except tarfile.ReadError as e:
            cut = str(e) or "not a tar file"
            if not members and "empty" not in cut:
                raise OSError(f"not a readable tar shard: {cut}") from e
    samples: dict[str, Sample] = {}
    for member in members:
        key, ext = split_name(member.name)
        sample = samples.setdefault(key, Sample(key))
        if member.offset_data + member.size > size:
            sample.error = (f"truncated shard: member {member.name} holds "
                            f"{max(0, size - member.offset_data)} of {member.size} bytes")
        elif sample.image is None and ext.lower() in _IMAGE_EXTENSIONS:
            sample.image = member
        else:
            sample.others.append(member)
    for sample in samples.values():
        if sample.image is None and sample.error is None:
            sample.error = ("sample has no image member (it has: "
                            + (", ".join(split_name(m.name)[1] for m in sample.others) or
                               "nothing") + ")")
    return list(samples.values())


def _columns() -> dict[str, list]:
    """The manifest's columns for rows from shards: uri, id, error and :data:`COLUMNS`."""
    return {name: [] for name in ("uri", "id", "error", *(name for name, _ in COLUMNS))}


def _append(out: dict[str, list], **values) -> None:
    for name, column in out.items():
        column.append(values.get(name))


def rows(uris: list[str], options: Mapping | None = None) -> dict[str, list]:
    """The manifest columns of every sample of the tar shards ``uris``; a shard that cannot be
    read is one error row."""
    def shard_rows(uri: str) -> list[dict]:
        # Plain values, not TarInfo objects: millions of samples are planned at once.
        return [{"uri": f"{uri}#{s.image.name if s.image else s.key}", "id": s.key,
                 "error": s.error, "source_shard": uri,
                 "source_offset": s.image.offset_data if s.image else None,
                 "source_size": s.image.size if s.image else None,
                 "carried": [{"name": split_name(m.name)[1], "offset": m.offset_data,
                              "size": m.size} for m in s.others] or None}
                for s in index(uri, options)]

    out = _columns()
    # Shards are indexed concurrently: planning over many waits on the store, not a core.
    for uri, got in zip(uris, storage.each_concurrently(shard_rows, uris)):
        if isinstance(got, (OSError, ValueError)):
            _append(out, uri=uri, id=uri.rsplit("/", 1)[-1],
                    error=f"cannot index shard: {type(got).__name__}: {got}")
        elif isinstance(got, Exception):
            raise got
        else:
            for row in got:
                _append(out, **row)
    return out


def read_block(shard: str, rows: list[dict], options: Mapping | None = None) -> list[tuple]:
    """Each row's image and carried members ``(image, {name: data})`` from ``shard``, in one
    ranged read over all of them."""
    spans = [(r["source_offset"], r["source_size"]) for r in rows] + [
        (c["offset"], c["size"]) for r in rows for c in r["carried"] or ()]
    start = min(offset for offset, _ in spans)
    end = max(offset + size for offset, size in spans)
    fs, path = storage.filesystem(shard, options)
    data = fs.cat_file(path, start=start, end=end)
    if len(data) < end - start:
        raise OSError(f"shard {shard} ended at byte {start + len(data)}, before {end}")

    def cut(offset: int, size: int) -> bytes:
        return data[offset - start:offset - start + size]

    return [(cut(r["source_offset"], r["source_size"]),
             {c["name"]: cut(c["offset"], c["size"]) for c in r["carried"] or ()})
            for r in rows]


# -- Parquet datasets whose rows hold the images -------------------------------------------

PARQUET_SUFFIX = ".parquet"
ID_COLUMNS = ("__key__", "key", "id")  # the id's column when input.id_column is not set


def image_column(schema: pa.Schema, wanted: str | None = None) -> str | None:
    """The column holding the images: ``wanted``, else ``image``, else the first binary
    column or struct with a ``bytes`` field (as Hugging Face datasets store images)."""
    def holds_images(kind: pa.DataType) -> bool:
        return (pa.types.is_binary(kind) or pa.types.is_large_binary(kind)
                or (pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0))

    if wanted:
        return wanted if wanted in schema.names else None
    names = ["image"] + [f.name for f in schema if holds_images(f.type)]
    return next((n for n in names if n in schema.names and holds_images(schema.field(n).type)),
                None)


def parquet_rows(uris: list[str], options: Mapping | None = None, images: str | None = None,
                 ids: str | None = None) -> dict[str, list]:
    """The manifest columns of every row of the Parquet files ``uris``: its id column read
    (``ids``, else the first of ID_COLUMNS, else ``{file name}/{row}``), not its images."""
    out = _columns()
    for uri in uris:
        name = uri.rsplit("/", 1)[-1].removesuffix(PARQUET_SUFFIX)
        try:
            fs, path = storage.filesystem(uri, options)
            with fs.open(path, "rb") as f:
                pf = pq.ParquetFile(f)
                schema = pf.schema_arrow
                column = image_column(schema, images)
                if column is None:
                    raise ValueError(f"no column of images ({images or 'image, or binary'}) "
                                     f"among {', '.join(schema.names)}")
                id_name = ids or next((n for n in ID_COLUMNS if n in schema.names), None)
                if ids and ids not in schema.names:
                    raise ValueError(f"no id column {ids!r} among {', '.join(schema.names)}")
                keys = ([str(v) if v is not None else None
                         for v in pf.read(columns=[id_name]).column(0).to_pylist()]
                        if id_name else [f"{name}/{i}" for i in range(pf.metadata.num_rows)])
        except Exception as e:
            _append(out, uri=uri, id=name,
                    error=f"cannot read Parquet of images: {type(e).__name__}: {e}")
            continue
        for i, key in enumerate(keys):  # source_offset: a Parquet file's row, not a byte
            _append(out, uri=f"{uri}#{i}", id=key, source_shard=uri, source_offset=i)
    return out


def read_parquet_block(uri: str, rows: list[dict], options: Mapping | None = None,
                       images: str | None = None, ids: str | None = None) -> list:
    """Each row's image and its other columns (carried, as bytes: text as UTF-8, the rest as
    JSON) from Parquet file ``uri``, reading only the row groups that hold them; a row
    without image bytes gets the error instead."""
    fs, path = storage.filesystem(uri, options)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        column = image_column(pf.schema_arrow, images)
        id_name = ids or next((n for n in ID_COLUMNS if n in pf.schema_arrow.names), None)
        starts, total = [], 0
        for g in range(pf.num_row_groups):
            starts.append(total)
            total += pf.metadata.row_group(g).num_rows
        wanted = [r["source_offset"] for r in rows]
        group_of = {i: bisect.bisect_right(starts, i) - 1 for i in wanted}
        groups = sorted(set(group_of.values()))
        table = pf.read_row_groups(groups)
    # Where each read group begins in ``table``.
    first = dict(zip(groups, itertools.accumulate(
        [0] + [pf.metadata.row_group(g).num_rows for g in groups[:-1]])))
    out = []
    for i in wanted:
        g = group_of[i]
        row = table.slice(first[g] + i - starts[g], 1).to_pylist()[0]
        value = row.pop(column)
        image = value["bytes"] if isinstance(value, dict) else value
        if image is None:
            # img2dataset keeps a failed download's row, with why it failed.
            why = "; ".join(f"{k}: {row[k]}" for k in ("status", "error_message") if row.get(k))
            out.append(ValueError(f"row {i} of {uri} holds no image bytes"
                                  + (f" ({why})" if why else "")))
            continue
        row.pop(id_name, None)
        members = {name: v.encode() if isinstance(v, str) else v if isinstance(v, bytes)
                   else json.dumps(v, default=str).encode()
                   for name, v in row.items() if v is not None}
        out.append((image, members))
    return out


def read_source(source_uri: str, options: Mapping | None = None,
                image_column: str | None = None) -> bytes:
    """The input image a metrics row's ``source_uri`` names: a file, or a shard's sample
    (``{shard}#{member}`` of a tar, ``{file}#{row}`` of Parquet), for readers after the run
    (the report's gallery). A tar is indexed again to find the member."""
    shard, _, member = source_uri.rpartition("#")
    if not shard.endswith((SHARD_SUFFIX, PARQUET_SUFFIX)):
        return storage.read_bytes(source_uri, options)
    try:
        return storage.read_bytes(source_uri, options)  # a file that has "#" in its name
    except FileNotFoundError:
        pass
    if shard.endswith(PARQUET_SUFFIX):
        [got] = read_parquet_block(shard, [{"source_offset": int(member)}], options,
                                   image_column)
    else:
        sample = next((s for s in index(shard, options)
                       if s.image is not None and s.image.name == member), None)
        if sample is None:
            raise FileNotFoundError(f"{member} is not in {shard}")
        [got] = read_block(shard, [{"source_offset": sample.image.offset_data,
                                    "source_size": sample.image.size, "carried": None}],
                           options)
    if isinstance(got, Exception):
        raise got
    return got[0]
