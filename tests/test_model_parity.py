"""The network against the official implementation's key/shape spec and outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.models import MODELS, build_model

SPEC_NAMES = {"mimo-unet": "MIMO-UNet", "mimo-unet-plus": "MIMO-UNetPlus"}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_state_dict_layout_matches_official_spec(name, official_dir):
    spec = json.loads((official_dir / "state_dict_spec.json").read_text())[SPEC_NAMES[name]]
    ours = [(k, list(v.shape)) for k, v in MODELS[name]().state_dict().items()]
    assert ours == [(k, list(s)) for k, s in spec]


def test_forward_matches_official_outputs(official_dir):
    golden = np.load(official_dir / "golden_io.npz")
    model = build_model("mimo-unet", official_dir / "MIMO-UNet-random-seed20210811.pkl")
    with torch.no_grad():
        outputs = model(torch.from_numpy(golden["input"]))
    for ours, key in zip(outputs, ("out_quarter", "out_half", "out_full")):
        np.testing.assert_allclose(ours.numpy(), golden[key], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_tiny_forward_shapes(name):
    model = build_model(name)
    with torch.no_grad():
        out_4, out_2, out_1 = model(torch.rand(1, 3, 16, 24))
    assert out_4.shape == (1, 3, 4, 6)
    assert out_2.shape == (1, 3, 8, 12)
    assert out_1.shape == (1, 3, 16, 24)
    assert not model.training


def test_unknown_model_lists_known_ones():
    with pytest.raises(ValueError, match="mimo-unet, mimo-unet-plus"):
        build_model("unet")
