"""Failures of the device, by class: out of memory splits the batch, a broken CUDA context ends
the actor's process (Ray restarts it), a transient checkpoint read is retried."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from torch import nn

from pipeline import storage
from pipeline.inference import InferenceSettings, Restorer
from pipeline.restore import stages
from pipeline.restore.blocks import WORK_SCHEMA, to_table


class SmallMemory(nn.Module):
    """Returns its input; runs out of memory on batches above ``fits`` images."""

    def __init__(self, fits: int):
        super().__init__()
        self.fits, self.batches = fits, []
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        self.batches.append(len(x))
        if len(x) > self.fits:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [x * self.scale]


def _images(n, shape=(24, 32)):
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (*shape, 3), dtype=np.uint8) for _ in range(n)]


def test_out_of_memory_halves_the_batch_and_remembers():
    restorer = Restorer(SmallMemory(fits=2), torch.device("cpu"),
                        InferenceSettings(batch_size=8, precision="fp32", bucket=4))
    images = _images(8)
    out = restorer.restore(images)
    assert all(np.array_equal(a, b) for a, b in zip(out, images))  # every image, in order
    assert restorer.batch_size == 2
    model = restorer.model
    assert model.batches == [8, 4, 2, 2, 2, 2]
    model.batches.clear()
    restorer.restore(_images(4))
    assert model.batches == [2, 2]  # no second try at the batch that did not fit


def test_an_image_that_alone_does_not_fit_raises():
    restorer = Restorer(SmallMemory(fits=0), torch.device("cpu"),
                        InferenceSettings(batch_size=2, precision="fp32", bucket=4))
    with pytest.raises(torch.OutOfMemoryError):
        restorer.restore(_images(2))


@pytest.mark.parametrize("message, fatal", [
    ("CUDA error: an illegal memory access was encountered", True),
    ("CUDA error: device-side assert triggered", True),
    ("CUDA error: uncorrectable ECC error encountered", True),
    ("Given groups=1, weight of size [32, 3, 3, 3], expected input to have 3 channels", False),
])
def test_which_errors_break_the_device(message, fatal):
    assert stages.is_fatal_device_error(RuntimeError(message)) is fatal
    assert not stages.is_fatal_device_error(ValueError(message))


class Broken(nn.Module):
    def __init__(self, error: Exception):
        super().__init__()
        self.error, self.calls = error, 0
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        self.calls += 1
        raise self.error


def _actor(model: nn.Module) -> stages.RestoreActor:
    actor = stages.RestoreActor.__new__(stages.RestoreActor)  # without reading a checkpoint
    actor.device = torch.device("cpu")
    actor.restorer = Restorer(model, actor.device, InferenceSettings(precision="fp32"))
    actor.provenance = {"device": "cpu", "precision": "fp32"}
    actor.simulated = None
    return actor


def _batch(n: int) -> pa.Table:
    img = _images(1, (4, 4))[0]  # the decoded thumbnail; the actor upscales it
    return to_table([{"row": i, "id": f"i{i}", "source_uri": "x", "status": "ok",
                      "in_height": 4, "in_width": 4, "out_height": 8, "out_width": 8,
                      "pixels": img.tobytes()} for i in range(n)], WORK_SCHEMA)


def test_a_broken_device_ends_the_actor_instead_of_failing_every_row():
    exits = []

    def fake_exit(code):
        exits.append(code)
        raise SystemExit(code)

    model = Broken(RuntimeError("CUDA error: an illegal memory access was encountered"))
    actor = _actor(model)
    actor.exit = fake_exit
    with pytest.raises(SystemExit):
        actor.restore_block(_batch(3))
    assert exits == [70] and actor.restorer.model.calls == 1  # no row-by-row draining


def test_an_ordinary_error_fails_only_its_rows():
    actor = _actor(Broken(ValueError("this image confuses the model")))
    out = actor.restore_block(_batch(3)).to_pylist()
    assert [r["status"] for r in out] == ["error"] * 3
    assert out[0]["error"] == "restore: ValueError: this image confuses the model"


def test_checkpoint_read_is_retried_after_a_transient_error(monkeypatch):
    calls = []

    def flaky(uri, options):
        calls.append(uri)
        if len(calls) < 3:
            raise ConnectionResetError("connection reset by peer")
        return "checkpoint"

    waits = []
    retry = storage.Retry(first_s=1.0, max_s=30.0, sleep=waits.append)
    monkeypatch.setattr(stages, "read_checkpoint", flaky)
    assert stages._read_checkpoint_retrying("s3://b/c.pt", {}, retry) == "checkpoint"
    assert len(calls) == 3 and waits == [1.0, 2.0]

    def missing(uri, options):
        calls.append(uri)
        raise FileNotFoundError(uri)

    calls.clear()
    monkeypatch.setattr(stages, "read_checkpoint", missing)
    with pytest.raises(FileNotFoundError):
        stages._read_checkpoint_retrying("s3://b/c.pt", {}, retry)
    assert len(calls) == 1 and waits == [1.0, 2.0]  # a missing file is not retried
