"""The seam between a run and what runs its stages: the engine interface, its one error, which
engine a config gets, and what both engines resolve from the config alike (rows per block,
the restoring actor's arguments, the local worker's threads).

Two engines implement :class:`Engine`: :mod:`pipeline.restore.ray_engine` (Ray Data, on a
cluster or wherever a GPU needs CPU tasks in parallel to keep it fed) and
:mod:`pipeline.restore.local_engine` (one worker process, for a machine alone without a GPU).
Both live above this module and the run above them, so neither engine imports the run.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Iterator
from typing import Protocol

import numpy as np
import pyarrow as pa

from pipeline.config import JobConfig
from pipeline.inference import resolve_device
from pipeline.restore.stages import StageContext


class Engine(Protocol):
    """Runs the stages over ``todo`` and yields each finished block's metrics rows as it
    finishes. Rows it never yields are lost (a dead worker), for the run to retry; a stage that
    fails outside its per-row handling raises :class:`StageError`."""

    def __call__(self, todo: pa.Table, ctx: StageContext, config: JobConfig,
                 rows_per_block: int | str, verbose: bool = False) -> Iterator[pa.Table]: ...


class StageError(RuntimeError):
    """A stage raised outside its per-row handling: a bug or a broken environment, not a bad
    image. The run stops with the stage's traceback; the rows written so far stay done."""

    @classmethod
    def of(cls, error: BaseException) -> StageError:
        trace = "".join(traceback.format_exception(error)).rstrip()
        return cls(f"a stage failed; the run stops here (the rows restored so far are kept, a "
                   f"rerun does the rest):\n{trace}")


def choose(config: JobConfig) -> str:
    """``resources.engine``, with ``auto`` resolved: Ray when this process is connected to Ray
    or is told of a cluster (RAY_ADDRESS, as ``ray job submit`` sets), when several actors are
    asked for, or when a GPU is visible; the local worker otherwise."""
    engine = config.resources.engine
    if engine != "auto":
        return engine
    ray = sys.modules.get("ray")
    if os.environ.get("RAY_ADDRESS") or (ray is not None and ray.is_initialized()):
        return "ray"
    if config.resources.actors > 1 or config.resources.max_actors not in (None, 1):
        return "ray"
    return "ray" if local_device(config) == "cuda" else "local"


def local_device(config: JobConfig) -> str:
    """``inference.device`` for a model on this machine, ``auto`` resolved by what torch sees
    here (the cluster's actors get theirs from :func:`pipeline.restore.cluster.plan_actors`).

    Raises:
        ConfigError: ``cuda`` was asked for and torch sees none.
    """
    return resolve_device(config.inference.device).type


def block_rows(rows_per_block: int | str, device: str) -> int:
    """``input.rows_per_block`` resolved for actors whose model runs on ``device``."""
    if rows_per_block != "auto":
        return int(rows_per_block)
    # A CPU takes about a second per thumbnail: small blocks spread over the pool and show
    # progress. A GPU restores hundreds a second and needs whole batches of each bucket shape.
    return 256 if device == "cuda" else 4


# A block reads its samples of a shard in one ranged GET (stages.prepare): rows from shards go
# in blocks of SHARD_READ_ROWS or more, cut where a shard ends when they can be, so that reading
# costs about a request per shard (or per this many images), not one per rows_per_block (4 on a
# CPU). The restoring actor still takes rows_per_block at a time.
SHARD_READ_ROWS = 128


def blocks(todo: pa.Table, rows_per_block: int) -> list[pa.Table]:
    """``todo`` cut into the preparing stage's blocks: of ``rows_per_block`` rows; from shards,
    whole shards until a block holds SHARD_READ_ROWS, and a shard too long for that in blocks
    of twice as many."""
    n = todo.num_rows
    shards = todo["source_shard"] if "source_shard" in todo.column_names else None
    if rows_per_block <= 1 or shards is None or shards.null_count == n:
        return [todo.slice(i, rows_per_block) for i in range(0, n, rows_per_block)]
    # Where each shard's run of rows ends, found column-wise: a run can be millions of rows.
    codes = np.asarray(shards.combine_chunks().dictionary_encode().indices.fill_null(-1))
    ends = (np.flatnonzero(codes[1:] != codes[:-1]) + 1).tolist() + [n]
    least = max(rows_per_block, SHARD_READ_ROWS)
    out, start = [], 0
    for end in ends:
        while end - start > 2 * least:
            out.append(todo.slice(start, 2 * least))
            start += 2 * least
        if end - start >= least or end == n:
            out.append(todo.slice(start, end - start))
            start = end
    return out


def shard_size(config: JobConfig, rows_per_block: int) -> int:
    """Images per shard in a pass of ``rows_per_block``: ``output.images_per_shard``, but one
    in the pass of one row per block, which finds the image that kills its worker: the rows
    before it must not wait in an open shard that dies with that worker."""
    return config.output.images_per_shard if rows_per_block > 1 else 1


def restore_actor_args(config: JobConfig, ctx: StageContext, device: str, threads: int) -> dict:
    """RestoreActor's constructor arguments for a run of ``config``."""
    return {
        "model": config.model.name, "checkpoint_uri": config.model.checkpoint,
        "checkpoint_sha256": ctx.checkpoint_sha256, "storage_options": ctx.storage_options,
        "device": device, "threads": threads,
        "settings": config.inference,
    }


def actor_device(config: JobConfig, gpus: float) -> str:
    """``inference.device`` for the cluster's actors, ``auto`` resolved by whether each asks
    for a GPU (``gpus``): what torch sees on the driver says nothing of the workers."""
    device = config.inference.device
    return ("cuda" if gpus else "cpu") if device == "auto" else device


def model_threads(config: JobConfig, gpus: float, node_cpus: float,
                  actors: int | None = None) -> int:
    """The model's torch threads in each actor. With a GPU, the actor's CPUs; on CPUs, the
    node's cores (``node_cpus``: the largest node's) shared among the ``actors`` (the config's
    by default): the model is most of the work, and the CPU stages fit between its threads."""
    requested = config.resources.threads_per_actor
    if requested != "auto":
        return requested
    floor = max(1, int(config.resources.cpus_per_actor))
    if gpus:
        return floor
    return max(floor, int(node_cpus) // (actors or config.resources.actors))


def local_threads(config: JobConfig) -> int:
    """The model's torch threads in the local engine's one worker: :func:`model_threads` with
    this machine's cores, which that worker has to itself."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return model_threads(config, 0.0, cores, actors=1)
