"""The restore job as one Ray Data graph.

    manifest rows -> prepare (CPU tasks: read, decode, 2x bicubic, metrics in)
                  -> RestoreActor pool (one MIMO-UNet each, GPU when the cluster has them)
                  -> finish (CPU tasks: encode, atomic write, metrics out)
                  -> Parquet under {output}/metrics/
"""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timezone

import pyarrow.fs as pafs
import ray
from ray.data import ActorPoolStrategy
from ray.data.datasource import FilenameProvider

from pipeline import manifest, storage
from pipeline.config import JobConfig
from pipeline.imaging import DecodeLimits
from pipeline.inference import InferenceSettings
from pipeline.models import read_checkpoint
from pipeline.results import Summary, read_metrics, summarize
from pipeline.stages import RestoreActor, StageContext, finish, prepare


def run_restore(config: JobConfig, log=print) -> Summary:
    """Restore every row of the configured input; returns the summary read back from Parquet.

    Raises:
        ManifestError: the input cannot be read; nothing was processed.
        ValueError: the checkpoint cannot be loaded; nothing was processed.
    """
    options = config.storage.fsspec_options()
    retry = storage.RetryPolicy(attempts=config.storage.retries)
    rows = manifest.load_rows(config.input.manifest, options)
    checkpoint = (read_checkpoint(config.model.checkpoint, options)
                  if config.model.checkpoint else None)
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    images_uri = storage.join(config.output.uri, "images")
    metrics_uri = storage.join(config.output.uri, "metrics")
    log(f"run {run_id}: {rows.num_rows} rows from {config.input.manifest}; "
        f"model {config.model.name}, checkpoint "
        f"{checkpoint.sha256[:12] if checkpoint else 'none (random weights)'}")

    if not ray.is_initialized():
        ray.init()
    gpus = _gpus_per_actor(config)
    ctx = StageContext(
        output_uri=config.output.uri, model=config.model.name,
        checkpoint_sha256=checkpoint.sha256 if checkpoint else None, run_id=run_id,
        output_format=config.output.format, output_quality=config.output.quality,
        limits=DecodeLimits(config.limits.max_pixels, config.limits.max_bytes),
        storage_options=options, retry=retry,
    )
    inference = InferenceSettings(
        batch_size=config.inference.batch_size, precision=config.inference.precision,
        tile=config.inference.tile, tile_overlap=config.inference.tile_overlap,
    )
    k = config.input.rows_per_block
    started = time.time()
    (
        ray.data.from_arrow([rows.slice(i, k) for i in range(0, rows.num_rows, k)])
        .map_batches(prepare, fn_kwargs={"ctx": ctx}, batch_format="pyarrow", batch_size=None)
        .map_batches(
            RestoreActor,
            fn_constructor_kwargs={
                "model": config.model.name, "checkpoint_uri": config.model.checkpoint,
                "checkpoint_sha256": ctx.checkpoint_sha256, "storage_options": options,
                "device": "cuda" if gpus else config.inference.device.replace("auto", "cpu"),
                "settings": inference, "threads": max(1, int(config.resources.cpus_per_actor)),
            },
            compute=ActorPoolStrategy(size=config.resources.actors),
            num_cpus=config.resources.cpus_per_actor, num_gpus=gpus,
            batch_size=config.inference.batch_size, batch_format="pyarrow",
        )
        .map_batches(finish, fn_kwargs={"ctx": ctx}, batch_format="pyarrow", batch_size=None)
        .write_parquet(
            _arrow_path(metrics_uri, options), filesystem=_arrow_fs(metrics_uri, options),
            filename_provider=FilenameProvider(dataset_uuid=f"run-{run_id}",
                                               file_format="parquet"),
        )
    )
    seconds = time.time() - started
    table = read_metrics(metrics_uri, options, run_id=run_id)
    return summarize(table, rows.num_rows, seconds, images_uri, metrics_uri, run_id)


def _gpus_per_actor(config: JobConfig) -> float:
    requested = config.resources.gpus_per_actor
    device = config.inference.device
    if device == "cpu":
        return 0.0
    available = ray.cluster_resources().get("GPU", 0)
    if requested == "auto":
        requested = 1.0 if available else 0.0
    if device == "cuda" and not (requested and available):
        raise RuntimeError("device 'cuda' was requested but the Ray cluster has no GPUs "
                           f"(cluster resources: {ray.cluster_resources()})")
    return float(requested)


def _arrow_fs(uri: str, options) -> pafs.FileSystem:
    fs, _ = storage.filesystem(uri, options)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def _arrow_path(uri: str, options) -> str:
    return storage.filesystem(uri, options)[1]
