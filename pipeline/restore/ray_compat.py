"""What the Ray engine uses of Ray beyond its public API, in one place.

Each is a name a Ray release may change without notice. ``tests/test_ray_compat.py`` checks them
against the installed Ray, so that an upgrade that renames one fails a test rather than turns
quietly wrong: were the block-failure logger renamed, a stage's bug would read as a lost
worker and its rows would end as "worker died" error rows instead of stopping the run.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import ray

# The logger through which Ray Data reports each failed block (with max_errored_blocks=-1 it
# reports and skips); the engine reads the exception off its records.
BLOCK_FAILURE_LOGGER = "ray.data._internal.execution.streaming_executor_state"


def block_failure_log() -> logging.Logger:
    """The logger Ray Data reports a failed block to (its record carries the exception)."""
    return logging.getLogger(BLOCK_FAILURE_LOGGER)


def max_cluster_resources() -> dict[str, float] | None:
    """The most resources the cluster can have, where its autoscaler (v2, with a cluster
    config) publishes that; None where it does not or this Ray has no such call."""
    try:
        from ray._private.state import state

        return state.get_max_resources_from_cluster_config()
    except Exception:  # an older or newer Ray without the call, or no cluster config
        return None


def output_blocks(dataset: ray.data.Dataset) -> Iterator[tuple[ray.ObjectRef, int, int]]:
    """Each block of ``dataset``'s output as Ray Data produces it (streaming, nothing kept):
    its reference, and the range of its rows that is the output's."""
    for bundle in dataset.iter_internal_ref_bundles():
        for entry, cut in zip(bundle.blocks, bundle.slices):
            if cut is None:
                yield entry.ref, 0, entry.metadata.num_rows
            else:
                yield entry.ref, cut.start_offset, cut.end_offset
