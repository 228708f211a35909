"""What the restore actors ask of the cluster: GPUs, pool size and threads.

On an autoscaling cluster what exists at submit time is not what the job can have: a GPU worker
group with ``min_workers: 0`` has no node (and no GPU) until something asks for one. So the
decisions here read the cluster's limits, the resources it can reach by adding nodes, which
the autoscaler publishes; on a fixed cluster (or a local Ray) the limits are what it has.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import ray

from pipeline.config import ConfigError, JobConfig
from pipeline.restore.engine import actor_device, model_threads
from pipeline.restore.ray_compat import max_cluster_resources


def cluster_limits() -> tuple[dict[str, float], dict[str, float] | None]:
    """What the cluster has now, and the most it can have where its autoscaler publishes that
    (autoscaler v2 with a cluster config; None elsewhere)."""
    now = dict(ray.cluster_resources())
    most = max_cluster_resources()
    if most is not None:
        most = {k: max(now.get(k, 0.0), float(most.get(k, 0.0))) for k in {*now, *most}}
    return now, most


@dataclass(frozen=True)
class ActorPlan:
    gpus: float  # per actor, as a Ray resource request
    min_actors: int
    max_actors: int | None  # None: as many as the cluster gives
    threads: int  # torch threads per actor
    device: str  # what torch runs on in the actor: cuda or cpu


def plan_actors(config: JobConfig, now: dict[str, float] | None = None,
                most: dict[str, float] | None = None,
                largest_node_cpus: float | None = None) -> ActorPlan:
    """GPUs, pool bounds and threads for the restore actors, from the config and the cluster
    (``now``: its resources; ``most``: its autoscaler's limits, when known).

    Raises:
        ConfigError: the actors would leave no CPU for the stages that read and write images,
            or ask for a device the cluster cannot provide.
    """
    r = config.resources
    if now is None:
        now, most = cluster_limits()
    limits = most or now
    gpus = _gpus_per_actor(config, limits.get("GPU", 0.0))
    if r.max_actors == "auto":
        # One per GPU the cluster can reach: its published limit, else as many as Ray Data's
        # autoscaling gets from the cluster (None: unbounded). CPU actors stay a fixed pool.
        if not gpus:
            max_actors = r.actors
        elif most:
            max_actors = max(r.actors, math.floor(most.get("GPU", 0.0) / gpus))
        else:
            max_actors = None
    else:
        max_actors = r.max_actors or r.actors
        if max_actors < r.actors:
            raise ConfigError(f"resources.max_actors ({max_actors}) is below resources.actors "
                              f"({r.actors})")
    # GPU actors waiting for GPU nodes that do not exist yet will sit on nodes the autoscaler
    # adds, which bring their own CPUs; otherwise the actors share the CPUs the cluster can
    # have with the tasks that read and write, and must leave some.
    awaiting_gpu_nodes = gpus and not now.get("GPU")
    if not awaiting_gpu_nodes and r.actors * r.cpus_per_actor >= limits.get("CPU", 0.0):
        raise ConfigError(
            f"resources: {r.actors} actors x {r.cpus_per_actor:g} CPUs leave none of the "
            f"cluster's {limits.get('CPU', 0.0):g} CPUs for reading and writing images; lower "
            "resources.actors or resources.cpus_per_actor")
    if largest_node_cpus is None and not gpus:
        largest_node_cpus = max((n["Resources"].get("CPU", 0) for n in ray.nodes()
                                 if n["Alive"]), default=0)
    return ActorPlan(gpus=gpus, min_actors=r.actors, max_actors=max_actors,
                     device=actor_device(config, gpus),
                     threads=model_threads(config, gpus, largest_node_cpus or 0))


def _gpus_per_actor(config: JobConfig, gpu_limit: float) -> float:
    """An explicit number is a resource request whatever exists now (the autoscaler adds GPU
    nodes for it). ``auto`` takes one GPU each when the cluster has or can add GPUs and the
    device allows it; ``inference.device: cpu`` with ``auto`` asks for none."""
    requested, device = config.resources.gpus_per_actor, config.inference.device
    if requested == "auto":
        requested = 1.0 if gpu_limit and device != "cpu" else 0.0
    if device == "cuda" and not requested:
        raise ConfigError("inference.device is cuda but the cluster has no GPUs and cannot add "
                          "any (resources.gpus_per_actor is auto or 0)")
    return float(requested)
