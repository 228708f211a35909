"""The restore job as one Ray Data graph.

    manifest rows -> prepare (CPU tasks: read, decode, 2x bicubic, metrics in)
                  -> RestoreActor pool (one MIMO-UNet each, GPU when the cluster has them)
                  -> finish (CPU tasks: encode, atomic write, metrics out)
                  -> Parquet under {output}/metrics/, one file set per run
"""

from __future__ import annotations

import contextlib
import io
import time
import uuid
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from ray.data import ActorPoolStrategy, DataContext, Dataset
from ray.data.datasource import FilenameProvider

from pipeline import manifest, storage
from pipeline.config import ConfigError, JobConfig
from pipeline.imaging import DecodeLimits
from pipeline.inference import InferenceSettings
from pipeline.models import read_checkpoint
from pipeline.results import (
    METRICS_SCHEMA,
    Summary,
    completed,
    read_metrics,
    summarize,
    to_table,
)
from pipeline.stages import RestoreActor, StageContext, finish, prepare


def run_restore(config: JobConfig, force: bool = False, log=print) -> Summary:
    """Restore every row of the configured input; returns the summary read back from Parquet.

    Rows whose id and source were already restored into the same output with the same model and
    checkpoint are skipped, so a rerun after a crash does only the rest; ``force`` redoes all.

    A row whose id already holds the restoration of another source in this output becomes an
    error row, with or without ``force``: an output key belongs to one source.

    Raises:
        ManifestError: the input cannot be read; nothing was processed.
        CheckpointError: the checkpoint cannot be loaded; nothing was processed.
        ConfigError: the output cannot be written; nothing was processed.
    """
    options = config.storage.fsspec_options()
    rows = manifest.load_rows(config.input.manifest, options, exclude=config.output.uri)
    checkpoint = (read_checkpoint(config.model.checkpoint, options)
                  if config.model.checkpoint else None)
    try:  # last of the checks, since it creates the output
        storage.check_writable(config.output.uri, options)
    except OSError as e:
        raise ConfigError(f"output {config.output.uri} cannot be written: "
                          f"{e.__class__.__name__}: {e}") from e
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    metrics_uri = storage.join(config.output.uri, "metrics")
    ctx = StageContext(
        output_uri=config.output.uri, model=config.model.name,
        checkpoint_sha256=checkpoint.sha256 if checkpoint else None, run_id=run_id,
        output_format=config.output.format, output_quality=config.output.quality,
        output_png_level=config.output.png_level,
        limits=DecodeLimits(config.limits.max_pixels, config.limits.max_bytes),
        storage_options=options,
    )
    total = rows.num_rows
    previous = read_metrics(metrics_uri, options, log=log)
    rows = _claimed_by_other_sources(rows, previous)
    if not force:
        rows = _without_completed(rows, previous, ctx)
    log(f"run {run_id}: {rows.num_rows} of {total} rows to do from {config.input.manifest}; "
        f"model {config.model.name}, checkpoint "
        f"{checkpoint.sha256[:12] if checkpoint else 'none (random weights)'}")

    started = time.time()
    todo, written = rows, METRICS_SCHEMA.empty_table()
    # A worker that dies (crash, kill, out of memory) loses its block after Ray's retries; the
    # rows of lost blocks are retried one per block, so only a poisoned image stays lost, and
    # then gets its error row from the driver: every row ends with exactly one metrics row.
    for attempt, block_rows in enumerate((config.input.rows_per_block, 1)):
        if not todo.num_rows:
            break
        if attempt:
            log(f"{todo.num_rows} rows were lost with failed workers; retrying them one by one")
        if not ray.is_initialized():
            ray.init()
        _wait_for_a_free_cpu()
        with _lost_blocks_tolerated():
            _write_metrics(_restore_graph(todo, ctx, config, block_rows), metrics_uri, options,
                           prefix=f"run-{run_id}_p{attempt}")
        written = read_metrics(metrics_uri, options, run_id=run_id, log=log)
        done = set(written["row"].to_pylist())
        todo = todo.filter(pa.array([r not in done for r in todo["row"].to_pylist()]))
    if todo.num_rows:
        _write_lost(todo, ctx, metrics_uri, options)
        written = read_metrics(metrics_uri, options, run_id=run_id, log=log)
    return summarize(
        written,
        expected_rows=rows["row"].to_pylist(), seconds=time.time() - started,
        images_uri=storage.join(config.output.uri, "images"), metrics_uri=metrics_uri,
        run_id=run_id, skipped=total - rows.num_rows,
    )


def _wait_for_a_free_cpu(timeout_s: float = 10.0) -> None:
    """An earlier pass's actors release their CPUs a moment after it ends; starting before
    then makes Ray Data warn that the job "will hang", which it would not."""
    deadline = time.time() + timeout_s
    while not ray.available_resources().get("CPU") and time.time() < deadline:
        time.sleep(0.1)


@contextlib.contextmanager
def _lost_blocks_tolerated():
    """Lost blocks are found and redone by the caller; they must not abort the other blocks.

    A dataset copies the current DataContext when it is created, so this wraps creation too.
    """
    data_context = DataContext.get_current()
    saved = data_context.max_errored_blocks
    data_context.max_errored_blocks = -1
    try:
        yield
    finally:
        data_context.max_errored_blocks = saved


