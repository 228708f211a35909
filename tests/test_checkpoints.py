"""Checkpoint formats: official legacy .pkl, training format, prefixes, fp16, safety, s3."""

from __future__ import annotations

import hashlib
import pickle
import zipfile

import pytest
import torch

from pipeline.models import build_model, read_checkpoint
from pipeline.models.mimo_unet import MIMOUNet


@pytest.fixture(scope="module")
def official(official_checkpoint):
    return official_checkpoint, torch.load(official_checkpoint, map_location="cpu",
                                           weights_only=True)["model"]


def _same_weights(model, state_dict):
    ours = model.state_dict()
    return all(torch.equal(ours[k], v.float()) for k, v in state_dict.items())


def test_official_legacy_pkl_loads_strictly_with_sha256(official):
    path, sd = official
    assert not zipfile.is_zipfile(path)  # the official releases' legacy pickle, not a zip
    ckpt = read_checkpoint(str(path))
    assert ckpt.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    model = build_model("mimo-unet", ckpt)
    assert model.checkpoint_sha256 == ckpt.sha256
    assert _same_weights(model, sd)


@pytest.mark.parametrize("wrap", [
    lambda sd: sd,
    lambda sd: {"model": sd, "optimizer": torch.optim.Adam(
        MIMOUNet().parameters()).state_dict(), "scheduler": {"last_epoch": 3}, "epoch": 3},
    lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
    lambda sd: {"params": {f"_orig_mod.{k}": v for k, v in sd.items()}},
    lambda sd: {"model": {f"module._orig_mod.{k}": v.half() for k, v in sd.items()}},
], ids=["bare", "official-training", "ddp", "compiled", "fp16-prefixed"])
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_wrappers_prefixes_and_serialisations(official, tmp_path, wrap, zip_format):
    _, sd = official
    path = tmp_path / "ckpt.pth"
    torch.save(wrap(sd), path, _use_new_zipfile_serialization=zip_format)
    model = build_model("mimo-unet", str(path))
    if any(v.dtype == torch.float16 for v in wrap(sd).get("model", {}).values()):
        ours = model.state_dict()
        assert all(torch.allclose(ours[k], v, atol=1e-3, rtol=1e-3) for k, v in sd.items())
    else:
        assert _same_weights(model, sd)


def test_missing_and_unexpected_keys_are_named(official, tmp_path):
    _, sd = official
    broken = dict(sd)
    broken.pop("FAM1.merge.main.0.weight")
    broken["extra.head.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pt"
    torch.save(broken, path)
    with pytest.raises(ValueError, match=r"missing: FAM1\.merge\.main\.0\.weight.*"
                                         r"unexpected: extra\.head\.weight"):
        build_model("mimo-unet", str(path))


def test_plus_checkpoint_does_not_fit_base_model(tmp_path):
    path = tmp_path / "plus.pt"
    torch.save({"model": MIMOUNet(num_res=20).state_dict()}, path)
    with pytest.raises(ValueError, match=r"unexpected: Encoder\.0\.layers\.8"):
        build_model("mimo-unet", str(path))
    assert build_model("mimo-unet-plus", str(path)) is not None


class _Exploit:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_pickled_code_is_refused_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    with path.open("wb") as f:
        pickle.dump({"model": _Exploit()}, f)
    with pytest.raises(ValueError, match="weights_only"):
        read_checkpoint(str(path))
    assert not (tmp_path / "PWNED").exists()


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("hello")
    with pytest.raises(ValueError, match="cannot load checkpoint"):
        read_checkpoint(str(path))
    with pytest.raises(FileNotFoundError):
        read_checkpoint(str(tmp_path / "absent.pt"))


def test_checkpoint_from_s3(official, s3):
    import s3fs

    path, sd = official
    options, bucket = s3
    fs = s3fs.S3FileSystem(**options["s3"])
    fs.put(str(path), f"{bucket}/models/official.pkl")
    ckpt = read_checkpoint(f"s3://{bucket}/models/official.pkl", options)
    assert ckpt.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert _same_weights(build_model("mimo-unet", ckpt), sd)
