"""The restorer's geometry: padding, batching by shape and tiling give same-size outputs."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from jobs import restore
from pipeline import device_ops, imaging, sharpness
from pipeline.config import ConfigError
from pipeline.inference import InferenceSettings, Restorer, resolve_device, resolve_precision
from pipeline.models import build_model
from pipeline.training.trainer import start_as_identity

from .conftest import PHOTOS, REPO


@pytest.fixture(scope="module")
def identity_model():
    model = build_model("mimo-unet")
    start_as_identity(model)  # restores every image to itself: geometry errors show exactly
    return model


@pytest.fixture(scope="module")
def random_model():
    torch.manual_seed(0)
    return build_model("mimo-unet")


def _images(shapes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]


@pytest.mark.parametrize("shape", [(2, 2), (6, 6), (17, 23), (32, 48), (5, 64)])
def test_any_size_comes_back_the_same_size(identity_model, shape):
    restorer = Restorer(identity_model, torch.device("cpu"), InferenceSettings())
    (img,) = _images([shape])
    (out,) = restorer.restore([img])
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, img)


def test_batching_by_shape_matches_one_at_a_time(random_model):
    imgs = _images([(16, 24), (20, 20), (16, 24), (16, 24), (20, 20)])
    batched = Restorer(random_model, torch.device("cpu"), InferenceSettings(batch_size=2))
    single = Restorer(random_model, torch.device("cpu"), InferenceSettings(batch_size=1))
    for a, b in zip(batched.restore(imgs), single.restore(imgs)):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # float summation order


def test_mixed_sizes_share_a_forward_per_bucket(random_model):
    restorer = Restorer(random_model, torch.device("cpu"),
                        InferenceSettings(batch_size=8, bucket=64))
    calls = []
    restorer.model.register_forward_hook(lambda m, args, out: calls.append(args[0].shape))
    imgs = _images([(17, 23), (20, 20), (30, 40), (64, 64), (65, 10), (1, 1)])
    outs = restorer.restore(imgs)
    assert [o.shape for o in outs] == [i.shape for i in imgs]
    assert sorted(tuple(s) for s in calls) == [(1, 3, 128, 64), (5, 3, 64, 64)]
    alone = Restorer(random_model, torch.device("cpu"),
                     InferenceSettings(batch_size=1, bucket=64))
    for a, b in zip(outs, alone.restore(imgs)):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # float summation order


def test_auto_runs_each_image_alone_and_unpadded_on_cpu(random_model):
    # On CPU batching slows the model down and padding only adds pixels (docs/performance.md).
    restorer = Restorer(random_model, torch.device("cpu"), InferenceSettings())
    assert (restorer.batch_for(64, 64), restorer.bucket) == (1, 4)
    calls = []
    restorer.model.register_forward_hook(lambda m, args, out: calls.append(args[0].shape))
    restorer.restore(_images([(17, 23), (20, 20), (20, 20)]))
    assert sorted(tuple(s) for s in calls) == [(1, 3, 20, 20), (1, 3, 20, 20), (1, 3, 20, 24)]


@pytest.mark.parametrize("shape, target", [((1, 1), (64, 64)), ((2, 3), (9, 4)),
                                           ((17, 23), (64, 64)), ((5, 64), (8, 64))])
def test_padding_mirrors_as_numpy_symmetric(shape, target):
    from pipeline.inference import _pad

    (img,) = _images([shape])
    ours = _pad(torch.from_numpy(img), *target).numpy()
    theirs = np.pad(img, ((0, target[0] - shape[0]), (0, target[1] - shape[1]), (0, 0)),
                    mode="symmetric")
    assert np.array_equal(ours, theirs)


def test_stacks_on_the_device_give_what_host_images_give(random_model):
    restorer = Restorer(random_model, torch.device("cpu"), InferenceSettings(bucket=64))
    imgs = _images([(17, 23), (20, 20), (20, 20), (30, 40)])
    # two stacks of one bucket (24 x 64 and 20 x 20 both pad to 64 x 64) and one alone
    stacks = [torch.from_numpy(np.stack(imgs[1:3])), torch.from_numpy(imgs[0][None]),
              torch.from_numpy(imgs[3][None])]
    on_device = restorer.restore_stacks(stacks)
    assert [tuple(t.shape) for t in on_device] == [tuple(s.shape) for s in stacks]
    expected = restorer.restore(imgs)
    for out, indices in zip(on_device, ([1, 2], [0], [3])):
        for image, i in zip(out, indices):
            assert np.array_equal(image.numpy(), expected[i])
    assert restorer.restore([]) == [] and restorer.restore_stacks([]) == []


def test_a_gpu_batch_is_what_fits_in_the_budget():
    from pipeline.inference import MAX_BATCH, batch_that_fits

    assert batch_that_fits(1e9, 1000.0, 100, 100) == 100
    assert batch_that_fits(1e12, 1000.0, 100, 100) == MAX_BATCH
    assert batch_that_fits(1e6, 1000.0, 100, 100) == 1  # even when one does not fit: OOM halves


def test_buckets_and_tiles_keep_quality_on_photographs():
    """Padding to a bucket changes only how the network sees the right and bottom borders
    (mirrored content instead of its zero padding); tiles, with their overlap, show no seams."""
    model = build_model("mimo-unet", str(REPO / "checkpoints" / "mimo-unet-thumb-x2.pt"))
    cpu = torch.device("cpu")
    whole = Restorer(model, cpu, InferenceSettings(bucket=4))
    bucketed = Restorer(model, cpu, InferenceSettings(bucket=64))
    tiled = Restorer(model, cpu, InferenceSettings(bucket=4, tile=200, tile_overlap=32))
    bucket_gaps, tile_gaps = [], []
    for path in PHOTOS:
        hr = np.asarray(Image.open(path).convert("RGB"))
        hr = hr[: hr.shape[0] // 2 * 2, : hr.shape[1] // 2 * 2]
        src = imaging.upscale2x(imaging.downscale2x(hr))
        reference = sharpness.psnr_y(whole.restore([src])[0], hr, rounded=False)
        bucket_gaps.append(sharpness.psnr_y(bucketed.restore([src])[0], hr, rounded=False)
                           - reference)
        if max(src.shape[:2]) > 200:
            tile_gaps.append(sharpness.psnr_y(tiled.restore([src])[0], hr, rounded=False)
                             - reference)
    assert abs(np.mean(bucket_gaps)) < 0.01 and max(map(abs, bucket_gaps)) < 0.05, bucket_gaps
    assert tile_gaps and max(map(abs, tile_gaps)) < 0.01, tile_gaps


def test_tiles_cover_the_image_exactly(identity_model):
    restorer = Restorer(identity_model, torch.device("cpu"),
                        InferenceSettings(tile=64, tile_overlap=8))
    (img,) = _images([(150, 97)])
    np.testing.assert_array_equal(restorer.restore([img])[0], img)


def test_tiles_agree_with_whole_image_inside(random_model):
    (img,) = _images([(96, 96)])
    whole = Restorer(random_model, torch.device("cpu"), InferenceSettings(tile=512))
    tiled = Restorer(random_model, torch.device("cpu"), InferenceSettings(tile=80, tile_overlap=24))
    diff = np.abs(whole.restore([img])[0].astype(int) - tiled.restore([img])[0].astype(int))
    assert np.median(diff) <= 1


def test_self_ensemble_turns_with_the_image(random_model, identity_model):
    """The mean over all 8 flips/rotations commutes with flipping; one pass does not."""
    (img,) = _images([(24, 32)])
    mirrored = np.ascontiguousarray(img[:, ::-1])
    plain = Restorer(random_model, torch.device("cpu"), InferenceSettings())
    ensemble = Restorer(random_model, torch.device("cpu"), InferenceSettings(self_ensemble=True))
    a, b = ensemble.restore([img, mirrored])
    assert np.abs(a[:, ::-1].astype(int) - b.astype(int)).max() <= 1  # float summation order
    p, q = plain.restore([img, mirrored])
    assert np.abs(p[:, ::-1].astype(int) - q.astype(int)).max() > 1
    assert np.abs(a.astype(int) - p.astype(int)).max() > 1
    (odd,) = _images([(18, 22)])
    same = Restorer(identity_model, torch.device("cpu"), InferenceSettings(self_ensemble=True))
    np.testing.assert_array_equal(same.restore([odd])[0], odd)


def test_bf16_weights_keep_quality_and_leave_the_callers_model_alone(random_model):
    (img,) = _images([(48, 64)])
    fp32 = Restorer(random_model, torch.device("cpu"), InferenceSettings(precision="fp32"))
    bf16 = Restorer(random_model, torch.device("cpu"), InferenceSettings(precision="bf16"))
    assert bf16.precision == "bf16" and next(bf16.model.parameters()).dtype == torch.bfloat16
    assert next(random_model.parameters()).dtype == torch.float32
    diff = np.abs(fp32.restore([img])[0].astype(int) - bf16.restore([img])[0].astype(int))
    assert diff.mean() < 1.5 and diff.max() > 0  # close, and really computed in another dtype
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert resolve_precision("auto", torch.device("cpu")) == ("bf16" if native else "fp32")
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"
    assert resolve_precision("fp32", torch.device("cuda")) == "fp32"


def test_cuda_without_cuda_says_so():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="no CUDA device"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"


def test_a_job_asking_for_a_missing_gpu_says_so_before_any_work(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "out"
    assert restore.main(["--device", "cuda", "--engine", "local", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "error: device 'cuda' was requested but torch sees no CUDA device" in err
    assert "Traceback" not in err
    assert not (out / "images").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_are_sized_from_free_memory(random_model):
    restorer = Restorer(random_model, torch.device("cuda"), InferenceSettings())
    assert restorer.bucket == 64
    small, large = restorer.batch_for(64, 64), restorer.batch_for(512, 512)
    assert small >= large >= 1 and small > 1
    imgs = _images([(17, 23), (20, 20), (30, 40), (64, 64)])
    assert [o.shape for o in restorer.restore(imgs)] == [i.shape for i in imgs]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_cuda_matches_cpu(random_model, precision):
    (img,) = _images([(64, 64)])
    cpu = Restorer(random_model, torch.device("cpu"), InferenceSettings()).restore([img])[0]
    model = build_model("mimo-unet")
    model.load_state_dict(random_model.state_dict())
    gpu = Restorer(model, torch.device("cuda"),
                   InferenceSettings(precision=precision)).restore([img])[0]
    assert np.abs(cpu.astype(int) - gpu.astype(int)).mean() < (0.5 if precision == "fp32" else 3)


class _Tiny(torch.nn.Module):
    """A model that compiles in seconds: what matters is the switch, not MIMO-UNet."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return [x + 0.1 * self.conv(x)]


