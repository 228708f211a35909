"""The local engine: the restore stages in one worker process on this machine, without Ray.

For a machine on its own without a GPU (a laptop, a small nightly batch). There, Ray costs
seconds before the first image (its processes, the actor's), and its daemons take a share of
few cores from the model's threads (docs/performance.md: about twice as fast on 2 cores). One
worker holds the model with the machine's cores for its threads and
runs prepare, restore and finish over each block in turn (in the shard layouts, finishing
appends to a shard that stays open across blocks); the driver keeps blocks queued so
that the worker never waits for it.

The worker is a process, not a thread, for the reason Ray's are: an image that crashes a decoder
or exhausts memory kills the worker, not the run. Its blocks are then lost, and the run retries
their rows one per block in a new worker, where only the culprit fails.

Inside the worker, when the input or the output is on an object store, the stages overlap as
Ray's tasks do: while a block is restored, the next one is read and decoded and the last one
encoded and written, each in a thread of its own, so that round trips wait beside the model
rather than before and after it. A call
hands in a block (and the next, to read ahead) and gets back the block before it, finished;
a last call gets the last one.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import pyarrow as pa

from pipeline import storage
from pipeline.config import JobConfig
from pipeline.restore.engine import (
    StageError,
    block_rows,
    blocks,
    local_device,
    local_threads,
    restore_actor_args,
    shard_size,
)
from pipeline.restore.shard_stream import ShardStream
from pipeline.restore.stages import (
    RestoreActor,
    StageContext,
    encode,
    finish,
    prepare,
)

QUEUED_BLOCKS = 2  # beyond the one running: the worker never waits for the driver


def restore_batches(todo: pa.Table, ctx: StageContext, config: JobConfig,
                    rows_per_block: int | str, verbose: bool = False) -> Iterator[pa.Table]:
    """The engine (see :mod:`pipeline.restore.engine`) in a local worker process. A worker
    that dies ends the pass early: the rows it did not return are lost, for the caller to retry.
    A stage's own failure raises StageError."""
    device = local_device(config)
    args = restore_actor_args(config, ctx, device, local_threads(config))
    rows_per_block = block_rows(rows_per_block, device)
    per_shard = shard_size(config, rows_per_block)
    # spawn, not fork: the driver has threads (the lease's), which fork would copy mid-state.
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_exit_with, initargs=(os.getpid(),))
    pending: deque[Future] = deque()
    try:
        try:
            pool.submit(_ready).result()
        except BrokenProcessPool:
            # Not an image's fault: no block has run. Its rows must not end as error rows.
            raise StageError("the local engine's worker process died as it started (its error "
                             "is above); --engine ray runs the stages on Ray instead") from None
        todo_blocks = blocks(todo, rows_per_block)  # the worker restores a block at once
        # Overlap where requests wait on a store: on local files it only made the stages'
        # threads contend with the model's (2% slower on this project's 2-core machine,
        # docs/performance.md). The retry pass (blocks of one row) finds the row that kills its
        # worker: there one block at a time, so that such a row takes no other with it.
        overlap = rows_per_block > 1 and _remote(config)
        for i, block in enumerate(todo_blocks):
            ahead = todo_blocks[i + 1] if overlap and i + 1 < len(todo_blocks) else None
            pending.append(pool.submit(_step, block, ahead, ctx, args, per_shard, overlap))
            if len(pending) > QUEUED_BLOCKS:
                yield from _result(pending.popleft())
        pending.append(pool.submit(_last))
        while pending:
            yield from _result(pending.popleft())
    except BrokenProcessPool:
        return  # the worker died (crash, kill, out of memory) with blocks in hand
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _remote(config: JobConfig) -> bool:
    """Whether the input or the output is on an object store (anything but local files)."""
    return any(storage.protocol(uri) not in ("file", "local")
               for uri in (config.input.manifest, config.output.uri))


def _result(future: Future) -> Iterator[pa.Table]:
    """The finished block a call gave back, if any."""
    try:
        finished = future.result()
    except BrokenProcessPool:
        raise
    except Exception as e:
        raise StageError.of(e) from e
    if finished is not None:
        yield finished


def _exit_with(driver_pid: int) -> None:
    """In the worker: end when the driver does, even killed outright (SIGKILL, the OOM killer),
    rather than hold the model's memory as an orphan."""

    def watch():
        while os.getppid() == driver_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-driver", daemon=True).start()


def _ready() -> bool:
    """In the worker: nothing; it answers once the worker has started and imported the stages."""
    return True


class _Output:
    """How the worker finishes restored blocks: each image a file, or appended to the open
    shard (see :mod:`pipeline.restore.shard_stream`), which outlives the block."""

    def __init__(self, ctx: StageContext, per_shard: int):
        self.ctx = ctx
        self.stream = None if ctx.layout == "files" else ShardStream(ctx, per_shard)

    def write(self, restored: pa.Table) -> pa.Table | None:
        if self.stream is None:
            return finish(restored, self.ctx)
        try:
            return self.stream.add(encode(restored, self.ctx))
        except BaseException:
            self.stream.abort()
            raise

    def close(self) -> pa.Table | None:
        return self.stream.close() if self.stream is not None else None


class _Pipeline:
    """The worker's stages in flight: the next block being read, the last being written."""

    def __init__(self, actor: RestoreActor, output: _Output):
        self.actor, self.output = actor, output
        self.threads = ThreadPoolExecutor(2, thread_name_prefix="stage")
        self.reading: tuple[int, Future] | None = None  # (first row, its prepare)
        self.writing: Future | None = None

    def step(self, block: pa.Table, ahead: pa.Table | None, ctx: StageContext,
             overlap: bool = True) -> pa.Table | None:
        if not overlap:
            return self.output.write(self.actor.restore_block(prepare(block, ctx)))
        first = block["row"][0].as_py()
        if self.reading is not None and self.reading[0] == first:
            prepared = self.reading[1].result()
        else:
            prepared = prepare(block, ctx)
        self.reading = None if ahead is None else (
            ahead["row"][0].as_py(), self.threads.submit(prepare, ahead, ctx))
        restored = self.actor.restore_block(prepared)
        written = self.written()
        self.writing = self.threads.submit(self.output.write, restored)
        return written

    def written(self) -> pa.Table | None:
        """What the block being written finished, once it is; None if there is none."""
        writing, self.writing = self.writing, None
        return None if writing is None else writing.result()

    def last(self) -> pa.Table | None:
        """What the last block and the open shard finish."""
        tables = [t for t in (self.written(), self.output.close()) if t is not None]
        return pa.concat_tables(tables) if tables else None


_pipeline: _Pipeline | None = None  # the worker's, built by its first block


def _step(block: pa.Table, ahead: pa.Table | None, ctx: StageContext, actor_args: dict,
          per_shard: int, overlap: bool = True) -> pa.Table | None:
    """In the worker: restore ``block`` (read ahead with the next call's, ``ahead``), and give
    back what the block before it finished (None for the first); without ``overlap``, what
    ``block`` itself finished. In the shard layouts a block finishes rows only when it fills
    a shard."""
    global _pipeline
    if _pipeline is None:
        _pipeline = _Pipeline(RestoreActor(**actor_args), _Output(ctx, per_shard))
    return _pipeline.step(block, ahead, ctx, overlap)


def _last() -> pa.Table | None:
    """In the worker: what the last block and the open shard finish."""
    return _pipeline.last() if _pipeline is not None else None
