"""Reading the ledger: a storage hiccup is retried, a lasting one stops the run before work
(rather than redo every row of a file that is fine), a partial file is skipped."""

from __future__ import annotations

import logging

import pytest
from fsspec.implementations.local import LocalFileSystem

from jobs import restore
from pipeline.restore.blocks import to_table
from pipeline.restore.ledger import METRICS_SCHEMA, read_metrics, write_table
from pipeline.storage import Retry

from .conftest import make_image


@pytest.fixture
def ledger(tmp_path):
    rows = [{"row": i, "id": f"i{i}", "source_uri": f"/x/i{i}.png", "status": "ok"}
            for i in range(3)]
    metrics = tmp_path / "out" / "metrics"
    write_table(to_table(rows, METRICS_SCHEMA), str(metrics / "run-a_0.parquet"))
    (metrics / "run-b_0.parquet").write_bytes(b"PAR1 torn")
    return metrics


def test_a_storage_hiccup_is_retried(ledger, monkeypatch, caplog):
    real, failures = LocalFileSystem._open, []

    def flaky(self, path, *args, **kwargs):
        if path.endswith("run-a_0.parquet") and len(failures) < 2:
            failures.append(path)
            raise ConnectionResetError("connection reset by peer")
        return real(self, path, *args, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "_open", flaky)
    waits = []
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        table = read_metrics(str(ledger), retry=Retry(sleep=waits.append))
    skipped = [r.getMessage() for r in caplog.records]
    assert table.num_rows == 3 and len(failures) == 2 and waits == [0.5, 1.0]
    assert len(skipped) == 1 and "run-b_0.parquet" in skipped[0]  # the torn file only


def test_a_lasting_storage_error_stops_before_any_work(ledger, monkeypatch, capsys):
    real = LocalFileSystem._open

    def broken(self, path, *args, **kwargs):
        if "/metrics/" in path:
            raise PermissionError(13, "Access Denied")
        return real(self, path, *args, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "_open", broken)  # forbidden: not retried
    inputs = ledger.parent.parent / "in"
    make_image(inputs / "a.png")
    status = restore.main(["--manifest", str(inputs), "--output", str(ledger.parent),
                           "--checkpoint", ""])
    assert status == 2
    assert "cannot read the output's ledger" in capsys.readouterr().err
    assert not (ledger.parent / "images").exists()


def test_a_runs_small_files_are_merged_when_it_ends(tmp_path):
    from pipeline.restore.ledger import merge_run_files

    metrics = tmp_path / "metrics"
    for k in range(5):  # a slow run: a file every few minutes, two rows each
        rows = [{"row": 2 * k + i, "id": f"i{2 * k + i}", "source_uri": "/x", "status": "ok",
                 "run_id": "r1"} for i in range(2)]
        write_table(to_table(rows, METRICS_SCHEMA), str(metrics / f"run-r1_p0_{k:05d}.parquet"))
    other = [{"row": 0, "id": "j", "source_uri": "/y", "status": "ok", "run_id": "r0"}]
    write_table(to_table(other, METRICS_SCHEMA), str(metrics / "run-r0_p0_00000.parquet"))
    before = read_metrics(str(metrics)).sort_by([("run_id", "ascending"), ("row", "ascending")])

    assert merge_run_files(str(metrics), "r1", rows_per_file=4) == 5
    names = sorted(p.name for p in metrics.iterdir())
    assert names == ["run-r0_p0_00000.parquet"] + [
        f"run-r1_merged_{k:05d}.parquet" for k in range(3)]  # 10 rows in files of 4
    after = read_metrics(str(metrics)).sort_by([("run_id", "ascending"), ("row", "ascending")])
    assert after.equals(before)
    assert merge_run_files(str(metrics), "r1", rows_per_file=4) == 0  # already few enough
