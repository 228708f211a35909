"""The network against the official implementation's key/shape spec and outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.models import MODELS, build_model

from .conftest import FIXTURES, official_spec, seeded_official_weights


@pytest.mark.parametrize("name", sorted(MODELS))
def test_state_dict_layout_matches_official_spec(name):
    ours = [(k, list(v.shape)) for k, v in MODELS[name]().state_dict().items()]
    assert ours == official_spec(name)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_matches_official_outputs(name):
    golden = np.load(FIXTURES / "golden_seeded.npz")
    model = build_model(name)
    model.load_state_dict(seeded_official_weights(name), strict=True)
    with torch.no_grad():
        outputs = model(torch.from_numpy(golden["input"]))
    prefix = name.replace("-", "_")
    for ours, scale in zip(outputs, ("quarter", "half", "full"), strict=True):
        np.testing.assert_allclose(ours.numpy(), golden[f"{prefix}_{scale}"], atol=1e-4, rtol=0)


def test_parity_is_not_just_the_skip_connection():
    """The residual the network adds is far above the tolerance, so 1e-4 tests the network."""
    golden = np.load(FIXTURES / "golden_seeded.npz")
    for prefix in ("mimo_unet", "mimo_unet_plus"):
        assert np.std(golden[f"{prefix}_full"] - golden["input"]) > 100 * 1e-4


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