def _write_metrics(dataset: Dataset, metrics_uri: str, options, prefix: str) -> None:
    fs, path = storage.filesystem(metrics_uri, options)
    dataset.write_parquet(
        path, filesystem=pafs.PyFileSystem(pafs.FSSpecHandler(fs)),
        filename_provider=FilenameProvider(dataset_uuid=prefix, file_format="parquet"),
    )


def _write_lost(rows: pa.Table, ctx: StageContext, metrics_uri: str, options) -> None:
    now = datetime.now(timezone.utc)
    reason = ("restore: the worker process died on this image in every attempt "
              "(crash, kill or out of memory)")
    lost = [{"row": r["row"], "id": r["id"], "source_uri": r["source_uri"], "status": "error",
             "error": r["error"] or reason, "model": ctx.model, "run_id": ctx.run_id,
             "checkpoint_sha256": ctx.checkpoint_sha256, "finished_at": now}
            for r in rows.to_pylist()]
    buf = io.BytesIO()
    pq.write_table(to_table(lost, METRICS_SCHEMA), buf)
    storage.write_bytes_atomic(storage.join(metrics_uri, f"run-{ctx.run_id}_lost.parquet"),
                               buf.getvalue(), options)


def _restore_graph(rows: pa.Table, ctx: StageContext, config: JobConfig,
                   rows_per_block: int) -> Dataset:
    gpus = _gpus_per_actor(config)
    cpus = ray.cluster_resources().get("CPU", 0)
    wanted = config.resources.actors * config.resources.cpus_per_actor
    if wanted >= cpus:
        # Ray Data would wait forever for a CPU to read and write with.
        raise ConfigError(
            f"resources: {config.resources.actors} actors x {config.resources.cpus_per_actor} "
            f"CPUs leave none of the cluster's {cpus:g} CPUs for reading and writing images; "
            "lower resources.actors or resources.cpus_per_actor")
    k = rows_per_block
    return (
        ray.data.from_arrow([rows.slice(i, k) for i in range(0, rows.num_rows, k)])
        .map_batches(prepare, fn_kwargs={"ctx": ctx}, batch_format="pyarrow", batch_size=None)
        .map_batches(
            RestoreActor,
            fn_constructor_kwargs={
                "model": config.model.name, "checkpoint_uri": config.model.checkpoint,
                "checkpoint_sha256": ctx.checkpoint_sha256,
                "storage_options": ctx.storage_options,
                "device": "cuda" if gpus else "cpu",
                "settings": InferenceSettings(**config.inference.model_dump(exclude={"device"})),
                "threads": max(1, int(config.resources.cpus_per_actor)),
            },
            compute=ActorPoolStrategy(size=config.resources.actors),
            num_cpus=config.resources.cpus_per_actor, num_gpus=gpus,
            # A whole block per call: the restorer groups its images into bucket shapes and runs
            # inference.batch_size of each at a time, so more rows make fuller batches.
            batch_size=rows_per_block, batch_format="pyarrow",
            # Ray's default retries a task forever on restarted actors; an image that kills
            # its worker would then stall the job. (No named parameter exists for this yet.)
            max_task_retries=2,
        )
        .map_batches(finish, fn_kwargs={"ctx": ctx}, batch_format="pyarrow", batch_size=None)
    )


def _claimed_by_other_sources(rows: pa.Table, previous: pa.Table) -> pa.Table:
    """Error rows for ids whose output already holds another source's restoration.

    An output key belongs to the source first restored into it: restoring a second source
    there would overwrite it, and a later run of the first manifest would then skip its row as
    done while the file holds the other picture.
    """
    ok = previous.filter(pc.equal(previous["status"], "ok"))
    if not ok.num_rows:
        return rows
    owners = (ok.sort_by([("finished_at", "descending")])
              .group_by("id", use_threads=False).aggregate([("source_uri", "first")])
              .rename_columns(["id", "owner"]))
    joined = rows.join(owners, "id", join_type="left outer").sort_by("row")
    owner = joined["owner"]
    # fill_null: a row without an owner (or without a source) compares as null, not as False.
    clash = pc.and_(pc.not_equal(owner, joined["source_uri"]).fill_null(False),
                    pc.is_null(joined["error"]))
    reason = pc.binary_join_element_wise(
        "id already holds the image restored from ", owner,
        " in this output; give this row another id, or restore into another output", "")
    error = pc.if_else(clash, reason, joined["error"])
    return joined.drop_columns(["owner"]).set_column(
        joined.schema.get_field_index("error"), "error", error).select(rows.column_names)


def _without_completed(rows: pa.Table, previous: pa.Table, ctx: StageContext) -> pa.Table:
    done = completed(previous, ctx.model, ctx.checkpoint_sha256)
    if not done:
        return rows
    keep = [error is not None or (image_id, source) not in done for image_id, source, error in
            zip(rows["id"].to_pylist(), rows["source_uri"].to_pylist(),
                rows["error"].to_pylist())]
    return rows.filter(pa.array(keep))


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
