"""Fault drills run inside Ray workers (``runtime_env={"worker_process_setup_hook": ...}``)."""

from __future__ import annotations

import os

POISON_ID = "poison"


def crash_on_poison() -> None:
    """Make a restoring worker die, as from a segfault or the OOM killer, on ``POISON_ID``."""
    from pipeline.restore import stages

    restore = stages.RestoreActor.__call__

    async def crashing(self, batch):
        if POISON_ID in batch["id"].to_pylist():
            os._exit(1)
        return await restore(self, batch)

    stages.RestoreActor.__call__ = crashing


def break_finish() -> None:
    """Put a bug in the finishing stage (a shard's writer too) outside its per-row handling,
    as a bad deploy would."""
    from pipeline.restore import shard_stream, stages
    from pipeline.restore.blocks import WORK_SCHEMA
    from pipeline.restore.ledger import METRICS_SCHEMA

    to_table = stages.to_table

    def buggy(rows, schema=WORK_SCHEMA):
        if schema is METRICS_SCHEMA:
            raise KeyError("finished_at_utc")  # a field renamed in one place only
        return to_table(rows, schema)

    stages.to_table = shard_stream.to_table = buggy


def node_kill_drill(config_path: str) -> int:
    """Run the restore job on a 3-node cluster on this machine, remove a worker node once some
    images are written and add a replacement, as when a spot node vanishes; returns the job's
    exit status.

    The head has no CPUs, so the two 1-CPU workers hold all the work: one runs the restoring
    actor and the other the CPU tasks, and whichever goes takes work in flight with it.
    """
    import pathlib
    import threading
    import time

    import ray
    from ray.cluster_utils import Cluster

    from jobs import restore
    from pipeline.config import load_config

    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 0, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    ray.init(address=cluster.address)
    images = pathlib.Path(load_config(config_path).output.uri) / "images"
    status: list[int] = []
    job = threading.Thread(target=lambda: status.append(
        restore.main(["--config", config_path, "--device", "cpu"])))
    job.start()
    while job.is_alive() and len(list(images.glob("*.png"))) < 4:
        time.sleep(0.1)
    print(f"drill: removing a worker node with {len(list(images.glob('*.png')))} images "
          f"written, job running: {job.is_alive()}", flush=True)
    cluster.remove_node(workers[0])
    cluster.add_node(num_cpus=1)  # the spot replacement
    job.join()
    ray.shutdown()
    cluster.shutdown()
    return status[0] if status else 99


if __name__ == "__main__":
    import sys

    sys.exit(node_kill_drill(sys.argv[1]))
