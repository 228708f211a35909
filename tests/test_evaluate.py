"""jobs.evaluate end to end: both protocols through the restore job, scored against references."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from jobs import evaluate
from pipeline import imaging, sharpness

from .conftest import PHOTOS


@pytest.mark.slow
def test_scores_both_protocols_for_bicubic_and_the_model(ray_cluster, tmp_path, capsys):
    held_out = [p for p in PHOTOS if p.suffix == ".png"]  # never trained on, lossless
    root = tmp_path / "bench" / "Tiny"
    (root / "HR").mkdir(parents=True)
    (root / "LR_bicubic_x2").mkdir()
    references = {}
    for i, path in enumerate(held_out[:2]):  # never trained on
        hr = np.asarray(Image.open(path).convert("RGB"))
        h, w = hr.shape[:2]
        hr = hr[h // 2 - 48:h // 2 + 48, w // 2 - 64:w // 2 + 64]
        references[f"im{i}"] = hr
        Image.fromarray(hr).save(root / "HR" / f"im{i}.png")
        Image.fromarray(imaging.downscale2x(hr)).save(root / "LR_bicubic_x2" / f"im{i}.png")

    out = tmp_path / "scores.json"
    assert evaluate.main(["--benchmark-dir", str(tmp_path / "bench"), "--sets", "Tiny",
                          "--json", str(out), "--compare", str(tmp_path / "sheets")]) == 0
    table = capsys.readouterr().out
    assert "| Tiny | standard | 2 |" in table and "| Tiny | thumbnail (JPEG q85) | 2 |" in table

    scores = {(s["protocol"], s["method"]): s for s in json.loads(out.read_text())["scores"]}
    assert len(scores) == 4 and all(s["images"] == 2 for s in scores.values())
    expected = np.mean([sharpness.psnr_y(imaging.upscale2x(imaging.downscale2x(hr)), hr)
                        for hr in references.values()])
    assert scores["standard", "bicubic"]["psnr_y"] == pytest.approx(expected)
    for protocol in ("standard", "thumbnail (JPEG q85)"):
        model, bicubic = scores[protocol, "model"], scores[protocol, "bicubic"]
        assert model["psnr_y"] > bicubic["psnr_y"] + 0.5
        assert model["colour_shift"] < 0.5  # 8-bit levels
        assert model["overshoot"] >= 0.0
    sheets = sorted(p.name for p in (tmp_path / "sheets").iterdir())
    assert sheets == ["Tiny_standard_im0.png", "Tiny_standard_im1.png",
                      "Tiny_thumbnail_im0.png", "Tiny_thumbnail_im1.png"]
    sheet = np.asarray(Image.open(tmp_path / "sheets" / "Tiny_standard_im0.png"))
    assert sheet.shape == (96, 3 * 128 + 2 * 4, 3)
    np.testing.assert_array_equal(sheet[:, -128:], references["im0"])  # the reference, last
