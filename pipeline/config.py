"""Typed, validated job configuration: YAML -> objects, with command-line overrides."""

from __future__ import annotations

import os
import re
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipeline.storage import REQUESTS_IN_FLIGHT

REPO_ROOT = Path(__file__).resolve().parents[1]
M = TypeVar("M", bound=BaseModel)
DEFAULT_CONFIG = REPO_ROOT / "configs" / "local.yaml"


class _Section(BaseModel):
    # Unknown keys are typos until proven otherwise: reject them by name.
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputConfig(_Section):
    # A manifest (.csv, .jsonl/.json, .parquet with a `uri` column), an S3 Inventory report
    # (its manifest.json), a prefix to list, WebDataset tar shards (one .tar, a prefix of them,
    # or a brace range: shards/{000000..000099}.tar), or Parquet files whose rows hold images.
    manifest: str
    # For Parquet files of images: the column of images (binary, or a struct with `bytes` as
    # Hugging Face datasets write; default `image`, else the first such column), and the id's
    # (default the first of __key__, key, id; else <file name>/<row>). Other columns are
    # carried to the output.
    image_column: str | None = None
    id_column: str | None = None
    # Rows per block, the unit of work an actor gets: small enough to spread over the pool,
    # large enough to fill the model's batches. auto: 4 where the model runs on a CPU (a few
    # seconds of work), 256 on a GPU (several full batches of every bucket shape).
    rows_per_block: Literal["auto"] | Annotated[int, Field(ge=1)] = "auto"
    # A prefix lists only images modified after this: an ISO 8601 time (UTC unless it says
    # otherwise), or "last" for the start of the newest earlier run into the output. For
    # nightly runs over a growing prefix; manifests are read whole (the skip handles them).
    since: str | None = None

    @field_validator("since")
    @classmethod
    def _since_is_a_time(cls, v: str | None) -> str | None:
        if v is not None and v != "last":
            try:
                datetime.fromisoformat(v)
            except ValueError:
                raise ValueError("must be an ISO 8601 time (2026-11-27T02:00:00Z) or 'last'") \
                    from None
        return v


class OutputConfig(_Section):
    uri: str = "out"
    format: Literal["png", "jpeg", "webp"] = "png"
    # JPEG/WebP quality; PNG is lossless and ignores it.
    quality: int = Field(95, ge=1, le=100)
    # Deflate level of PNG output (0 stored, 9 smallest): 1-3 by ISA-L, 4-9 by zlib. 1: several
    # times faster than Pillow's encoder for a few percent more bytes, since encoding was most
    # of the CPU per image (figures: docs/performance.md, "Figures behind the code").
    png_level: int = Field(1, ge=0, le=9)
    # What the input's EXIF, XMP and IPTC become in the output: keep them (made true for the
    # copy: upright, its size, no stale preview), strip-location (no GPS or place names: for
    # thumbnails served in public), or strip. The colour profile is kept in every case, and
    # every output says in XMP how it was made (tool, model, checkpoint, run).
    metadata: Literal["keep", "strip-location", "strip"] = "keep"
    # The colour a transparent input is flattened over when the format has no alpha (JPEG).
    background: str = "#ffffff"
    # How the restored images are stored: files (images/<id>.<ext>, one object each), or
    # shards under shards/: webdataset (tar, each image with a JSON of its metrics) or parquet
    # (rows holding the image bytes). Shards cost an object-store request per shard, not per
    # image: a PUT is dearer than the compute of a thumbnail (docs/performance.md).
    layout: Literal["files", "webdataset", "parquet"] = "files"
    # Images per shard: 512 PNGs of 480x320 photographs (about 0.23 MB each at png_level 1)
    # make shards of about 120 MB, within WebDataset's advice of 100 MB to 1 GB.
    images_per_shard: int = Field(512, ge=1)
    # Hex characters of a hash that begin each image's key (images/<ab>/<id>.png) or shard's
    # (shards/<ab>/...): 0 for none. A store that partitions by prefix (S3: about 3,500 PUTs a
    # second each) then spreads the writes over 16**key_spread prefixes.
    key_spread: int = Field(0, ge=0, le=4)
    # Write {uri}/report.html at the end of a run (`python -m jobs.report --html` does it on
    # demand). It reads the whole ledger, so big outputs may prefer to write it on demand.
    report: bool = False


    @field_validator("background")
    @classmethod
    def _background_is_a_colour(cls, v: str) -> str:
        if not re.fullmatch(r"#[0-9a-fA-F]{6}", v):
            raise ValueError("must be a colour as #rrggbb, like #ffffff")
        return v.lower()

    @property
    def background_rgb(self) -> tuple[int, int, int]:
        return tuple(int(self.background[i:i + 2], 16) for i in (1, 3, 5))  # type: ignore


class ModelConfig(_Section):
    name: Literal["mimo-unet", "mimo-unet-plus"] = "mimo-unet"
    # A path (relative to the repository root) or any fsspec URI; null means random weights,
    # which only tests should want.
    checkpoint: str | None = "checkpoints/mimo-unet-thumb-x2.pt"


