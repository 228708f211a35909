"""Blocks between the stages: a ledger row plus its pixels, moved as Arrow tables.

Pixels are laid into one binary column's buffer and read back as views of it, so a block of
restored images is not copied value by value as it passes from the actor to the writing task.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.restore.ledger import METRICS_SCHEMA

# Between stages each row also carries its pixels (the thumbnail, then the restored image) and
# alpha plane (the thumbnail's), their bits per sample, and what the output will embed: the
# colour profile and the metadata blocks, made true for the copy (pipeline.image_metadata).
PIXEL_COLUMNS = ("pixels", "alpha_plane")
WORK_SCHEMA = pa.schema([*METRICS_SCHEMA, pa.field("pixels", pa.large_binary()),
                         pa.field("alpha_plane", pa.large_binary()), pa.field("depth", pa.int8()),
                         pa.field("icc", pa.binary()),
                         pa.field("blocks", pa.struct([(name, pa.binary())
                                                       for name in ("exif", "xmp", "iptc")])),
                         # a shard's sample's other members (extension -> bytes), carried
                         pa.field("members", pa.map_(pa.string(), pa.binary()))])


def to_table(rows: list[dict], schema: pa.Schema = WORK_SCHEMA) -> pa.Table:
    """Rows as dicts (missing keys are null) -> a table of exactly ``schema``. Pixels (bytes or
    arrays) are laid into their column's buffer directly, one copy each: Arrow's per-value
    builder copied a block's restored images several times as its buffer grew."""
    pixel_columns = [name for name in PIXEL_COLUMNS if name in schema.names]
    rest = pa.schema([f for f in schema if f.name not in pixel_columns])
    table = pa.Table.from_pylist([{k: v for k, v in row.items() if k not in pixel_columns}
                                  for row in rows], schema=rest)
    for name in pixel_columns:
        i = schema.get_field_index(name)
        table = table.add_column(i, schema.field(i), pixels_array([row.get(name) for row in rows]))
    return table


def pixels_array(values: list) -> pa.Array:
    """A ``large_binary`` array of ``values`` (bytes, arrays of any dtype, or None)."""
    views = [None if v is None else np.frombuffer(v, np.uint8) if isinstance(v, bytes)
             else np.ascontiguousarray(v).reshape(-1).view(np.uint8) for v in values]
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
    """``table``'s rows as dicts, each row's pixels and alpha a read-only uint8 view of the
    table's own buffer (None where null) rather than a copy in a bytes object."""
    pixel_columns = [name for name in PIXEL_COLUMNS if name in table.column_names]
    rows = table.drop_columns(pixel_columns).to_pylist()
    for name in pixel_columns:
        for row, pixels in zip(rows, pixel_views(table.column(name))):
            row[name] = pixels
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
