"""The trainer: a few steps on tiny images, resume from its own state, export a loadable file."""

from __future__ import annotations

import json

import numpy as np
import torch

from jobs import finetune
from pipeline.models import build_model, read_checkpoint
from pipeline.training import TrainSettings, mimo_loss

from .conftest import make_image


def test_train_resume_export(tmp_path):
    for i in range(4):
        make_image(tmp_path / "hr" / f"{i}.png", (48, 40), seed=i)
    run, export = tmp_path / "run", tmp_path / "release.pt"
    common = ["--train-dir", str(tmp_path / "hr"), "--run-dir", str(run), "--batch", "2",
              "--patch", "16", "--threads", "1", "--checkpoint-every-s", "0"]
    assert finetune.main([*common, "--steps", "3"]) == 0
    first = torch.load(run / "state.pt", weights_only=True)
    assert json.loads(first["run_state"])["step"] == 3

    assert finetune.main([*common, "--steps", "5", "--export", str(export)]) == 0
    log = (run / "train.log").read_text()
    assert "resumed" in log and "at step 3" in log
    state = json.loads(torch.load(run / "state.pt", weights_only=True)["run_state"])
    assert state["step"] == 5 and len(state["history"]) == 5

    ckpt = read_checkpoint(str(export))
    card = json.loads(ckpt.meta["model_card"])
    assert card["steps_done"] == 5
    assert all(v.dtype == torch.float32 for v in ckpt.state_dict.values())
    assert export.stat().st_size < 20 * 1024 * 1024  # float16 on disk
    build_model("mimo-unet", ckpt)


def test_loss_is_zero_only_for_a_perfect_output():
    target = torch.rand(2, 3, 16, 16)
    half = torch.nn.functional.interpolate(target, scale_factor=0.5, mode="bilinear")
    quarter = torch.nn.functional.interpolate(half, scale_factor=0.5, mode="bilinear")
    assert mimo_loss([quarter, half, target], target, 0.1).item() < 1e-6
    noisy = [t + 0.05 * torch.randn_like(t) for t in (quarter, half, target)]
    assert mimo_loss(noisy, target, 0.1).item() > 0.05


def test_degradation_matches_the_pipeline_input():
    import random

    from pipeline import imaging
    from pipeline.training import degrade

    hr = np.random.default_rng(0).integers(0, 256, (32, 40, 3), dtype=np.uint8)
    clean = degrade(hr, random.Random(0), None)
    assert clean.shape == hr.shape
    np.testing.assert_array_equal(clean, imaging.upscale2x(imaging.downscale2x(hr)))
    assert TrainSettings().patch % 4 == 0
