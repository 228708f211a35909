"""`ray job submit` against a real head started as a user starts one (`ray start --head`), with
Ray 2.60's token authentication on, through the CLI and through JobSubmissionClient."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from .conftest import BIN, PHOTOS, REPO, free_ports, kill_session


@pytest.fixture(scope="module")
def ray_head():
    """A head node on free ports in its own temporary directory and session (so that stopping
    its process group stops every Ray process it started), with token authentication."""
    # Short: Ray's Unix sockets live under the temp dir, and socket paths are limited to 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="rayhead-", dir="/tmp"))
    token = root / "token"
    token.write_text(uuid.uuid4().hex)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(root), PATH=f"{BIN}{os.pathsep}{env['PATH']}", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN_PATH=str(token), RAY_USAGE_STATS_ENABLED="0")
    gcs, dashboard, client, agent = free_ports(4)
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=2",
         f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1",
         f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
         f"--temp-dir={root / 't'}", "--object-store-memory=300000000"],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL,
        stderr=open(root / "head.log", "wb"))
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 90
        while True:
            probe = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address],
                                   env=env, capture_output=True)
            if probe.returncode == 0:
                break
            if head.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the head did not start:\n{(root / 'head.log').read_text()}")
            time.sleep(1)
        yield {"address": address, "env": env, "root": root}
    finally:
        # Every process the head started is in its session: stop them all, and only them
        # (`ray stop` would stop every Ray on the machine).
        kill_session(head.pid)
        head.wait()
        shutil.rmtree(root, ignore_errors=True)


def _uploaded_package(root: Path) -> Path:
    packages = sorted(p for p in (root / "t" / "session_latest" / "runtime_resources" /
                       "working_dir_files").iterdir() if p.is_dir())
    assert len(packages) == 1
    return packages[0]


def test_cli_submit_with_the_working_dir(ray_head, tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", ray_head["address"],
         "--working-dir", ".", "--", "python", "-m", "jobs.restore", "--output", str(out)],
        cwd=REPO, env=ray_head["env"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "8/8 rows, 8 ok, 0 error" in done.stdout
    # A clean run's console: no error-level or deprecation lines from Ray (the job's own
    # output is everything after the entrypoint line).
    job_output = done.stdout.split("Running entrypoint for job", 1)[1]
    assert "core_worker" not in job_output and "deprecat" not in job_output.lower()
    assert not re.search(r"^\[[^]]* E \d+ \d+\]|\bERROR\b", job_output, re.MULTILINE)
    assert "succeeded" in done.stdout + done.stderr

    table = pq.read_table(out / "metrics")
    assert table.num_rows == 8 and set(table["status"].to_pylist()) == {"ok"}
    assert all(Path(u).is_file() for u in table["output_uri"].to_pylist())
    assert (out / "report.html").is_file()  # configs/local.yaml asks for it

    # What went up: the code, configs, checkpoint and samples; not the tests, docs, infra.
    package = _uploaded_package(ray_head["root"])
    names = {p.name for p in package.iterdir()}
    assert {"pipeline", "jobs", "configs", "checkpoints", "samples"} <= names
    assert not names & {"tests", "docs", "infra", ".git", ".venv", ".ci"}
    size = sum(f.stat().st_size for f in package.rglob("*") if f.is_file())
    assert size < 20 * 1024**2


def test_submission_client_and_a_bad_row(ray_head, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "good.png").write_bytes(PHOTOS[0].read_bytes())
    (inputs / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        import sys, time
        from ray.job_submission import JobStatus, JobSubmissionClient
        client = JobSubmissionClient({ray_head['address']!r})
        job = client.submit_job(
            entrypoint="python -m jobs.restore --manifest {inputs} --output {out} --device cpu",
            runtime_env={{"working_dir": {str(REPO)!r}}})
        deadline = time.time() + 240
        while client.get_job_status(job) not in {{JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                  JobStatus.STOPPED}}:
            assert time.time() < deadline, "the job did not finish"
            time.sleep(1)
        print(client.get_job_status(job).value)
        print(client.get_job_logs(job))
    """)
    done = subprocess.run([sys.executable, "-c", script], env=ray_head["env"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("SUCCEEDED"), done.stdout[-3000:]
    assert "2/2 rows, 1 ok, 1 error" in done.stdout

    rows = {r["id"]: r for r in pq.read_table(out / "metrics").to_pylist()}
    assert rows["good"]["status"] == "ok" and rows["good"]["device"] == "cpu"
    assert rows["broken"]["status"] == "error" and rows["broken"]["error"].startswith("decode:")


def test_without_the_token_the_head_refuses(ray_head):
    env = {k: v for k, v in ray_head["env"].items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(ray_head["root"] / "elsewhere")
    done = subprocess.run([str(BIN / "ray"), "job", "list", "--address", ray_head["address"]],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
