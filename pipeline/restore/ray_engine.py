"""The Ray engine: the restore stages as one Ray Data graph.

    rows -> prepare (CPU tasks: read, decode)
         -> RestoreActor pool (one MIMO-UNet each, GPU when the cluster has them)
         -> finish (CPU tasks: encode, atomic write)                       files layout
         -> encode (CPU tasks) -> a shard's writer (a task per shard)      shard layouts

A shard's writer is a plain Ray task, handed the references of its encoded blocks as Ray Data
produces them; it fetches and appends one block at a time (see
:mod:`pipeline.restore.shard_stream`), so no task holds a shard's images at once, and
returns the shard's rows once it is published.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
import warnings
from collections.abc import Iterator

import pyarrow as pa
import ray
import ray.exceptions as rx
from ray.data import ActorPoolStrategy, DataContext, Dataset

from pipeline.config import JobConfig
from pipeline.restore import shard_stream
from pipeline.restore.cluster import ActorPlan, plan_actors
from pipeline.restore.engine import (
    StageError,
    block_rows,
    blocks,
    restore_actor_args,
    shard_size,
)
from pipeline.restore.progress import quiet_ray, without_known_noise
from pipeline.restore.ray_compat import block_failure_log, output_blocks
from pipeline.restore.stages import (
    RestoreActor,
    StageContext,
    encode,
    finish,
    prepare,
)


def restore_batches(todo: pa.Table, ctx: StageContext, config: JobConfig,
                    rows_per_block: int | str, verbose: bool = False) -> Iterator[pa.Table]:
    """The engine (see :mod:`pipeline.restore.engine`) on Ray: a local Ray started here unless
    this process is connected already (or RAY_ADDRESS names a cluster). A block lost with its
    worker, actor or node is skipped; a stage's own failure raises StageError."""
    if not ray.is_initialized():
        ray.init(**quiet_ray(verbose))
    elif not verbose:
        quiet_ray()
    # Ray Data lets a finished pass's actors go by dropping its handles to them. A handle held
    # in a reference cycle (a worker that died mid-pass leaves one) keeps its actor alive, with
    # the CPU or GPU it holds, until Python's cycle collector runs: the retry pass's actor then
    # waited forever for the only GPU. Collect before asking for actors again.
    gc.collect()
    _wait_for_a_free_cpu()
    quiet = contextlib.nullcontext() if verbose else without_known_noise()
    with quiet, _lost_blocks_tolerated(verbose) as failures:
        actors = plan_actors(config)
        k = block_rows(rows_per_block, actors.device)
        dataset = _restore_graph(todo, ctx, config, actors, k)
        if config.output.layout == "files":
            batches = dataset.iter_batches(batch_format="pyarrow", batch_size=None)
        else:
            batches = _write_shards(dataset, ctx, shard_size(config, k))
        for batch in batches:
            yield batch
            failures.raise_if_a_stage_failed()
        failures.raise_if_a_stage_failed()


# Shards being written at once: each pins its blocks in the object store until it is published.
# At least two per GPU: one GPU fills a 512-image shard every 1.3 s (408 images/s measured on
# an H100), and a shard's upload must not hold the next one's blocks back.
SHARDS_IN_FLIGHT = 4


def _shards_in_flight() -> int:
    """Asked again as the cluster grows (an autoscaler adds GPUs during a run)."""
    return max(SHARDS_IN_FLIGHT, 2 * int(ray.cluster_resources().get("GPU", 0)))


def _write_shards(dataset: Dataset, ctx: StageContext, per_shard: int) -> Iterator[pa.Table]:
    """The encoded blocks of ``dataset`` cut into shards of ``per_shard`` rows as they come,
    each written by a task of its own; each shard's rows once it is published. A writer lost
    with its worker after Ray's retries loses its rows, for the run to retry."""
    writing: list[ray.ObjectRef] = []
    parts: list[tuple[ray.ObjectRef, int, int]] = []
    rows = 0
    try:
        for ref, start, stop in output_blocks(dataset):
            while start < stop:
                take = min(stop - start, per_shard - rows)
                parts.append((ref, start, start + take))
                start, rows = start + take, rows + take
                if rows == per_shard:
                    writing.append(_shard_writer.remote(parts, ctx, per_shard))
                    parts, rows = [], 0
            while len(writing) > _shards_in_flight():
                yield from _written(writing, wait_for=1)
            yield from _written(writing, wait_for=0)
        if parts:
            writing.append(_shard_writer.remote(parts, ctx, per_shard))
        while writing:
            yield from _written(writing, wait_for=1)
    finally:  # the run stopped early: a writer stopped now aborts its shard, leaving no orphan
        for ref in writing:
            ray.cancel(ref)


def _written(writing: list[ray.ObjectRef], wait_for: int) -> Iterator[pa.Table]:
    """The rows of the shards written so far (at least ``wait_for`` of them), taken off
    ``writing``."""
    if not writing:
        return
    done, writing[:] = ray.wait(writing, num_returns=wait_for or len(writing),
                                timeout=None if wait_for else 0)
    for ref in done:
        try:
            table = ray.get(ref)
        except _SYSTEM_FAILURES:
            continue  # its rows are lost, and retried by the run
        except rx.RayTaskError as e:  # its text holds the writer's traceback
            raise StageError.of(e) from e
        if table is not None:
            yield table


