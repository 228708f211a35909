"""A driver killed with SIGKILL mid-run; the rerun finishes the rest, nothing lost or doubled."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from PIL import Image

from pipeline.restore.ledger import latest_per_item, read_metrics

from .conftest import REPO, make_image, session_pids


def _start(config, tmp_path, setup_hook: str | None = None, engine: str = "ray", gpus: int = 0):
    """The restore job as a driver process of its own: with its own local Ray, or with the
    local engine's worker process. ``setup_hook`` (a drill in tests/chaos.py) runs in each
    worker: through Ray's setup hook, or through a sitecustomize that every Python started with
    this environment (the local worker too) imports."""
    # PYTHONPATH lets the workers import the drills in tests/chaos.py.
    path = [str(REPO)]
    if setup_hook and engine == "local":
        hooks = tmp_path / "hooks"
        hooks.mkdir(exist_ok=True)
        module, function = setup_hook.rsplit(".", 1)
        (hooks / "sitecustomize.py").write_text(f"import {module}\n{module}.{function}()\n")
        path.insert(0, str(hooks))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(path)}
    log = open(tmp_path / "driver.log", "ab")
    if engine == "ray":
        runtime_env = {"worker_process_setup_hook": setup_hook} if setup_hook else {}
        # address="local": a Ray of its own, not one a test beside it started.
        driver = (f"import ray, sys; ray.init(address='local', runtime_env={runtime_env!r}, "
                  f"num_gpus={gpus}, "
                  "include_dashboard=False); ")
    else:
        driver = "import sys; "
    driver += "from jobs import restore; sys.exit(restore.main(sys.argv[1:]))"
    # A session of its own, so the test can also sweep up the local Ray the driver started.
    return subprocess.Popen([sys.executable, "-c", driver, "--config", str(config),
                             "--device", "cpu"], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _job(tmp_path, ids, rows_per_block=2, batch_size=1, engine="ray", gpus_per_actor=0):
    """Images named by ``ids`` and a config restoring them into ``tmp_path/out``."""
    for i, image_id in enumerate(ids):
        make_image(tmp_path / "in" / f"{image_id}.png", (48, 40), seed=i)
    out = tmp_path / "out"
    config = tmp_path / "job.yaml"
    config.write_text(
        f"input: {{manifest: '{tmp_path / 'in'}', rows_per_block: {rows_per_block}}}\n"
        f"output: {{uri: '{out}'}}\nmodel: {{checkpoint: null}}\n"
        f"inference: {{batch_size: {batch_size}}}\n"
        f"resources: {{engine: {engine}, gpus_per_actor: {gpus_per_actor}}}\n"
    )
    return out, config


def _kill_when(driver, folder: Path, pattern: str, count: int) -> None:
    """SIGKILL ``driver`` once ``folder`` holds ``count`` files matching ``pattern``."""
    deadline = time.time() + 240
    while len(list(folder.glob(pattern))) < count:
        assert driver.poll() is None, "the job ended before it could be killed"
        assert time.time() < deadline, f"no {pattern} appeared"
        time.sleep(0.1)
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ray", "local"])
def test_driver_sigkill_then_rerun(tmp_path, engine):
    n = 24
    ids = [f"img{i:02d}" for i in range(n)]
    out, config = _job(tmp_path, ids, engine=engine)
    driver = _start(config, tmp_path, engine=engine)
    _kill_when(driver, out / "images", "*.png", 6)
    if engine == "ray":
        time.sleep(1)
        os.killpg(driver.pid, signal.SIGKILL)  # the local Ray the driver had started
    else:  # the local worker ends with its driver, holding no memory as an orphan
        deadline = time.time() + 10
        while session_pids(driver.pid) and time.time() < deadline:
            time.sleep(0.2)
        assert not session_pids(driver.pid)
    done_before = len(latest_per_item(read_metrics(str(out / "metrics"))))
    assert done_before < n, "everything finished before the kill"

    # The rerun's engine is beside the point (what it skips is planned before any engine
    # runs): the local one, which starts in a third of Ray's time.
    config.write_text(config.read_text().replace("engine: ray", "engine: local"))
    rerun = _start(config, tmp_path, engine=engine)
    assert rerun.wait(timeout=300) == 0, (tmp_path / "driver.log").read_text()[-3000:]
    log = (tmp_path / "driver.log").read_text()
    assert f"{n - done_before} of {n} rows to do" in log

    merged = latest_per_item(read_metrics(str(out / "metrics")))
    assert sorted(merged["id"].to_pylist()) == ids  # every id exactly once
    assert set(merged["status"].to_pylist()) == {"ok"}
    for uri in merged["output_uri"].to_pylist():
        with Image.open(uri) as img:
            img.load()  # a truncated file would fail here
            assert img.size == (96, 80)
    assert len(list((out / "images").glob("*.png"))) == n


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ray", "local"])
def test_worker_killed_by_a_poisoned_image_costs_only_that_row(tmp_path, engine):
    from .chaos import POISON_ID

    ids = [f"img{i:02d}" for i in range(5)] + [POISON_ID]
    # On Ray, the actor asks for the machine's one (declared) GPU: the retry pass's actor gets
    # it only if the first pass's actor, restarted after the crash, was let go.
    gpus = 1 if engine == "ray" else 0
    out, config = _job(tmp_path, ids, rows_per_block=4, batch_size=4, engine=engine,
                       gpus_per_actor=gpus)
    driver = _start(config, tmp_path, setup_hook="tests.chaos.crash_on_poison", engine=engine,
                    gpus=gpus)
    try:
        code = driver.wait(timeout=120)  # a retry pass left without the GPU would wait forever
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)
    assert code == 0, (tmp_path / "driver.log").read_text()[-3000:]
    log = (tmp_path / "driver.log").read_text()
    assert "rows were lost with failed workers; retrying them one by one" in log

    rows = {r["id"]: r for r in read_metrics(str(out / "metrics")).to_pylist()}
    assert sorted(rows) == sorted(ids)  # exactly one row each
    assert rows[POISON_ID]["status"] == "error"
    assert "worker process died on this image" in rows[POISON_ID]["error"]
    assert all(rows[i]["status"] == "ok" for i in ids if i != POISON_ID)


@pytest.mark.slow
def test_node_lost_mid_run_on_a_multi_node_cluster(tmp_path):
    n = 30
    ids = [f"img{i:02d}" for i in range(n)]
    out, config = _job(tmp_path, ids)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    drill = subprocess.run([sys.executable, "-m", "tests.chaos", str(config)], cwd=REPO,
                           env=env, capture_output=True, text=True, timeout=400)
    assert drill.returncode == 0, drill.stdout[-3000:] + drill.stderr[-3000:]
    assert "job running: True" in drill.stdout  # the node went mid-run

    merged = latest_per_item(read_metrics(str(out / "metrics")))
    assert sorted(merged["id"].to_pylist()) == ids
    assert set(merged["status"].to_pylist()) == {"ok"}
    # the run itself wrote each row once: no duplicates from retried tasks
    run_rows = read_metrics(str(out / "metrics"))
    assert run_rows.num_rows == n


@pytest.mark.slow
@pytest.mark.parametrize("engine,layout", [("ray", "files"), ("local", "files"),
                                           ("ray", "webdataset")])
def test_a_bug_in_a_stage_stops_the_run_with_its_traceback(tmp_path, engine, layout):
    """Also in a shard's writer, a Ray task of its own outside Ray Data."""
    out, config = _job(tmp_path, [f"img{i}" for i in range(4)], rows_per_block=2, engine=engine)
    config.write_text(config.read_text().replace(
        f"output: {{uri: '{out}'}}", f"output: {{uri: '{out}', layout: {layout}}}"))
    driver = _start(config, tmp_path, setup_hook="tests.chaos.break_finish", engine=engine)
    assert driver.wait(timeout=240) == 4
    log = (tmp_path / "driver.log").read_text()
    assert "error: a stage failed; the run stops here" in log
    assert "KeyError: 'finished_at_utc'" in log and "in buggy" in log  # the traceback
    assert "retrying them one by one" not in log  # not mistaken for a lost worker
    assert not (out / "metrics").exists() or not list((out / "metrics").iterdir())


