"""GPUs on an autoscaling cluster: a job started while no GPU node exists asks for GPUs by
resource request, the autoscaler adds GPU nodes, and the restore actors run there.

The cluster is Ray's fake multi-node provider (what `ray.cluster_utils.AutoscalingCluster`
drives), started here on free ports in its own session so that stopping it touches no other
Ray. Its GPUs are a resource only, so the model runs with `inference.device: cpu`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from .conftest import BIN, REPO, free_ports, kill_session, make_image

GPU_NODE = {"CPU": 1, "GPU": 1, "object_store_memory": 150_000_000}


def _fake_cluster_config(gcs_address: str) -> dict:
    return {
        "cluster_name": "fake-autoscaling", "max_workers": 2,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True,
                     "gcs_address": gcs_address},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 2}, "node_config": {}, "max_workers": 0},
            "gpu_worker": {"resources": GPU_NODE, "node_config": {}, "min_workers": 0,
                           "max_workers": 2},
        },
        "head_node_type": "ray.head.default", "auth": {}, "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5, "docker": {}, "file_mounts": {},
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [], "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
    }


def _in_cluster(env: dict, code: str) -> dict:
    """Run ``code`` (which sets ``result``) connected to the cluster; returns ``result``."""
    script = ("import json, ray\nray.init(logging_level='ERROR')\n" + textwrap.dedent(code)
              + "\nprint('RESULT', json.dumps(result))\n")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.split("RESULT ", 1)[1].splitlines()[0])


@pytest.fixture(scope="module")
def autoscaling_cluster():
    import ray._private.services

    root = Path(tempfile.mkdtemp(prefix="rayauto-", dir="/tmp"))
    (gcs_port,) = free_ports(1)
    gcs = f"{ray._private.services.get_node_ip_address()}:{gcs_port}"
    config = root / "cluster.json"
    config.write_text(json.dumps(_fake_cluster_config(gcs)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(root), PATH=f"{BIN}{os.pathsep}{env['PATH']}", RAY_FAKE_CLUSTER="1",
               AUTOSCALER_UPDATE_INTERVAL_S="1", RAY_AUTH_MODE="disabled",
               RAY_USAGE_STATS_ENABLED="0")
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs_port}", "--num-cpus=2",
         f"--autoscaling-config={config}", f"--temp-dir={root / 't'}",
         "--include-dashboard=false", "--object-store-memory=200000000",
         f"--ray-client-server-port={free_ports(1)[0]}"],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL,
        stderr=open(root / "head.log", "wb"))
    client_env = {**env, "RAY_ADDRESS": gcs}
    try:
        deadline = time.time() + 60
        while subprocess.run([str(BIN / "ray"), "status", "--address", gcs], env=env,
                             capture_output=True).returncode:
            if head.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the head did not start:\n{(root / 'head.log').read_text()}")
            time.sleep(1)
        yield client_env
    finally:
        kill_session(head.pid)
        head.wait()
        shutil.rmtree(root, ignore_errors=True)


def test_gpu_actors_land_on_nodes_the_autoscaler_adds(autoscaling_cluster, tmp_path):
    before = _in_cluster(autoscaling_cluster, "result = ray.cluster_resources()")
    assert not before.get("GPU")  # no GPU node when the job starts

    for i in range(6):
        make_image(tmp_path / "in" / f"t{i}.png", (32, 24), seed=i)
    job = tmp_path / "job.yaml"
    job.write_text(textwrap.dedent(f"""
        input: {{manifest: '{tmp_path / "in"}', rows_per_block: 1}}
        output: {{uri: '{tmp_path / "out"}'}}
        inference: {{device: cpu}}
        resources: {{actors: 1, max_actors: auto, cpus_per_actor: 1, gpus_per_actor: 1}}
    """))
    done = subprocess.run([sys.executable, "-m", "jobs.restore", "--config", str(job)],
                          cwd=REPO, env=autoscaling_cluster, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "6/6 rows, 6 ok, 0 error" in done.stdout
    assert set(pq.read_table(tmp_path / "out" / "metrics")["status"].to_pylist()) == {"ok"}

    placed = _in_cluster(autoscaling_cluster, """
        from ray._private.state import actors  # the GCS's table: no dashboard needed
        gpu_nodes = {n["NodeID"] for n in ray.nodes() if n["Resources"].get("GPU")}
        placed = [a["Address"]["NodeID"] for a in actors().values()
                  if "RestoreActor" in a["ActorClassName"]]
        result = {"gpu_nodes": len(gpu_nodes), "actors": len(placed),
                  "on_gpu_nodes": sum(node in gpu_nodes for node in placed)}
    """)
    assert placed["gpu_nodes"] >= 1  # the autoscaler added GPU nodes ...
    assert placed["actors"] >= 1 and placed["on_gpu_nodes"] == placed["actors"]  # ... for them
