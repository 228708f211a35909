"""Adaptation to an archive without originals keeps whichever model the held-out check favours."""

from __future__ import annotations

import json

import pytest

from jobs import adapt
from pipeline.models import read_checkpoint

from .conftest import make_image


@pytest.mark.slow
def test_adapt_keeps_the_better_model(ray_cluster, tmp_path, official_checkpoint, capsys):
    for i in range(12):
        make_image(tmp_path / "archive" / f"t{i}.jpg", (64, 56), seed=i)
    base = official_checkpoint
    out = tmp_path / "chosen.pt"
    adapted = tmp_path / "runs" / "archive-adapted.pt"
    # The same run twice: the second finds its training done (same --name and --storage), does
    # not start the trainer, and only checks again, against a bar the adapted model cannot reach.
    for min_gain, kept, expected in [(-100.0, "adapted", adapted), (100.0, "base", base)]:
        assert adapt.main(["--archive", str(tmp_path / "archive"), "--base", str(base),
                           "--output", str(out), "--steps", "2", "--batch", "2",
                           "--storage", str(tmp_path / "runs"), "--name", "archive",
                           "--min-gain-db", str(min_gain)]) == 0
        assert ("already (a rerun)" in capsys.readouterr().out) == (kept == "base")
        report = json.loads((tmp_path / "chosen.json").read_text())
        assert report["kept"] == kept
        assert report["held_out_images"] == 2 and report["train_images"] == 10
        assert report["gain_db"] == pytest.approx(
            report["adapted_psnr_y"] - report["base_psnr_y"])
        assert read_checkpoint(str(out)).sha256 == read_checkpoint(str(expected)).sha256
