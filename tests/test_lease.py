"""One run at a time per output: a second run is refused while the first holds the lease, takes
over a lease its holder left to expire, and of runs racing at the same instant exactly one wins,
on local disks and on S3, for a free output and for a stale lease alike."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs import restore
from pipeline.restore import lease as lease_module
from pipeline.restore.lease import Lease, LeaseError, LeaseHeld

from .conftest import make_image
from .lease_race import race

REPO = Path(__file__).resolve().parents[1]


def _record(path: Path, **fields) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": "elsewhere", "pid": 1, **fields}))


def test_a_live_lease_refuses_a_second_run_and_an_expired_one_is_taken(tmp_path):
    first = Lease(str(tmp_path), "run-a", ttl_s=60)
    first.acquire()
    with pytest.raises(LeaseHeld, match="in use by run run-a"):
        Lease(str(tmp_path), "run-b").acquire()
    first.release()
    assert first.holder() is None  # released: the output is free

    records = tmp_path / "runs" / "lease"
    _record(records / "0000000007.json", run_id="run-dead", expires_at=time.time() - 1)
    second = Lease(str(tmp_path), "run-b")
    second.acquire()  # the dead run's lease has expired
    assert second.holder()["run_id"] == "run-b"
    assert sorted(p.name for p in records.iterdir()) == ["0000000008.json"]  # history removed
    second.release()

    # a killed driver on this machine: its lease has time left, its process is gone
    _record(records / "0000000009.json", run_id="run-killed", host=socket.gethostname(),
            pid=2**22 + 17, expires_at=time.time() + 600)
    third = Lease(str(tmp_path), "run-c")
    third.acquire()
    third.release()


def test_a_live_lease_of_the_earlier_release_is_honoured(tmp_path):
    _record(tmp_path / "runs" / "lease.json", run_id="run-old", expires_at=time.time() + 60)
    with pytest.raises(LeaseHeld, match="run-old"):
        Lease(str(tmp_path), "run-b").acquire()
    _record(tmp_path / "runs" / "lease.json", run_id="run-old", expires_at=time.time() - 1)
    Lease(str(tmp_path), "run-b").acquire()


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b'{"run_id": 3}', b"\xff\xfe"])
def test_a_garbled_lease_is_a_clear_error(tmp_path, content, capsys):
    path = tmp_path / "out" / "runs" / "lease" / "0000000001.json"
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    with pytest.raises(LeaseError, match="remove it"):
        Lease(str(tmp_path / "out"), "run-b").acquire()
    # and through the job: exit 2 naming the file, no traceback
    make_image(tmp_path / "in" / "a.png")
    status = restore.main(["--manifest", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                           "--checkpoint", "", "--device", "cpu", "--engine", "local"])
    err = capsys.readouterr().err
    assert status == 2 and "0000000001.json" in err and "Traceback" not in err


def test_a_garbled_lease_of_the_earlier_release_is_a_clear_error(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "lease.json").write_text("{torn")
    with pytest.raises(LeaseError, match=r"lease\.json.*remove it"):
        Lease(str(tmp_path), "run-b").acquire()


def test_create_if_absent_without_hard_links(tmp_path, monkeypatch):
    from pipeline import storage

    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted")  # what FUSE or SMB says

    monkeypatch.setattr(storage.os, "link", no_links)
    storage.create_if_absent(str(tmp_path / "a.json"), b"{}")
    with pytest.raises(FileExistsError):
        storage.create_if_absent(str(tmp_path / "a.json"), b"[]")
    assert (tmp_path / "a.json").read_bytes() == b"{}"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temporary file left


def test_the_lease_is_renewed_while_the_run_lives(tmp_path):
    lease = Lease(str(tmp_path), "run-a", ttl_s=0.3)
    lease.acquire()
    first = lease.holder()["expires_at"]
    time.sleep(0.45)
    assert lease.holder()["expires_at"] > first  # renewed every ttl/3
    lease.release()


def test_a_stalled_holder_learns_it_lost_the_lease_and_cannot_take_it_back(tmp_path):
    stalled = Lease(str(tmp_path), "run-a", ttl_s=0.3)
    stalled.acquire()
    stalled._stop.set()  # it stops renewing, as a frozen process would
    stalled._renewer.join()
    time.sleep(0.35)
    taker = Lease(str(tmp_path), "run-b", ttl_s=60)
    taker.acquire()
    assert stalled._taken_over()
    stalled.release()  # must not overwrite the taker's record
    assert taker.holder()["run_id"] == "run-b"
    taker.release()


def test_lease_on_s3(s3):
    options, bucket = s3
    out = f"s3://{bucket}/out"
    first = Lease(out, "run-a", options)
    first.acquire()
    assert first._conditional()  # moto honours If-None-Match: the atomic path is the one tested
    with pytest.raises(LeaseHeld):
        Lease(out, "run-b", options).acquire()
    first.release()
    assert first.holder() is None
    second = Lease(out, "run-b", options)
    second.acquire()
    second.release()


def test_the_fallback_for_stores_without_conditional_writes(s3):
    options, bucket = s3
    out = f"s3://{bucket}/out"
    first = Lease(out, "run-a", options, conditional=False)
    first.settle_s = 0.2
    first.acquire()
    with pytest.raises(LeaseHeld):
        Lease(out, "run-b", options, conditional=False).acquire()
    first.release()


def test_pairs_of_runs_racing_at_the_same_instant_never_both_win_locally(tmp_path):
    bases = [str(tmp_path / f"pair{k}") for k in range(4)]
    assert race(bases, rounds=50) == []  # 200 races, each with exactly one winner


def test_racing_to_take_over_a_stale_lease_never_both_win(tmp_path):
    bases = [str(tmp_path / f"pair{k}") for k in range(4)]
    for base in bases:
        for k in range(25):
            _record(Path(base) / str(k) / "runs" / "lease" / "0000000003.json", run_id="dead",
                    expires_at=time.time() - 5)
    assert race(bases, rounds=25) == []


def test_pairs_of_runs_racing_at_the_same_instant_never_both_win_on_s3(s3):
    options, bucket = s3
    lease_module._probed.clear()
    assert race([f"s3://{bucket}/pair{k}" for k in range(3)], rounds=10, options=options) == []


def test_the_fallback_holds_for_runs_that_write_within_its_settling_time(s3):
    options, bucket = s3
    assert race([f"s3://{bucket}/fb{k}" for k in range(2)], rounds=4, options=options,
                conditional=False, settle_s=0.3) == []


def test_two_jobs_started_together_into_one_output(tmp_path):
    """The reported case, through the public command: two manifests give one id to different
    sources; both runs started at once used to exit 0 with the other's image on disk."""
    for name, seed in (("one", 1), ("two", 2)):
        make_image(tmp_path / name / "x.png", size=(20, 16), seed=seed)
    out = tmp_path / "out"
    env_cmd = [sys.executable, "-m", "jobs.restore", "--output", str(out), "--checkpoint", "",
               "--device", "cpu", "--engine", "local"]
    procs = [subprocess.Popen(env_cmd + ["--manifest", str(tmp_path / name)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in ("one", "two")]
    codes = [p.wait(timeout=300) for p in procs]
    errs = [p.stderr.read() for p in procs]
    assert sorted(codes) in ([0, 2], [0, 0]), (codes, errs)
    if codes == [0, 0]:
        # only if they did not overlap: the second then saw the first's row and refused the id
        from pipeline.restore.ledger import latest_per_item, read_metrics

        latest = latest_per_item(read_metrics(str(out / "metrics")))
        assert sorted(latest["status"].to_pylist()) == ["error", "ok"]
    else:
        loser = errs[codes.index(2)]
        assert "in use by run" in loser or "at the same moment" in loser


def test_the_job_refuses_an_output_another_run_holds(tmp_path, capsys):
    make_image(tmp_path / "in" / "a.png")
    holder = Lease(str(tmp_path / "out"), "20261127T000000-other", ttl_s=600)
    holder.acquire()
    try:
        status = restore.main(["--manifest", str(tmp_path / "in"),
                               "--output", str(tmp_path / "out"), "--device", "cpu"])
    finally:
        holder.release()
    assert status == 2
    assert "in use by run 20261127T000000-other" in capsys.readouterr().err
    assert not (tmp_path / "out" / "images").exists()