class InferenceConfig(_Section):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # The weights' dtype. auto: bf16 on CUDA and on CPUs with native bf16 (AVX512-BF16, AMX),
    # fp32 elsewhere; bf16 costs about 0.005 dB on Set5 and runs 2-3x faster where native.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # Images per forward. auto: 1 on CPU, where batching only slows the model down; on a GPU,
    # as many of a shape as fit in 70% of the memory free when the actor starts.
    batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    # Images are padded up to a multiple of this per side, so mixed sizes batch together. auto:
    # 64 on a GPU; 4 on CPU, where each image runs alone and padding is only more pixels.
    bucket: Annotated[int, Field(ge=4, multiple_of=4)] | Literal["auto"] = "auto"
    # torch.compile the model in each actor: "default", or "reduce-overhead" (CUDA graphs, one
    # per shape). Each new shape costs a compile (tens of seconds), so it pays on long runs
    # only (docs/performance.md).
    compile: Literal["none", "default", "reduce-overhead"] = "none"
    # Larger images are restored in tiles so an actor's memory stays bounded.
    tile: int = Field(512, ge=64)
    tile_overlap: int = Field(32, ge=0)
    # Average the model over the 8 flips and 90-degree rotations of each image: about +0.1 to
    # +0.2 dB PSNR for 8x the compute; for archives where quality matters more than throughput.
    self_ensemble: bool = False
    # Benchmarks only: the model's device work replaced by a simulated device restoring this
    # many 480x320-equivalent images/s (pipeline/restore/simulated_device.py). Outputs are then
    # the bicubic images.
    simulated_rate: float | None = Field(None, gt=0)

    @field_validator("tile_overlap")
    @classmethod
    def _overlap_fits(cls, v: int, info) -> int:
        tile = info.data.get("tile", 512)
        if 2 * v >= tile:
            raise ValueError(f"must be less than half of tile ({tile})")
        return v


class ResourcesConfig(_Section):
    # Restoring actors, each holding one model replica: the pool starts with `actors` and
    # grows to `max_actors` while there is work and the cluster has (or its autoscaler can add)
    # room. null: a fixed pool of `actors`; auto: one per GPU the cluster can reach.
    actors: int = Field(1, ge=1)
    max_actors: Annotated[int, Field(ge=1)] | Literal["auto"] | None = None
    cpus_per_actor: float = Field(1.0, gt=0)
    # GPUs per actor, a resource request: a number asks for it even when no GPU node exists
    # yet, so an autoscaler adds them. auto: one each when the cluster has or can add GPUs.
    gpus_per_actor: Annotated[float, Field(ge=0)] | Literal["auto"] = "auto"
    # The model's CPU threads per actor. auto: cpus_per_actor with a GPU; on CPUs, the largest
    # node's cores shared among the actors: the model is most of the work, and the CPU stages
    # fit between its threads (docs/performance.md: faster than one thread per actor).
    threads_per_actor: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    # What runs the stages. ray: Ray Data, a local Ray started for the run unless the job runs
    # on a cluster. local: one worker process on this machine, without Ray (seconds sooner to
    # the first image, and all the cores for the model). auto: ray on a cluster (RAY_ADDRESS, as
    # `ray job submit` sets), with a GPU or with several actors; local otherwise.
    engine: Literal["auto", "ray", "local"] = "auto"


class LimitsConfig(_Section):
    # Larger inputs are error rows, checked before decoding (decompression bombs included).
    max_pixels: int = Field(16_000_000, ge=1)
    max_bytes: int = Field(64 * 1024 * 1024, ge=1)
    # A run whose error rows exceed this share of the input exits 3 with the top reasons
    # (expired credentials or a wrong prefix fail every row, and must not look like success).
    max_error_rate: float = Field(0.5, ge=0, le=1)


class StorageConfig(_Section):
    # S3-compatible endpoint; null uses AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL or AWS itself.
    endpoint_url: str | None = None
    region: str | None = None
    addressing_style: Literal["auto", "virtual", "path"] = "auto"
    anonymous: bool = False
    # Attempts for transient errors (5xx, throttling, resets), with capped exponential backoff.
    retries: int = Field(5, ge=1)

    def fsspec_options(self) -> dict[str, dict[str, Any]]:
        """Options per protocol for :mod:`pipeline.storage`; credentials stay in the environment."""
        endpoint = (self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")
                    or os.environ.get("AWS_ENDPOINT_URL"))
        client: dict[str, Any] = {}
        if endpoint:
            client["endpoint_url"] = endpoint
        if self.region:
            client["region_name"] = self.region
        # botocore's standard mode retries 5xx, throttling and connection errors with capped
        # exponential backoff and jitter, and never 403/404; `retries` bounds the attempts.
        # The connection pool holds a block's requests in flight (botocore's default, 10, would
        # queue the rest behind them).
        botocore: dict[str, Any] = {"retries": {"mode": "standard",
                                                "total_max_attempts": self.retries},
                                    "max_pool_connections": REQUESTS_IN_FLIGHT}
        if self.addressing_style != "auto":
            botocore["s3"] = {"addressing_style": self.addressing_style}
        # max_concurrency 1: a whole-object read is one GET. s3fs's default (>1) first asks for
        # the object's size (a HEAD, a second round trip per image) to split large reads.
        return {"s3": {"anon": self.anonymous, "client_kwargs": client,
                       "config_kwargs": botocore, "max_concurrency": 1}}


