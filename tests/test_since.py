"""Nightly runs over a growing prefix: --since lists only what is new, "last" picks up where the
previous run listed."""

from __future__ import annotations

import json
import os
import time

import pyarrow.parquet as pq

from jobs import restore
from pipeline import storage

from .conftest import make_image


def _restore(tmp_path, *extra):
    return restore.main(["--manifest", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                         "--checkpoint", "", "--device", "cpu", *extra])


def test_since_last_restores_only_what_arrived(ray_cluster, tmp_path, capsys):
    old = time.time() - 2 * 86400
    for name in ("a", "b"):
        os.utime(make_image(tmp_path / "in" / f"{name}.png", seed=len(name)), (old, old))
    assert _restore(tmp_path, "--since", "last") == 0  # no earlier run: everything
    assert "2/2 rows, 2 ok" in capsys.readouterr().out

    make_image(tmp_path / "in" / "c.png", seed=3)  # arrives after the first run listed
    assert _restore(tmp_path, "--since", "last", "--dry-run") == 0
    assert "1 rows in the input modified since" in capsys.readouterr().out
    assert _restore(tmp_path, "--since", "last") == 0
    assert "1/1 rows, 1 ok" in capsys.readouterr().out
    ids = sorted(pq.read_table(tmp_path / "out" / "metrics")["id"].to_pylist())
    assert ids == ["a", "b", "c"]

    before = sorted(p.name for p in (tmp_path / "out").rglob("*"))
    assert _restore(tmp_path, "--since", "2999-01-01T00:00:00Z") == 0  # nothing new: no work
    assert "0/0 rows" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out").rglob("*")) == before  # and no writes


def test_a_bad_since_is_refused(tmp_path, capsys):
    make_image(tmp_path / "in" / "a.png")
    assert _restore(tmp_path, "--since", "yesterday") == 2
    assert "input.since: " in capsys.readouterr().err


def test_s3_listing_by_modification_time(s3):
    options, bucket = s3
    fs, _ = storage.filesystem(f"s3://{bucket}", options)
    fs.pipe_file(f"{bucket}/p/x.png", b"1")
    assert storage.list_files(fs, f"{bucket}/p", modified_after=time.time() - 3600) == [
        f"{bucket}/p/x.png"]
    assert storage.list_files(fs, f"{bucket}/p", modified_after=time.time() + 3600) == []


def test_since_last_reads_the_newest_run_record_only(tmp_path, caplog):
    """A nightly run reads one earlier record, not every night's: an old record that cannot be
    read is not even opened (no warning about it), while reading them all warns."""
    from pipeline.restore.run_records import newest_run_record, read_run_records

    runs = tmp_path / "out" / "runs"
    runs.mkdir(parents=True)
    (runs / "run-20261101T000000-000001.json").write_text("{not json")
    (runs / "run-20261205T000000-000002.json").write_text(json.dumps(
        {"format": 2, "run_id": "20261205T000000-000002",
         "listed_at": "2026-12-05T00:00:01+00:00"}))
    (runs / "run-20261206T000000-000003.json").write_text(json.dumps(
        {"format": 2, "run_id": "20261206T000000-000003"}))  # a dry run: no listing time
    newest = newest_run_record(str(tmp_path / "out"),
                               wanted=lambda r: bool(r.get("listed_at")))
    assert newest["run_id"] == "20261205T000000-000002"
    assert "skipping run record" not in caplog.text
    assert len(read_run_records(str(tmp_path / "out"))) == 2
    assert "skipping run record" in caplog.text
