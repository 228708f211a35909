"""The local engine: the restore stages in one worker process on this machine, without Ray.

For a machine on its own without a GPU (a laptop, a small nightly batch). There, Ray costs
seconds before the first image (its processes, the actor's), and its daemons take a share of
few cores from the model's threads (docs/performance.md: about twice as fast on 2 cores). One
worker holds the model with the machine's cores for its threads and
runs prepare, restore and finish over each block in turn; the driver keeps blocks queued so
that the worker never waits for it.

The worker is a process, not a thread, for the reason Ray's are: an image that crashes a decoder
or exhausts memory kills the worker, not the run. Its blocks are then lost, and the run retries
their rows one per block in a new worker, where only the culprit fails.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import pyarrow as pa

from pipeline.config import JobConfig
from pipeline.restore.engine import (
    StageError,
    block_rows,
    local_device,
    local_threads,
    restore_actor_args,
)
from pipeline.restore.stages import (
    RestoreActor,
    StageContext,
    finish,
    prepare,
)

QUEUED_BLOCKS = 2  # beyond the one running: the worker never waits for the driver

_actor: RestoreActor | None = None  # the worker's, built by its first block


def restore_batches(todo: pa.Table, ctx: StageContext, config: JobConfig,
                    rows_per_block: int | str, verbose: bool = False) -> Iterator[pa.Table]:
    """The engine (see :mod:`pipeline.restore.engine`) in a local worker process. A worker
    that dies ends the pass early: the rows it did not return are lost, for the caller to retry.
    A stage's own failure raises StageError."""
    device = local_device(config)
    args = restore_actor_args(config, ctx, device, local_threads(config))
    rows_per_block = block_rows(rows_per_block, device)
    if config.output.layout != "files" and rows_per_block > 1:
        # The worker writes a block's images as one shard (the retry pass: one per row).
        rows_per_block = config.output.images_per_shard
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
        for start in range(0, todo.num_rows, rows_per_block):
            pending.append(pool.submit(_run, todo.slice(start, rows_per_block), ctx, args))
            if len(pending) > QUEUED_BLOCKS:
                yield _result(pending.popleft())
        while pending:
            yield _result(pending.popleft())
    except BrokenProcessPool:
        return  # the worker died (crash, kill, out of memory) with blocks in hand
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _result(future: Future) -> pa.Table:
    try:
        return future.result()
    except BrokenProcessPool:
        raise
    except Exception as e:
        raise StageError.of(e) from e


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


def _run(block: pa.Table, ctx: StageContext, actor_args: dict) -> pa.Table:
    """In the worker: one block through the three stages."""
    global _actor
    if _actor is None:
        _actor = RestoreActor(**actor_args)
    return finish(_actor.restore_block(prepare(block, ctx)), ctx)
