"""The trainer on Ray Train: two CPU workers, resume from its own checkpoint, export."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from jobs import finetune
from pipeline import imaging
from pipeline.models import build_model, read_checkpoint
from pipeline.models.checkpoints import CheckpointError
from pipeline.training import degradations, one_gpu
from pipeline.training.trainer import export, mimo_loss

from .conftest import REPO, make_image


@pytest.mark.slow
def test_two_workers_train_resume_and_export(ray_cluster, tmp_path):
    for i in range(6):
        make_image(tmp_path / "hr" / f"{i}.png", (80, 72), seed=i)
    export = tmp_path / "release.pt"
    common = ["--train", str(tmp_path / "hr"), "--storage", str(tmp_path / "runs"),
              "--name", "tiny", "--workers", "2", "--batch", "4", "--patch", "16",
              "--checkpoint-every", "2"]  # the default shares the 2 CPUs: one per worker
    first = tmp_path / "first.pt"
    assert finetune.main([*common, "--steps", "2", "--export", str(first)]) == 0
    # Another seed: a run started afresh would train differently from step 0.
    assert finetune.main([*common, "--steps", "4", "--seed", "7", "--export", str(export)]) == 0

    card_first = json.loads(read_checkpoint(str(first)).meta["model_card"])
    ckpt = read_checkpoint(str(export))
    card = json.loads(ckpt.meta["model_card"])
    assert card["steps_done"] == 4 and card["workers"] == 2
    assert [r["step"] for r in card["validation"]] == [2, 4]
    best = max(card["validation"], key=lambda r: r["val_psnr_y"])
    assert card["released_step"] == best["step"]  # the best held-out score is released
    assert card["validation"][0] == card_first["validation"][0]  # resumed, not restarted
    assert export.stat().st_size < 20 * 1024 * 1024  # float16 on disk
    build_model("mimo-unet", ckpt)


def test_loss_is_zero_only_for_a_perfect_output():
    target = torch.rand(2, 3, 16, 16)
    half = torch.nn.functional.interpolate(target, scale_factor=0.5, mode="bilinear")
    quarter = torch.nn.functional.interpolate(half, scale_factor=0.5, mode="bilinear")
    assert mimo_loss([quarter, half, target], target, 0.1).item() < 1e-6
    noisy = [t + 0.05 * torch.randn_like(t) for t in (quarter, half, target)]
    assert mimo_loss(noisy, target, 0.1).item() > 0.05


def test_clean_degradation_is_the_pipeline_input():
    hr = np.random.default_rng(0).integers(0, 256, (32, 40, 3), dtype=np.uint8)
    clean = degradations.Degradation(kernels=("bicubic",), aliased_p=0, jpeg_p=0, noise_p=0)
    out = degradations.degrade(hr, random.Random(0), clean)
    np.testing.assert_array_equal(out, imaging.upscale2x(imaging.downscale2x(hr)))


def test_pairs_are_aligned_crops():
    hr = np.random.default_rng(1).integers(0, 256, (96, 100, 3), dtype=np.uint8)
    rng = random.Random(0)
    for _ in range(20):
        src, ref = degradations.sample_pair(hr, 16, rng, degradations.Degradation())
        assert src.shape == ref.shape == (16, 16, 3)
        # the target is a crop of the original, up to rotation and flip
        found = any((np.rot90(hr, k)[:, ::f] == ref[0, 0]).all(axis=-1).any()
                    for k in range(4) for f in (1, -1))
        assert found
        # and the input is close to it (a 2x thumbnail of the same place)
        assert np.abs(src.astype(int) - ref.astype(int)).mean() < 80


def test_config_file_gives_values_and_flags_override(tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text("train: [s3://a/hr/, s3://b/hr/]\nsteps: 300\nlr: 0.0002\ngpu: true\n"
                      "checkpoint-every: 50\n")
    args = finetune.parse_args(["--config", str(config), "--steps", "400"])
    assert args.train == ["s3://a/hr/", "s3://b/hr/"] and args.gpu is True
    assert (args.steps, args.lr, args.checkpoint_every, args.workers) == (400, 0.0002, 50, 1)
    assert finetune.parse_args(["--config", str(config), "--train", "c/"]).train == ["c/"]


def test_config_file_typos_and_missing_images_are_named(tmp_path, capsys):
    config = tmp_path / "train.yaml"
    config.write_text("train: hr/\nstep: 300\n")
    with pytest.raises(SystemExit):
        finetune.parse_args(["--config", str(config)])
    err = capsys.readouterr().err
    assert "train.yaml: step: unknown key" in err  # one config system: the restore job's words
    with pytest.raises(SystemExit):
        finetune.parse_args([])
    assert "no training images" in capsys.readouterr().err


def test_shipped_training_recipe_parses(capsys):
    recipe = ["--config", str(REPO / "configs" / "train.yaml")]
    args = finetune.parse_args(recipe + ["--train", "photos/"])
    assert args.train == ["photos/"] and args.steps > 0 and args.export
    with pytest.raises(SystemExit):  # the photographs are the user's to name
        finetune.parse_args(recipe)
    assert "no training images: give --train" in capsys.readouterr().err


def _entrypoint(name):
    import importlib

    return importlib.import_module(f"jobs.{name}")


def test_one_gpu_trainer_runs_on_cpu_and_records_its_degradation(tmp_path):
    trainer = _entrypoint("train_one_gpu")
    for i in range(4):
        make_image(tmp_path / "hr" / f"{i}.png", (80, 72), seed=i)
    out = tmp_path / "out"
    assert trainer.main(["--train", str(tmp_path / "hr"), "--out", str(out), "--seconds", "1",
                         "--batch", "2", "--patch", "16", "--loaders", "0",
                         "--degradation", "jpeg_p=0.25", "--degradation", "noise_p=0"]) == 0
    card = json.loads(read_checkpoint(str(out / "last.pt")).meta["model_card"])
    assert card["settings"]["degradation"]["jpeg_p"] == 0.25
    assert card["settings"]["degradation"]["noise_p"] == 0
    assert card["steps_done"] > 0 and card["validation"][-1]["step"] == card["steps_done"]
    assert json.loads((out / "history.json").read_text()) == card["validation"]
    with pytest.raises(SystemExit, match="jpeg_p"):
        one_gpu.degradation_from(["kernels=bicubic"])


def test_one_gpu_trainer_exports_the_moving_average_with_ema(tmp_path):
    trainer = _entrypoint("train_one_gpu")
    for i in range(4):
        make_image(tmp_path / "hr" / f"{i}.png", (80, 72), seed=i)
    init = REPO / "checkpoints" / "mimo-unet-thumb-x2.pt"
    common = ["--train", str(tmp_path / "hr"), "--init", str(init), "--seconds", "2",
              "--batch", "2", "--patch", "16", "--loaders", "0", "--lr", "1e-3",
              "--warmup-steps", "1"]
    start = read_checkpoint(str(init)).state_dict

    def moved(out):
        sd = read_checkpoint(str(out / "last.pt")).state_dict
        return max((sd[k].float() - start[k].float()).abs().max().item() for k in start)

    assert trainer.main([*common, "--out", str(tmp_path / "plain")]) == 0
    # With a decay this close to 1 the average barely leaves the starting weights.
    assert trainer.main([*common, "--ema", "0.99999", "--out", str(tmp_path / "ema")]) == 0
    assert moved(tmp_path / "ema") < moved(tmp_path / "plain") / 10
    card = json.loads(read_checkpoint(str(tmp_path / "ema" / "last.pt")).meta["model_card"])
    assert card["ema"] == 0.99999


def test_one_gpu_trainer_resumes_one_schedule_in_chunks(tmp_path):
    trainer = _entrypoint("train_one_gpu")
    for i in range(4):
        make_image(tmp_path / "hr" / f"{i}.png", (80, 72), seed=i)
    common = ["--train", str(tmp_path / "hr"), "--batch", "2", "--patch", "16", "--loaders", "0",
              "--seconds", "2", "--schedule-seconds", "100", "--warmup-steps", "1"]
    assert trainer.main([*common, "--out", str(tmp_path / "c1")]) == 0
    first = json.loads(read_checkpoint(str(tmp_path / "c1" / "last.pt")).meta["model_card"])
    assert first["schedule"]["seconds"] == 100 and 2 <= first["schedule"]["done_s"] < 10
    assert first["schedule"]["steps"] == first["steps_done"] > 0
    assert trainer.main([*common, "--resume", str(tmp_path / "c1" / "last.pt"),
                         "--out", str(tmp_path / "c2")]) == 0
    second = json.loads(read_checkpoint(str(tmp_path / "c2" / "last.pt")).meta["model_card"])
    assert second["schedule"]["done_s"] >= first["schedule"]["done_s"] + 2
    assert second["schedule"]["steps"] == first["schedule"]["steps"] + second["steps_done"]
    # The learning rate carries on down the one cosine: below where the first chunk started.
    assert second["validation"][1]["lr"] < first["validation"][1]["lr"]
    with pytest.raises(SystemExit, match="--schedule-seconds 100"):
        trainer.main([*common[:-3], "50", "--resume", str(tmp_path / "c1" / "last.pt"),
                      "--out", str(tmp_path / "c3")])


def test_average_of_checkpoints_is_their_mean_and_names_its_members(tmp_path):
    soup = _entrypoint("average_checkpoints")
    paths = []
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        paths.append(str(tmp_path / f"{seed}.pt"))
        export(build_model("mimo-unet"), paths[-1], {"seed": seed})
    assert soup.main([*paths, "--out", str(tmp_path / "mean.pt")]) == 0
    members = [read_checkpoint(p) for p in paths]
    mean = read_checkpoint(str(tmp_path / "mean.pt"))
    for key, value in mean.state_dict.items():
        expected = sum(m.state_dict[key] for m in members) / 3
        torch.testing.assert_close(value, expected.half().float(), rtol=0, atol=1e-3)
    card = json.loads(mean.meta["model_card"])
    assert [m["sha256"] for m in card["average_of"]] == [m.sha256 for m in members]
    assert [m["model_card"]["seed"] for m in card["average_of"]] == [1, 2, 3]
    build_model("mimo-unet", mean)  # loads strictly

    export(build_model("mimo-unet-plus"), str(tmp_path / "plus.pt"), {})
    with pytest.raises(CheckpointError, match="not the same network"):
        soup.main([paths[0], str(tmp_path / "plus.pt"), "--out", str(tmp_path / "bad.pt")])
    assert not (tmp_path / "bad.pt").exists()