class JobConfig(_Section):
    input: InputConfig
    output: OutputConfig = OutputConfig()
    model: ModelConfig = ModelConfig()
    inference: InferenceConfig = InferenceConfig()
    resources: ResourcesConfig = ResourcesConfig()
    limits: LimitsConfig = LimitsConfig()
    storage: StorageConfig = StorageConfig()


class FinetuneConfig(_Section):
    """``jobs.finetune``'s settings, keyed like its flags (``checkpoint_every`` or
    ``checkpoint-every``). A training setting left out (None) takes the training default
    (``pipeline.training.trainer.TrainSettings``), which is its one source."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True,
                              alias_generator=lambda name: name.replace("_", "-"))

    # Prefixes or manifests of high-resolution images; a flag's list replaces the file's.
    train: list[str] = []
    storage: str = "runs"  # where runs keep checkpoints (URI); the same name there resumes
    name: str = "default"
    export: str | None = None  # the float16 release checkpoint (URI)
    init: str | None = None  # start from this checkpoint instead of from scratch
    workers: Annotated[int, Field(ge=1)] = 1
    gpu: bool = False  # one GPU per worker
    # CPUs (and torch threads) per worker; None: the cluster's CPUs shared among the workers,
    # or 1 with a GPU.
    cpus_per_worker: Annotated[int, Field(ge=1)] | None = None
    steps: Annotated[int, Field(ge=1)] | None = None
    batch: Annotated[int, Field(ge=1)] | None = None
    patch: Annotated[int, Field(ge=8, multiple_of=4)] | None = None
    lr: Annotated[float, Field(gt=0)] | None = None
    checkpoint_every: Annotated[int, Field(ge=1)] | None = None
    seed: int | None = None
    endpoint_url: str | None = None  # S3-compatible endpoint for train and storage

    @field_validator("train", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        return [v] if isinstance(v, str) else v


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the file and the key."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """Safe YAML that refuses a key given twice in one mapping (plain YAML keeps the last one,
    silently dropping the other section)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> JobConfig:
    """Read and validate a restore job's YAML config, then apply dotted-key overrides.

    Args:
        path: the YAML file; ``configs/local.yaml`` when None.
        overrides: for example ``{"output.uri": "s3://bucket/out"}``; None values are ignored.

    Raises:
        ConfigError: unreadable YAML, unknown keys or bad values, naming the file and key.
    """
    return _resolve_local_paths(load_yaml(path or DEFAULT_CONFIG, JobConfig, overrides))


def load_finetune_config(path: str | Path | None = None,
                         overrides: dict[str, Any] | None = None) -> FinetuneConfig:
    """Read and validate a training YAML config (``configs/train.yaml``; none: the defaults),
    then apply overrides (the command line's flags).

    Raises:
        ConfigError: as :func:`load_config`.
    """
    return load_yaml(path, FinetuneConfig, overrides)


def load_yaml(path: str | Path | None, model: type[M], overrides: dict[str, Any] | None = None
              ) -> M:
    """``path`` (YAML; None: empty) validated as ``model``, with dotted-key ``overrides`` over it
    (None values ignored). Unknown keys, keys given twice and bad values are refused by name."""
    raw = _read_yaml(Path(path)) if path else {}
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(map(str, err['loc']))}: {_describe(err)}" for err in e.errors()
        )
        raise ConfigError(f"{path or 'the command line'}: {problems}") from None


def _read_yaml(path: Path) -> dict:
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                          f"{e.start}); save the file as UTF-8") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    return raw


def _describe(err: dict) -> str:
    if err["type"] == "extra_forbidden":
        return "unknown key"
    return err["msg"]


def _resolve_local_paths(config: JobConfig) -> JobConfig:
    """Make local paths absolute so Ray workers with another working directory agree.

    Inputs and outputs resolve against the current directory, like any command-line tool; the
    checkpoint also falls back to the repository root, where the shipped one lives.
    """
    def absolute(uri: str) -> str:
        return uri if "://" in uri else str(Path(uri).expanduser().resolve())

    checkpoint = config.model.checkpoint
    if checkpoint and "://" not in checkpoint and not Path(checkpoint).exists():
        if (REPO_ROOT / checkpoint).exists():
            checkpoint = str(REPO_ROOT / checkpoint)
    return config.model_copy(update={
        "input": config.input.model_copy(update={"manifest": absolute(config.input.manifest)}),
        "output": config.output.model_copy(update={"uri": absolute(config.output.uri)}),
        "model": config.model.model_copy(
            update={"checkpoint": absolute(checkpoint) if checkpoint else None}),
    })