def test_a_local_worker_that_cannot_start_is_no_images_fault(tmp_path):
    # A driver read from stdin: the spawned worker cannot import the driver's main module, as
    # multiprocessing requires, and dies before any block. Its rows must not become errors.
    out, config = _job(tmp_path, ["img0", "img1"], engine="local")
    code = ("from jobs import restore; "
            f"raise SystemExit(restore.main(['--config', {str(config)!r}]))")
    run = subprocess.run([sys.executable, "-"], input=code, cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 4, run.stderr[-2000:]
    assert "the local engine's worker process died as it started" in run.stderr
    assert not (out / "metrics").exists() or not list((out / "metrics").iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ray", "local"])
def test_driver_sigkill_then_rerun_into_shards(tmp_path, capsys, engine):
    """Shards a killed run published are named by no ledger row: the rerun redoes their
    images into new shards, never takes them for committed ones, and the report counts them.
    The shards hold 3 images from blocks of 2, so that a shard spans blocks."""
    from jobs import report
    from pipeline.restore import shards

    n = 24
    ids = [f"img{i:02d}" for i in range(n)]
    out, config = _job(tmp_path, ids, engine=engine)
    config.write_text(config.read_text().replace(
        f"output: {{uri: '{out}'}}",
        f"output: {{uri: '{out}', layout: webdataset, images_per_shard: 3}}"))
    driver = _start(config, tmp_path, engine=engine)
    _kill_when(driver, out / "shards", "*.tar", 3)
    deadline = time.time() + 10
    while session_pids(driver.pid) and time.time() < deadline:
        time.sleep(0.2)
    left = {p.name for p in (out / "shards").iterdir()}  # published, or a temporary file
    done_before = len(latest_per_item(read_metrics(str(out / "metrics"))))
    assert done_before < n

    rerun = _start(config, tmp_path, engine=engine)
    assert rerun.wait(timeout=300) == 0, (tmp_path / "driver.log").read_text()[-3000:]
    merged = latest_per_item(read_metrics(str(out / "metrics")))
    assert sorted(merged["id"].to_pylist()) == ids  # every id exactly once
    assert set(merged["status"].to_pylist()) == {"ok"}
    named = set(merged["output_uri"].to_pylist())
    for row in merged.to_pylist():
        with tarfile.open(row["output_uri"]) as tar:
            assert row["output_member"] in tar.getnames()
        assert shards.read_output(row)[:4] == b"\x89PNG"
    orphans = {Path(p).name for p, _ in shards.orphans(str(out), named)}
    assert orphans and orphans <= left  # only the killed run's, none of the rerun's
    assert report.main([str(out)]) == 0
    assert f"orphaned shards: {len(orphans)}," in capsys.readouterr().out


@pytest.mark.slow
def test_a_poisoned_image_costs_only_its_row_when_the_local_worker_overlaps(tmp_path, s3):
    """Output on an object store: the local worker reads ahead and writes behind, so a worker
    that dies takes up to three blocks with it; the retry pass, one row at a time and without
    overlap, still fails only the culprit."""
    from .chaos import POISON_ID

    options, bucket = s3
    ids = [f"img{i:02d}" for i in range(9)] + [POISON_ID] + [f"img{i:02d}" for i in range(9, 14)]
    out, config = _job(tmp_path, ids, rows_per_block=2, engine="local")
    endpoint = options["s3"]["client_kwargs"]["endpoint_url"]
    config.write_text(config.read_text().replace(f"output: {{uri: '{out}'}}",
                                                 f"output: {{uri: 's3://{bucket}/out'}}")
                      + f"storage: {{endpoint_url: '{endpoint}'}}\n")
    driver = _start(config, tmp_path, setup_hook="tests.chaos.crash_on_poison", engine="local")
    assert driver.wait(timeout=240) == 0, (tmp_path / "driver.log").read_text()[-3000:]
    assert "retrying them one by one" in (tmp_path / "driver.log").read_text()
    rows = {r["id"]: r for r in read_metrics(f"s3://{bucket}/out/metrics", options).to_pylist()}
    assert sorted(rows) == sorted(ids)  # exactly one row each
    assert rows[POISON_ID]["status"] == "error"
    assert all(rows[i]["status"] == "ok" for i in ids if i != POISON_ID)
