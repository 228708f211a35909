"""One run at a time per output: a second run is refused while the first holds the lease, and
takes over a lease its holder left to expire."""

from __future__ import annotations

import json
import socket
import time

import pytest

from jobs import restore
from pipeline.lease import Lease, LeaseHeld

from .conftest import make_image


def test_a_live_lease_refuses_a_second_run_and_an_expired_one_is_taken(tmp_path):
    first = Lease(str(tmp_path), "run-a", ttl_s=60)
    first.acquire()
    with pytest.raises(LeaseHeld, match="in use by run run-a"):
        Lease(str(tmp_path), "run-b").acquire()
    first.release()
    assert not (tmp_path / "runs" / "lease.json").exists()

    stale = {"run_id": "run-dead", "host": "h", "pid": 1, "expires_at": time.time() - 1}
    (tmp_path / "runs" / "lease.json").write_text(json.dumps(stale))
    second = Lease(str(tmp_path), "run-b")
    second.acquire()  # the dead run's lease has expired
    assert json.loads((tmp_path / "runs" / "lease.json").read_text())["run_id"] == "run-b"
    second.release()

    # a killed driver on this machine: its lease has time left, its process is gone
    gone = {"run_id": "run-killed", "host": socket.gethostname(), "pid": 2**22 + 17,
            "expires_at": time.time() + 600}
    (tmp_path / "runs" / "lease.json").write_text(json.dumps(gone))
    third = Lease(str(tmp_path), "run-c")
    third.acquire()
    third.release()


def test_the_lease_is_renewed_while_the_run_lives(tmp_path):
    lease = Lease(str(tmp_path), "run-a", ttl_s=0.3)
    lease.acquire()
    first = lease.holder()["expires_at"]
    time.sleep(0.45)
    assert lease.holder()["expires_at"] > first  # renewed every ttl/3
    lease.release()


def test_lease_on_s3(s3):
    options, bucket = s3
    out = f"s3://{bucket}/out"
    first = Lease(out, "run-a", options)
    first.acquire()
    with pytest.raises(LeaseHeld):
        Lease(out, "run-b", options).acquire()
    first.release()
    assert first.holder() is None


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
