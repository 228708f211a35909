"""The shipped default checkpoint: loadable, documented, and better than bicubic on photographs
it never saw in training (the demo samples, made from the images jobs.finetune holds out)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import imaging, sharpness
from pipeline.config import load_config
from pipeline.inference import InferenceSettings, Restorer
from pipeline.models import build_model, read_checkpoint

from .conftest import PHOTOS, REPO


@pytest.fixture(scope="module")
def shipped():
    path = load_config().model.checkpoint
    return read_checkpoint(path)


def test_model_card_travels_with_the_weights(shipped):
    card = json.loads(shipped.meta["model_card"])
    assert card["steps_done"] > 0 and card["train_images"] > 0
    assert (REPO / "checkpoints" / "MODEL_CARD.md").read_text().count(shipped.sha256[:12]) >= 1


def test_beats_bicubic_on_held_out_photographs(shipped):
    lossless = [p for p in PHOTOS if p.suffix == ".png"]  # JPEG references would carry artefacts
    assert len(lossless) >= 2
    restorer = Restorer(build_model("mimo-unet", shipped), torch.device("cpu"),
                        InferenceSettings())
    gains = []
    for path in lossless:
        hr = np.asarray(Image.open(path).convert("RGB"))
        h, w = hr.shape[:2]
        hr = hr[h // 2 - 64:h // 2 + 64, w // 2 - 64:w // 2 + 64]  # a 128 x 128 centre crop
        bicubic = imaging.upscale2x(imaging.downscale2x(hr))
        restored = restorer.restore([bicubic])[0]
        gains.append(sharpness.psnr_y(restored, hr) - sharpness.psnr_y(bicubic, hr))
    assert np.mean(gains) > 1.0, gains
