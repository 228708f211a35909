"""The Ray internals the engine relies on still exist under the names it uses (see
pipeline/restore/ray_compat.py): a Ray upgrade that renames one fails here."""

from __future__ import annotations

import importlib

from pipeline.restore import ray_compat


def test_ray_data_reports_failed_blocks_through_the_logger_the_engine_filters():
    module = importlib.import_module(ray_compat.BLOCK_FAILURE_LOGGER)
    assert module.logger.name == ray_compat.BLOCK_FAILURE_LOGGER
    assert ray_compat.block_failure_log() is module.logger
    source = importlib.util.find_spec(ray_compat.BLOCK_FAILURE_LOGGER).loader.get_source(
        ray_compat.BLOCK_FAILURE_LOGGER)
    assert "max_errored_blocks" in source and "exc_info=" in source  # it logs the exception


def test_the_autoscalers_maximum_is_read_through_a_call_that_exists():
    from ray._private.state import state

    assert callable(state.get_max_resources_from_cluster_config)
    assert ray_compat.max_cluster_resources() is None  # no cluster here: None, not an error
