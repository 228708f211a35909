"""Shards: many restored images in one object (``output.layout``: webdataset or parquet).

An object store charges per request, and a PUT costs more than restoring a thumbnail; a shard
of hundreds of images costs one multipart upload instead. A shard is written streaming (each
image is encoded and appended in turn; a tar member or a Parquet row group at a time is in
memory) under a name no other attempt uses, and published whole at the end: a temporary file
renamed on a file system, a multipart upload completed on an object store. A shard that a
killed run or a retried task left behind is named by no ledger row: it is an orphan, never
taken for a committed one (``jobs.report`` counts them).

WebDataset: each sample is ``<key>.<ext>`` (the image), ``<key>.metrics.json`` (its metrics
row) and the members its input sample carried besides its image (``<key>.txt``, ...);
``<key>`` is the id with ``%`` and ``.`` escaped (``%25``, ``%2E``), since WebDataset readers
take a member's key up to the first dot of its name. Parquet: one row per image, the image as
Hugging Face datasets store one (a struct of ``bytes`` and ``path``), ``__key__``, ``id`` and
the metrics as JSON.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
import uuid
from collections.abc import Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage

LAYOUTS = ("webdataset", "parquet")
EXTENSIONS = {"webdataset": ".tar", "parquet": ".parquet"}
PARQUET_SCHEMA = pa.schema([
    ("__key__", pa.string()), ("id", pa.string()),
    ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
    ("json", pa.string()),
    ("members", pa.map_(pa.string(), pa.binary())),
])
ROWS_PER_GROUP = 64  # a Parquet shard's rows in memory at once
# An object store's upload goes in parts of this size, each held in memory until sent: s3fs's
# default (50 MiB) would hold a third of a default shard; 16 MiB costs ~8 requests per shard.
UPLOAD_PART = 16 << 20


def sample_key(image_id: str) -> str:
    """The id as a WebDataset key: no dot (readers split a member's name at its first dot)."""
    return image_id.replace("%", "%25").replace(".", "%2E")


def shard_uri(output_uri: str, layout: str, run_id: str, first_row: int,
              key_spread: int = 0) -> str:
    """A name for a new shard that no other run or attempt uses; with ``key_spread``, under a
    folder of that many hex characters of its random part (output.key_spread)."""
    tag = uuid.uuid4().hex[:8]
    name = f"{run_id}-{first_row:012d}-{tag}{EXTENSIONS[layout]}"
    return storage.join(output_uri, "shards", *([tag[:key_spread]] if key_spread else []), name)


class ShardWriter:
    """One shard, open for appending; :meth:`commit` publishes it whole, :meth:`abort` (or an
    exception inside ``with``) leaves nothing under its name."""

    def __init__(self, uri: str, layout: str, options: Mapping | None = None):
        self.uri, self.layout = uri, layout
        fs, path = storage.filesystem(uri, options)
        self.local = storage.is_local(fs)
        if self.local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            self.path = path
            self.tmp = os.path.join(os.path.dirname(path), f".tmp-{uuid.uuid4().hex}")
            self.stream = open(self.tmp, "wb")
        else:  # a multipart upload: nothing is visible until it completes
            self.stream = fs.open(path, "wb", block_size=UPLOAD_PART)
        self.mtime = time.time()
        self.tar = self.parquet = None
        if layout == "webdataset":
            self.tar = tarfile.open(fileobj=self.stream, mode="w|")
        else:
            self.parquet = pq.ParquetWriter(self.stream, PARQUET_SCHEMA)
        self.pending: list[dict] = []

    def add(self, image_id: str, ext: str, image: bytes, metrics: Mapping,
            members: Mapping[str, bytes] | None = None) -> tuple[str, int | None]:
        """Append one image, its metrics and the members its input carried (by extension);
        returns its member's name (tar) or key (Parquet), and where a tar member's data
        starts in the shard."""
        key = sample_key(image_id)
        text = json.dumps(metrics, sort_keys=True, default=str)
        if self.tar is not None:
            name = f"{key}{ext}"
            offset = self._member(name, image)
            self._member(f"{key}.metrics.json", text.encode())
            for extension, data in (members or {}).items():
                self._member(f"{key}.{extension}", data)
            return name, offset
        self.pending.append({"__key__": key, "id": image_id,
                             "image": {"bytes": image, "path": f"{key}{ext}"}, "json": text,
                             "members": dict(members) if members else None})
        if len(self.pending) >= ROWS_PER_GROUP:
            self._flush_rows()
        return key, None

    def _member(self, name: str, data: bytes) -> int:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), int(self.mtime), 0o444
        # A header is 512 bytes (names over 100 bytes add a long-name header before it).
        before = self.tar.offset
        self.tar.addfile(info, io.BytesIO(data))
        header_and_data = self.tar.offset - before
        padded = -len(data) % tarfile.BLOCKSIZE
        return before + header_and_data - padded - len(data)

    def _flush_rows(self) -> None:
        if self.pending:
            self.parquet.write_table(pa.Table.from_pylist(self.pending, PARQUET_SCHEMA))
            self.pending = []

    def commit(self) -> None:
        if self.tar is not None:
            self.tar.close()
        else:
            self._flush_rows()
            self.parquet.close()
        self.stream.close()
        if self.local:
            os.replace(self.tmp, self.path)

    def abort(self) -> None:
        try:  # the writers' own buffers go into what is thrown away, not into a closed file
            (self.tar or self.parquet).close()
        except Exception:
            pass
        try:
            if not self.local and hasattr(self.stream, "discard"):
                self.stream.discard()  # the multipart upload, aborted
            else:
                self.stream.close()
        finally:
            if self.local and os.path.exists(self.tmp):
                os.remove(self.tmp)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, kind, error, tb) -> None:
        if kind is not None:
            self.abort()