@pytest.mark.skipif(not shutil.which("g++"), reason="torch.compile on CPU needs a C++ compiler")
def test_the_compile_switch_compiles_and_changes_nothing():
    torch.manual_seed(0)
    model = _Tiny()
    (img,) = _images([(20, 24)])
    eager = Restorer(model, torch.device("cpu"), InferenceSettings(precision="fp32"))
    compiled = Restorer(model, torch.device("cpu"),
                        InferenceSettings(precision="fp32", compile="default"))
    assert not hasattr(eager.model, "_orig_mod") and hasattr(compiled.model, "_orig_mod")
    a, b = eager.restore([img])[0], compiled.restore([img])[0]
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_device_work_for_a_block_does_not_grow_with_its_images(random_model, monkeypatch):
    """One set of operations per shape, not per image: on a GPU each operation is a kernel
    launch, and hundreds of launches per image would keep the GPU waiting on Python."""
    from torch.utils._python_dispatch import TorchDispatchMode

    monkeypatch.setitem(device_ops._PART_PIXELS, "cpu", device_ops._PART_PIXELS["cuda"])

    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.ops += 1
            return func(*args, **(kwargs or {}))

    restorer = Restorer(random_model, torch.device("cpu"),
                        InferenceSettings(batch_size=64, bucket=16))
    rng = np.random.default_rng(4)

    def ops_for(shapes):
        thumbs = [rng.integers(0, 256, (*s, 3), dtype=np.uint8) for s in shapes]
        Count.ops = 0
        with Count():
            _, stacks = device_ops.to_device_by_shape(thumbs, torch.device("cpu"))
            upscaled = [device_ops.upscale2x(s) for s in stacks]
            restored = restorer.restore_stacks(upscaled)
            device_ops.sharpness(upscaled + restored)
            device_ops.to_host(restored)
        return Count.ops

    ops_for([(12, 20)] * 4 + [(11, 19)])  # fills the caches (the upscale's matrices)
    one_shape = ops_for([(12, 20)] * 4)
    assert one_shape > 50  # the dispatch mode does see the work
    assert ops_for([(12, 20)] * 32) == one_shape
    # shapes that share a bucket share the model's forwards, but not the rest
    assert one_shape < ops_for([(12, 20)] * 16 + [(11, 19)] * 16) < 2 * one_shape