# No CPU of its own: it only moves encoded bytes, and must not wait behind Ray Data's tasks,
# which hold the CPUs while their output waits for it. Retried after a lost worker, as a new
# shard: the lost attempt's is never published, or is an orphan no row names.
@ray.remote(num_cpus=0, max_retries=3)
def _shard_writer(parts: list[tuple[ray.ObjectRef, int, int]], ctx: StageContext,
                  per_shard: int) -> pa.Table | None:
    return shard_stream.write((ray.get(ref).slice(start, stop - start)
                               for ref, start, stop in parts), ctx, per_shard)


def _wait_for_a_free_cpu(timeout_s: float = 10.0) -> None:
    """An earlier pass's actors release their CPUs a moment after it ends; starting before
    then makes Ray Data warn that the job "will hang", which it would not."""
    deadline = time.time() + timeout_s
    while not ray.available_resources().get("CPU") and time.time() < deadline:
        time.sleep(0.1)


# Failures of the machinery, not of the code: the block's rows are redone one per block.
_SYSTEM_FAILURES = (rx.RayActorError, rx.WorkerCrashedError, rx.ObjectLostError,
                    rx.NodeDiedError, rx.OutOfMemoryError, rx.LocalRayletDiedError,
                    rx.RaySystemError)


class _BlockFailures(logging.Filter):
    """Sorts the block failures Ray Data reports (and, with max_errored_blocks=-1, skips):
    system failures are left to the lost-rows pass; the first application error is kept, to
    stop the run with it. Ray Data's own report of either is shown only when verbose."""

    def __init__(self, verbose: bool):
        super().__init__()
        self.verbose = verbose
        self.stage_error: BaseException | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is None:
            return True
        if not isinstance(error, _SYSTEM_FAILURES) and self.stage_error is None:
            self.stage_error = error  # the driver raises it, traceback and all
        return self.verbose

    def raise_if_a_stage_failed(self) -> None:
        if self.stage_error is not None:
            raise StageError.of(self.stage_error) from self.stage_error


@contextlib.contextmanager
def _lost_blocks_tolerated(verbose: bool = False):
    """Lost blocks are found and redone by the caller; they must not abort the other blocks.
    Yields the :class:`_BlockFailures` that tells a lost block from a failing stage.

    A dataset copies the current DataContext when it is created, so this wraps creation too.
    """
    data_context = DataContext.get_current()
    saved = data_context.max_errored_blocks
    data_context.max_errored_blocks = -1
    failures = _BlockFailures(verbose)
    executor_log = block_failure_log()
    executor_log.addFilter(failures)
    try:
        yield failures
    finally:
        executor_log.removeFilter(failures)
        data_context.max_errored_blocks = saved


def _restore_graph(rows: pa.Table, ctx: StageContext, config: JobConfig, actors: ActorPlan,
                   k: int) -> Dataset:
    """The stages over ``rows``, the restoring actors taking ``k`` rows a call."""
    actor_args = restore_actor_args(config, ctx, actors.device, actors.threads)
    # Two calls per actor, interleaved on its event loop (RestoreActor.__call__ is a coroutine):
    # one block's host work while the other's is on the device, and Ray fetches the next block
    # and stores the last one's output meanwhile (docs/performance.md, "Overlap in the restoring
    # actor"). Blocks of one row are the pass that finds a row that kills its worker: there one
    # call at a time, so that such a row takes no other with it.
    calls = 2 if k > 1 else 1
    # Blocks for reading; the actor's calls take k rows of them at a time.
    prepared = ray.data.from_arrow(blocks(rows, k)).map_batches(
        prepare, fn_kwargs={"ctx": ctx}, batch_format="pyarrow", batch_size=None)
    # Ray 2.60 has no named parameter for max_task_retries and warns that the generic remote
    # arguments go in Ray 2.64; the pin in pyproject.toml keeps this working until then.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        restored = prepared.map_batches(
            RestoreActor, fn_constructor_kwargs=actor_args,
            compute=ActorPoolStrategy(min_size=actors.min_actors, max_size=actors.max_actors,
                                      max_concurrent_calls_per_actor=calls),
            num_cpus=config.resources.cpus_per_actor, num_gpus=actors.gpus,
            # A whole block per call: the restorer groups its images into bucket shapes and runs
            # inference.batch_size of each at a time, so more rows make fuller batches.
            batch_size=k, batch_format="pyarrow",
            # Ray's default retries a task forever on restarted actors; an image that kills
            # its worker would then stall the job.
            max_task_retries=2,
        )
    last = finish if config.output.layout == "files" else encode
    return restored.map_batches(last, fn_kwargs={"ctx": ctx}, batch_format="pyarrow",
                                batch_size=None)
