"""How many actors, GPUs and threads the restore asks for, from the config and the cluster's
resources now and at most (an autoscaler's limits)."""

from __future__ import annotations

import pytest

from pipeline.config import ConfigError, JobConfig
from pipeline.restore.cluster import plan_actors


def config(**resources) -> JobConfig:
    device = resources.pop("device", "auto")
    return JobConfig.model_validate({"input": {"manifest": "m"}, "inference": {"device": device},
                                     "resources": resources})


HEAD_ONLY = {"CPU": 8.0}  # an autoscaling cluster's head, before any worker exists


def test_a_gpu_request_waits_for_nodes_the_autoscaler_adds():
    plan = plan_actors(config(actors=4, cpus_per_actor=2, gpus_per_actor=1, max_actors="auto"),
                       now=HEAD_ONLY, most=None, largest_node_cpus=8)
    # 4 x 2 CPUs fill the head, but GPU actors go to GPU nodes that bring their own CPUs.
    assert (plan.gpus, plan.min_actors, plan.max_actors, plan.device) == (1.0, 4, None, "cuda")
    assert plan.threads == 2


def test_the_pool_grows_to_the_published_gpu_limit():
    plan = plan_actors(config(gpus_per_actor=1, max_actors="auto"), now=HEAD_ONLY,
                       most={"CPU": 72.0, "GPU": 8.0})
    assert plan.max_actors == 8
    # auto finds GPUs in the limits too
    assert plan_actors(config(max_actors="auto"), now=HEAD_ONLY,
                       most={"CPU": 72.0, "GPU": 8.0}).gpus == 1.0


def test_auto_on_cpus_shares_the_largest_node_among_a_fixed_pool():
    plan = plan_actors(config(actors=2), now=HEAD_ONLY, most=None, largest_node_cpus=8)
    assert (plan.gpus, plan.min_actors, plan.max_actors, plan.device) == (0.0, 2, 2, "cpu")
    assert plan.threads == 4


def test_gpu_resource_with_the_model_on_cpu():
    plan = plan_actors(config(gpus_per_actor=1, device="cpu"), now=HEAD_ONLY, most=None)
    assert (plan.gpus, plan.device) == (1.0, "cpu")
    assert plan_actors(config(device="cpu"), now={"CPU": 8.0, "GPU": 2.0}, most=None,
                       largest_node_cpus=8).gpus == 0


@pytest.mark.parametrize("resources, now, message", [
    ({"actors": 4, "cpus_per_actor": 2}, HEAD_ONLY, "leave none of the cluster's 8 CPUs"),
    ({"actors": 4, "cpus_per_actor": 2, "gpus_per_actor": 1}, {"CPU": 8.0, "GPU": 4.0},
     "leave none of the cluster's 8 CPUs"),
    ({"device": "cuda"}, HEAD_ONLY, "cannot add any"),
    ({"actors": 3, "max_actors": 2}, HEAD_ONLY, "max_actors (2) is below"),
])
def test_plans_that_cannot_run_are_refused(resources, now, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan_actors(config(**resources), now=now, most=None, largest_node_cpus=8)