def read_member(output_uri: str, member: str, offset: int | None, size: int | None,
                options: Mapping | None = None) -> bytes:
    """One image of a shard: a ranged read of a tar member, or the row of a Parquet shard."""
    fs, path = storage.filesystem(output_uri, options)
    if offset is not None:
        return fs.cat_file(path, start=offset, end=offset + size)
    with fs.open(path, "rb") as f:
        table = pq.read_table(f, columns=["__key__", "image"],
                              filters=[("__key__", "=", member)])
    if not table.num_rows:
        raise FileNotFoundError(f"{member} is not in {output_uri}")
    return table["image"][0]["bytes"].as_py()


def orphans(output_uri: str, named: set[str],
            options: Mapping | None = None) -> list[tuple[str, int]]:
    """The shards under ``{output}/shards/`` that no ledger row names (``named``: the
    ``output_uri`` of every row), with their sizes: left by a killed run or a retried task,
    published or not (a local writer's temporary file)."""
    fs, path = storage.filesystem(storage.join(output_uri, "shards"), options)
    try:
        listed = fs.find(path, detail=True)  # with key_spread, in folders
    except FileNotFoundError:
        return []
    kept = {storage.filesystem(uri, options)[1] for uri in named if uri}
    return [(name, int(entry.get("size") or 0)) for name, entry in sorted(listed.items())
            if (name.endswith(tuple(EXTENSIONS.values()))
                or name.rsplit("/", 1)[-1].startswith(".tmp-")) and name not in kept]


def unfinished_uploads(output_uri: str,
                       options: Mapping | None = None) -> list[tuple[str, str, int]]:
    """The multipart uploads of shards under ``{output}/shards/`` never completed or aborted
    (a run killed while writing them), as ``(path, upload id, bytes)``: invisible to a listing,
    but stored and billed until aborted. Empty where the store has no such uploads (files)."""
    fs, path = storage.filesystem(storage.join(output_uri, "shards"), options)
    if not hasattr(fs, "call_s3"):
        return []
    bucket, _, prefix = path.partition("/")
    found, marker = [], {}
    while True:
        page = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix + "/",
                          **marker)
        for upload in page.get("Uploads", []):
            parts = fs.call_s3("list_parts", Bucket=bucket, Key=upload["Key"],
                               UploadId=upload["UploadId"])
            found.append((f"{bucket}/{upload['Key']}", upload["UploadId"],
                          sum(p["Size"] for p in parts.get("Parts", []))))
        if not page.get("IsTruncated"):
            return found
        marker = {"KeyMarker": page["NextKeyMarker"],
                  "UploadIdMarker": page["NextUploadIdMarker"]}


def abort_uploads(uploads: list[tuple[str, str, int]], output_uri: str,
                  options: Mapping | None = None) -> None:
    """Abort ``uploads`` (from :func:`unfinished_uploads`), freeing what their parts hold."""
    fs, _ = storage.filesystem(output_uri, options)
    for path, upload_id, _ in uploads:
        bucket, _, key = path.partition("/")
        fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)


def read_output(row: Mapping, options: Mapping | None = None) -> bytes:
    """The restored image a metrics row names: its file, or its member of a shard."""
    if row.get("output_member") is None:
        return storage.read_bytes(row["output_uri"], options)
    return read_member(row["output_uri"], row["output_member"], row.get("output_offset"),
                       row.get("bytes_out"), options)
