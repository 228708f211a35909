"""The seam between a run and what runs its stages: the engine interface, its one error, and
which engine a config gets.

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

import pyarrow as pa

from pipeline.config import JobConfig
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
    if config.inference.device == "cpu":
        return "local"
    import torch

    return "ray" if torch.cuda.is_available() else "local"


