"""A full disk, a quota or a lost permission on the output: the run stops with a clear message
and exit 5 (or, found before any work, exit 2), never a traceback; what reached the ledger stays
done, and a rerun once space is back ends with exactly one newest row per input and no image
without its row. Real file systems: a small tmpfs fills up, a read-only mount refuses writes
(root only, as in CI: chmod does not stop root)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import pytest

from jobs import restore
from pipeline.restore.ledger import latest_per_item, read_metrics

from .conftest import make_image

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a file system needs root")


@contextlib.contextmanager
def mounted(path: Path, options: str):
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _inputs(tmp_path: Path, n: int = 8) -> Path:
    for k in range(n):  # noise: each restored 96x96 PNG takes about 27 KB
        make_image(tmp_path / "in" / f"i{k}.png", size=(48, 48), seed=k)
    return tmp_path / "in"


def _run(inputs: Path, out: Path) -> int:
    return restore.main(["--manifest", str(inputs), "--output", str(out), "--checkpoint", "",
                         "--device", "cpu", "--engine", "local"])


def _accounted_for(inputs: Path, out: Path) -> None:
    """One newest row per input, ok, with its image; no image without a row."""
    latest = latest_per_item(read_metrics(str(out / "metrics")))
    assert sorted(latest["id"].to_pylist()) == sorted(p.stem for p in inputs.iterdir())
    assert set(latest["status"].to_pylist()) == {"ok"}
    written = {Path(u).name for u in latest["output_uri"].to_pylist()}
    assert all(Path(u).exists() for u in latest["output_uri"].to_pylist())
    assert {p.name for p in (out / "images").iterdir()} == written


def test_a_full_disk_stops_the_run_and_a_rerun_does_the_rest(tmp_path, capsys):
    inputs = _inputs(tmp_path)
    with mounted(tmp_path / "disk", "size=512k") as disk:
        filler = disk / "filler"
        filler.write_bytes(b"\0" * (512 * 1024 - 72 * 1024))  # room for two or three images
        out = disk / "out"
        status = _run(inputs, out)
        err = capsys.readouterr().err
        assert status == 5, err
        assert "stopped taking writes" in err and "No space left on device" in err
        assert "Traceback" not in err and "run the same command again" in err
        filler.unlink()  # space is back
        assert _run(inputs, out) == 0
        _accounted_for(inputs, out)


@pytest.mark.parametrize("folder", ["metrics", "runs"])
def test_a_read_only_ledger_or_run_folder_stops_the_run_before_any_work(tmp_path, capsys,
                                                                        folder):
    inputs = _inputs(tmp_path, 2)
    out = tmp_path / "out"
    with mounted(out / folder, "ro,size=64k"):
        assert _run(inputs, out) == 2
        err = capsys.readouterr().err
        assert f"{out / folder}" in err and "cannot be written" in err
        assert "Traceback" not in err
        assert not (out / "images").exists() or not any((out / "images").iterdir())


def test_read_only_images_stop_the_run_at_the_first_block(tmp_path, capsys):
    inputs = _inputs(tmp_path, 8)
    out = tmp_path / "out"
    with mounted(out / "images", "ro,size=64k"):
        assert _run(inputs, out) == 5
        err = capsys.readouterr().err
        assert "Read-only file system" in err and "Traceback" not in err
        # the rows of the first block are error rows of that reason; the rest were not begun
        ledger = read_metrics(str(out / "metrics"))
        assert 0 < ledger.num_rows < 8
    assert _run(inputs, out) == 0
    _accounted_for(inputs, out)
