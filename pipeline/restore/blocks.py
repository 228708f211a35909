"""Blocks between the stages: a ledger row plus its pixels, moved as Arrow tables.

Pixels are laid into one binary column's buffer and read back as views of it, so a block of
restored images is not copied value by value as it passes from the actor to the writing task.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.restore.ledger import METRICS_SCHEMA

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
