from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import REPO_ROOT, ConfigError, load_config
from pipeline.inference import MAX_BATCH
from pipeline.restore.engine import block_rows

# train.yaml holds jobs.finetune's options and is checked in test_finetune.
RESTORE_CONFIGS = sorted(
    p for p in (REPO_ROOT / "configs").glob("*.yaml") if p.name != "train.yaml")


@pytest.mark.parametrize("path", RESTORE_CONFIGS, ids=lambda p: p.name)
def test_shipped_restore_configs_are_valid(path):
    assert load_config(path).input.manifest


def test_default_is_local_yaml_with_absolute_paths():
    config = load_config()
    assert config.input.manifest == str(REPO_ROOT / "samples" / "thumbnails")
    assert Path(config.output.uri).is_absolute()
    assert config.model.checkpoint == str(REPO_ROOT / "checkpoints" / "mimo-unet-thumb-x2.pt")


def _write(tmp_path, text):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def test_unknown_key_is_named_with_the_file(tmp_path):
    path = _write(tmp_path, "input: {manifest: x}\ninference: {batch_sise: 4}\n")
    with pytest.raises(ConfigError, match=rf"{path}: inference\.batch_sise: unknown key"):
        load_config(path)


@pytest.mark.parametrize("text, key", [
    ("input: {manifest: x}\ninference: {batch_size: 0}", "inference.batch_size"),
    ("input: {manifest: x, rows_per_block: 0}", "input.rows_per_block"),
    ("input: {manifest: x, rows_per_block: many}", "input.rows_per_block"),
    ("input: {manifest: x}\noutput: {format: gif}", "output.format"),
    ("input: {manifest: x}\ninference: {tile: 64, tile_overlap: 40}", "inference.tile_overlap"),
    ("output: {uri: y}", "input"),
])
def test_bad_values_are_named(tmp_path, text, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(_write(tmp_path, text))


def test_rows_per_block_auto_fills_gpu_batches_and_keeps_cpu_blocks_small(tmp_path):
    config = load_config(_write(tmp_path, "input: {manifest: x}"))
    assert config.input.rows_per_block == "auto"
    gpu, cpu = (block_rows("auto", device) for device in ("cuda", "cpu"))
    assert gpu >= MAX_BATCH and cpu <= 4  # a block fills the largest batch the restorer forms
    assert block_rows(load_config(_write(tmp_path, "input: {manifest: x, rows_per_block: 7}"))
                      .input.rows_per_block, "cuda") == 7


def test_not_yaml_or_missing(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "input: [unclosed"))
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "absent.yaml")


def test_overrides_win_and_none_is_ignored(tmp_path):
    path = _write(tmp_path, "input: {manifest: x}\noutput: {uri: s3://b/o}")
    config = load_config(path, {"output.uri": None, "inference.device": "cpu",
                                "model.checkpoint": "s3://b/m.pt"})
    assert config.output.uri == "s3://b/o"
    assert config.inference.device == "cpu"
    assert config.model.checkpoint == "s3://b/m.pt"


def test_storage_endpoint_from_config_or_environment(monkeypatch):
    from pipeline.config import StorageConfig

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://generic:9000")
    assert StorageConfig().fsspec_options()["s3"]["client_kwargs"]["endpoint_url"] == \
        "http://generic:9000"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3-specific:9000")
    assert StorageConfig().fsspec_options()["s3"]["client_kwargs"]["endpoint_url"] == \
        "http://s3-specific:9000"
    options = StorageConfig(endpoint_url="http://from-config:1", region="eu-west-1",
                            addressing_style="path", anonymous=True, retries=7).fsspec_options()
    s3 = options["s3"]
    assert s3["client_kwargs"] == {"endpoint_url": "http://from-config:1",
                                   "region_name": "eu-west-1"}
    assert s3["anon"] is True
    assert s3["config_kwargs"]["s3"] == {"addressing_style": "path"}
    assert s3["config_kwargs"]["retries"] == {"mode": "standard", "total_max_attempts": 7}


def test_command_line_flags_override_the_file():
    from jobs import restore

    def config(*flags):
        return restore.config_of(restore.build_parser().parse_args(list(flags)))

    plain = config()
    assert (plain.inference.compile, plain.inference.self_ensemble) == ("none", False)
    given = config("--compile", "reduce-overhead", "--self-ensemble", "--device", "cpu",
                   "--engine", "local", "--output", "/tmp/x")
    assert given.inference.compile == "reduce-overhead" and given.inference.self_ensemble
    assert (given.inference.device, given.resources.engine) == ("cpu", "local")
    assert given.output.uri == "/tmp/x"
    with pytest.raises(SystemExit):
        config("--compile", "max-autotune")  # each actor would pay the search
