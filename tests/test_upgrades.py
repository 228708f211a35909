"""Every release reads what every earlier release wrote: outputs restored by earlier releases
(tests/fixtures/releases) are rerun, dry-run and reported on by this one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from jobs import report, restore
from pipeline.restore import shards
from pipeline.restore.blocks import to_table
from pipeline.restore.ledger import (
    LEDGER_FORMAT,
    LEDGER_FORMAT_KEY,
    METRICS_SCHEMA,
    latest_per_item,
    read_metrics,
    write_table,
)

FIXTURES = Path(__file__).parent / "fixtures" / "releases"
RELEASES = ["2026-11-25", "2026-11-26", "2026-11-27", "2026-12-04", "2026-12-05"]
FORMATS = {"2026-12-04": b"3", "2026-12-05": b"4"}  # the ledger-format key each release wrote
ARCHIVED_AT = "/tmp/archive/in"  # where the fixtures' sources were
ARCHIVED_OUT = "/tmp/archive/out"  # and their outputs: {ARCHIVED_OUT}-{release}


def _archive(tmp_path: Path, release: str) -> tuple[Path, Path]:
    """The release's output and its input, laid under ``tmp_path``."""
    inputs, out = tmp_path / "in", tmp_path / "out"
    shutil.copytree(FIXTURES / "in", inputs)
    shutil.copytree(FIXTURES / release, out)
    for path in (out / "metrics").glob("*.parquet"):
        table = pq.read_table(path)
        # Sources and outputs moved to where they lie now; the release's own columns and
        # metadata otherwise, as written.
        for column, old, new in (("source_uri", ARCHIVED_AT, str(inputs)),
                                 ("output_uri", f"{ARCHIVED_OUT}-{release}", str(out))):
            moved = pa.array([v if v is None else v.replace(old, new)
                              for v in table[column].to_pylist()])
            table = table.set_column(table.schema.get_field_index(column),
                                     table.schema.field(column), moved)
        pq.write_table(table, path)
    return inputs, out


def _args(inputs: Path, out: Path, *more: str) -> list[str]:
    return ["--manifest", str(inputs), "--output", str(out), "--checkpoint", "",
            "--device", "cpu", "--engine", "local", *more]


@pytest.mark.parametrize("release", RELEASES)
def test_an_earlier_releases_output_is_dry_run_rerun_and_reported(tmp_path, release, capsys):
    inputs, out = _archive(tmp_path, release)
    schema = pq.read_schema(next((out / "metrics").glob("*.parquet")))
    # the old form, as written
    assert (schema.metadata or {}).get(LEDGER_FORMAT_KEY) == FORMATS.get(release)
    assert "output_member" not in schema.names and "output_offset" not in schema.names
    if release < "2026-12-05":
        assert "alpha" not in schema.names and "bit_depth" not in schema.names
    if release < "2026-11-27":
        assert "settings_sha256" not in schema.names
    images = {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()}

    assert restore.main(_args(inputs, out, "--dry-run")) == 0
    assert "4 rows in the input, 3 already done, 1 to do" in capsys.readouterr().out

    assert restore.main(_args(inputs, out)) == 0  # the bad file's row is redone, still bad
    captured = capsys.readouterr()
    assert "1/1 rows, 0 ok, 1 error; 3 skipped" in captured.out, captured
    latest = latest_per_item(read_metrics(str(out / "metrics")))
    assert latest.num_rows == 4
    by_id = dict(zip(latest["id"].to_pylist(), latest["status"].to_pylist()))
    assert by_id == {"a": "ok", "b": "ok", "c": "ok", "bad": "error"}
    assert {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()} == images

    page = tmp_path / "report.html"
    assert report.main([str(out), "--html", str(page)]) == 0
    text = capsys.readouterr().out
    assert "ok: 3" in text and "error: 1" in text and page.stat().st_size > 1000
    # What earlier releases did not record reads as null, whose meaning is written down.
    assert set(latest.column("output_member").to_pylist()) == {None}  # files, named by URI
    for row in latest.filter(pc.equal(latest["status"], "ok")).to_pylist():
        moved = out / "images" / Path(row["output_uri"]).name  # the fixture's, where it lies
        assert shards.read_output({**row, "output_uri": str(moved)}) == moved.read_bytes()
    if release < "2026-12-05":
        assert set(latest.column("alpha").to_pylist()) == {None}
        assert "not recorded" in page.read_text()


