"""The actor-side upscale and sharpness measures agree with the CPU ones they replace."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import device_ops, imaging, sharpness

from .conftest import PHOTOS

# The actor runs these on its GPU: there too they must agree with the CPU functions.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))]


def _photos():
    return [np.asarray(Image.open(p).convert("RGB")) for p in PHOTOS[:4]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (5, 4), (37, 53), (160, 240)])
def test_upscale_matches_pillows_bicubic_within_one_level(shape, device):
    rng = np.random.default_rng(sum(shape))
    img = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    ours = device_ops.upscale2x(torch.from_numpy(img.copy()).to(device)).cpu().numpy().astype(int)
    pillow = imaging.upscale2x(img).astype(int)
    assert ours.shape == pillow.shape
    assert np.abs(ours - pillow).max() <= 1


@pytest.mark.parametrize("device", DEVICES)
def test_upscale_on_photographs(device):
    for img in _photos():
        ours = device_ops.upscale2x(torch.from_numpy(img.copy()).to(device)).cpu().numpy()
        ours = ours.astype(int)
        diff = np.abs(ours - imaging.upscale2x(img).astype(int))
        assert diff.max() <= 1 and diff.mean() < 0.02
        # and it is not F.interpolate's bicubic (a = -0.75), which differs visibly
        theirs = torch.nn.functional.interpolate(
            torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float(), scale_factor=2,
            mode="bicubic", align_corners=False)[0].permute(1, 2, 0).round().clamp(0, 255)
        assert np.abs(theirs.numpy() - imaging.upscale2x(img)).max() > 1


@pytest.mark.parametrize("device", DEVICES)
def test_sharpness_measures_match_the_cpu_ones(device):
    rel = 1e-9 if device == "cpu" else 1e-5  # float32 on a GPU
    for img in _photos() + [np.zeros((2, 2, 3), np.uint8)]:
        [(lapvar, tenengrad)] = device_ops.sharpness([torch.from_numpy(img.copy()).to(device)])
        assert lapvar == pytest.approx(sharpness.laplacian_variance(img), rel=rel, abs=1e-12)
        assert tenengrad == pytest.approx(sharpness.tenengrad(img), rel=rel, abs=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_a_batch_of_measures_and_pixels_crosses_at_once_unchanged(device):
    images = [torch.from_numpy(img.copy()).to(device) for img in _photos()]
    images.append(torch.zeros((2, 2, 3), dtype=torch.uint8, device=device))
    measures = device_ops.sharpness(images)
    assert measures == [device_ops.sharpness([t])[0] for t in images]  # the batch changes none
    host = device_ops.to_host(images)
    assert all(np.array_equal(h, t.cpu().numpy()) for h, t in zip(host, images))
    assert device_ops.sharpness([]) == [] and device_ops.to_host([]) == []


@pytest.mark.parametrize("device", DEVICES)
def test_a_stack_gives_what_its_images_give_alone(device, monkeypatch):
    rng = np.random.default_rng(3)
    thumbs = rng.integers(0, 256, (5, 37, 53, 3), dtype=np.uint8)
    [stack] = device_ops.stacks_to_device([list(thumbs)], torch.device(device))
    assert stack.shape == (5, 37, 53, 3) and np.array_equal(stack.cpu().numpy(), thumbs)
    monkeypatch.setitem(device_ops._PART_PIXELS, device, 2 * 74 * 106)  # parts of 2, 2 and 1
    big = device_ops.upscale2x(stack)
    alone = [device_ops.upscale2x(image) for image in stack]
    assert all(torch.equal(a, b) for a, b in zip(big, alone))  # exact: integer sums in float64
    rel = 1e-12 if device == "cpu" else 1e-5
    measures = device_ops.sharpness([big])
    assert len(measures) == 5
    for got, image in zip(measures, alone):
        assert got == pytest.approx(device_ops.sharpness([image])[0], rel=rel)

