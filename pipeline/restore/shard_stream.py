"""Encoded blocks into shards: one shard open across blocks, so no task holds a shard whole.

The stages hand a shard's images on in blocks (tens of rows, encoded already: see
:func:`pipeline.restore.stages.encode`). A :class:`ShardStream` appends each image to the open
shard as its block arrives and publishes the shard once it holds ``per_shard`` images (or at
:meth:`ShardStream.close`); in memory meanwhile are the block in hand and the metrics rows of
the shard's images, never the shard's images. A row is finished, and named in the ledger,
only once its shard is published: a run killed meanwhile leaves an unpublished shard (a
multipart upload never completed, a temporary file) and its rows undone, for the rerun.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from datetime import datetime, timezone

import pyarrow as pa

from pipeline import imaging
from pipeline.restore import shards
from pipeline.restore.blocks import to_table
from pipeline.restore.ledger import METRICS_SCHEMA
from pipeline.restore.stages import StageContext, fail_write

# What a shard's sample carries of its row besides the image (the rest is the shard's own).
_NOT_SAMPLE_METRICS = {"output_uri", "output_member", "output_offset", "bytes_out", "write_s",
                       "finished_at", "error", "status"}


class ShardStream:
    """Shards of ``per_shard`` images from encoded blocks; :meth:`add` and :meth:`close`
    return the rows they finished (a published shard's, and rows that failed before it), as a
    table of the ledger's schema, or None."""

    def __init__(self, ctx: StageContext, per_shard: int):
        self.ctx, self.per_shard = ctx, per_shard
        self.ext = imaging.EXTENSIONS[ctx.output_format]
        self.writer: shards.ShardWriter | None = None
        self.held: list[tuple[dict, str, int | None]] = []  # (row, member, offset) in the shard
        self.spent = 0.0  # seconds appending to the open shard

    def add(self, block: pa.Table) -> pa.Table | None:
        finished = []
        for row in block.to_pylist():
            image, members = row.pop("encoded"), dict(row.pop("members") or ())
            if row["status"] != "ok":
                finished.append(row)  # an error row needs no shard
                continue
            t = time.perf_counter()
            try:
                if self.writer is None:
                    uri = shards.shard_uri(self.ctx.output_uri, self.ctx.layout,
                                           self.ctx.run_id, row["row"], self.ctx.key_spread)
                    self.writer = shards.ShardWriter(uri, self.ctx.layout,
                                                     self.ctx.storage_options)
                metrics = {k: v for k, v in row.items() if k not in _NOT_SAMPLE_METRICS}
                member, offset = self.writer.add(row["id"], self.ext, image, metrics, members)
            except Exception as e:
                fail_write(row, e)
                finished.append(row)
                finished += self._abort(e)
                continue
            self.spent += time.perf_counter() - t
            self.held.append((row, member, offset))
            if len(self.held) >= self.per_shard:
                finished += self._commit()
        return _table(finished)

    def close(self) -> pa.Table | None:
        """Publish the open shard, if any."""
        return _table(self._commit()) if self.writer is not None else None

    def abort(self) -> None:
        """Leave nothing of the open shard (its rows go unfinished, for a rerun)."""
        if self.writer is not None:
            self.writer.abort()
        self.writer, self.held, self.spent = None, [], 0.0

    def _commit(self) -> list[dict]:
        t = time.perf_counter()
        try:
            self.writer.commit()
        except Exception as e:
            return self._abort(e)
        share = (self.spent + time.perf_counter() - t) / len(self.held)
        uri, rows = self.writer.uri, []
        for row, member, offset in self.held:
            row.update(output_uri=uri, output_member=member, output_offset=offset,
                       write_s=(row["write_s"] or 0.0) + share)
            rows.append(row)
        self.writer, self.held, self.spent = None, [], 0.0
        return rows

    def _abort(self, error: BaseException) -> list[dict]:
        """The open shard thrown away: its rows failed with ``error``."""
        failed = [row for row, _, _ in self.held]
        for row in failed:
            fail_write(row, error)
        self.abort()
        return failed


def write(blocks: Iterable[pa.Table], ctx: StageContext, per_shard: int) -> pa.Table | None:
    """``blocks`` (encoded) into shards, a block at a time; the finished rows."""
    stream, finished = ShardStream(ctx, per_shard), []
    try:
        for block in blocks:
            finished.append(stream.add(block))
        finished.append(stream.close())
    except BaseException:
        stream.abort()
        raise
    tables = [t for t in finished if t is not None]
    return pa.concat_tables(tables) if tables else None


def _table(rows: list[dict]) -> pa.Table | None:
    if not rows:
        return None
    now = datetime.now(timezone.utc)
    for row in rows:
        row["finished_at"] = now
    return to_table(rows, METRICS_SCHEMA)