def test_the_shards_of_2026_12_06_are_dry_run_rerun_and_reported(tmp_path, capsys):
    """The first release with shard layouts (52a8fd0) wrote a webdataset output: this one
    skips what its shard holds, reads its members, and takes it for no orphan."""
    inputs, out = _archive(tmp_path, "2026-12-06")
    schema = pq.read_schema(next((out / "metrics").glob("*.parquet")))
    assert schema.metadata[LEDGER_FORMAT_KEY] == b"5"
    [shard] = (out / "shards").iterdir()
    written = shard.read_bytes()

    assert restore.main(_args(inputs, out, "--dry-run", "--layout", "webdataset")) == 0
    assert "4 rows in the input, 3 already done, 1 to do" in capsys.readouterr().out
    assert restore.main(_args(inputs, out, "--layout", "webdataset")) == 0
    assert "1/1 rows, 0 ok, 1 error; 3 skipped" in capsys.readouterr().out
    assert list((out / "shards").iterdir()) == [shard] and shard.read_bytes() == written

    latest = latest_per_item(read_metrics(str(out / "metrics")))
    ok = latest.filter(pc.equal(latest["status"], "ok")).to_pylist()
    assert sorted(r["id"] for r in ok) == ["a", "b", "c"]
    for row in ok:
        assert row["output_uri"] == str(shard) and row["output_member"] == f"{row['id']}.png"
        assert shards.read_output(row)[:8] == b"\x89PNG\r\n\x1a\n"
    page = tmp_path / "report.html"
    assert report.main([str(out), "--html", str(page)]) == 0
    text = capsys.readouterr().out
    assert "ok: 3" in text and "orphaned" not in text and page.stat().st_size > 1000


def test_since_last_over_the_run_records_of_2026_11_27(tmp_path, capsys):
    inputs, out = _archive(tmp_path, "2026-11-27")
    assert restore.main(_args(inputs, out, "--dry-run", "--since", "last")) == 0
    assert "modified since" in capsys.readouterr().out


def test_an_unrecorded_setting_counts_as_todays_and_force_redoes_it(tmp_path, capsys):
    inputs, out = _archive(tmp_path, "2026-11-26")
    assert restore.main(_args(inputs, out, "--dry-run", "--force")) == 0
    assert "0 already done, 4 to do" in capsys.readouterr().out


def test_a_ledger_of_a_newer_format_stops_the_run_with_a_clear_error(tmp_path, capsys):
    inputs, out = _archive(tmp_path, "2026-11-27")
    path = out / "metrics" / "run-29990101T000000-future_p0_00000.parquet"
    write_table(to_table([{"row": 0, "id": "a", "source_uri": "x", "status": "ok"}],
                         METRICS_SCHEMA), str(path))
    table = pq.read_table(path)
    pq.write_table(table.replace_schema_metadata(
        {LEDGER_FORMAT_KEY: str(LEDGER_FORMAT + 1).encode()}), path)
    assert restore.main(_args(inputs, out, "--dry-run")) == 2
    err = capsys.readouterr().err
    assert "newer release" in err and path.name in err and "Traceback" not in err
    assert report.main([str(out)]) == 2
    assert "newer release" in capsys.readouterr().err


def test_this_release_names_its_ledger_format(tmp_path):
    path = tmp_path / "m.parquet"
    write_table(to_table([{"row": 0, "id": "a", "source_uri": "x", "status": "ok"}],
                         METRICS_SCHEMA), str(path))
    assert pq.read_schema(path).metadata[LEDGER_FORMAT_KEY] == str(LEDGER_FORMAT).encode()


@pytest.mark.parametrize("record", ['{"run_id": ', '[1, 2]', '{"no": "run id"}',
                                    '{"run_id": "r", "images_per_s": "fast"}',
                                    '{"run_id": "r", "listed_at": "yesterday"}'])
def test_a_malformed_run_record_is_skipped_with_a_warning(tmp_path, capsys, record):
    inputs, out = _archive(tmp_path, "2026-11-27")
    (out / "runs" / "run-29990101T000000-bad.json").write_text(record)
    page = tmp_path / "report.html"
    assert report.main([str(out), "--html", str(page)]) == 0
    captured = capsys.readouterr()
    assert "skipping run record" in captured.err and "run-29990101T000000-bad.json" in captured.err
    assert page.exists()
    # --since last takes the newest record that is one
    assert restore.main(_args(inputs, out, "--dry-run", "--since", "last")) == 0
    assert "modified since" in capsys.readouterr().out


def test_run_records_carry_their_format(tmp_path, capsys):
    inputs, out = _archive(tmp_path, "2026-11-27")
    (inputs / "d.png").write_bytes((inputs / "a.png").read_bytes())
    assert restore.main(_args(inputs, out)) == 0
    newest = sorted((out / "runs").glob("run-*.json"))[-1]
    assert json.loads(newest.read_text())["format"] == 2
