"""The restore job as one Ray Data graph.

    manifest rows -> prepare (CPU tasks: read, decode, 2x bicubic, metrics in)
                  -> RestoreActor pool (one MIMO-UNet each, GPU when the cluster has them)
                  -> finish (CPU tasks: encode, atomic write, metrics out)
                  -> the driver: progress, and Parquet under {output}/metrics/ (the ledger)
"""

from __future__ import annotations

import contextlib
import logging
import time
import traceback
import warnings
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.exceptions as rx
from ray.data import ActorPoolStrategy, DataContext, Dataset

from pipeline import storage
from pipeline.cluster import plan_actors
from pipeline.config import ConfigError, JobConfig
from pipeline.imaging import DecodeLimits
from pipeline.inference import InferenceSettings
from pipeline.lease import Lease
from pipeline.models import read_checkpoint
from pipeline.plan import Plan, plan_restore
from pipeline.progress import Progress, quiet_ray, without_known_noise
from pipeline.report_page import write_report
from pipeline.results import (
    METRICS_SCHEMA,
    SUMMARY_SCHEMA,
    LedgerWriter,
    Summary,
    read_metrics,
    summarize,
    to_table,
    write_run_record,
    write_table,
)
from pipeline.stages import RestoreActor, StageContext, finish, prepare


def run_restore(config: JobConfig, force: bool = False, log=print, verbose: bool = False,
                progress_stream=None) -> Summary:
    """Restore every row of the configured input; returns the summary read back from Parquet.

    Rows whose id and source were already restored into the same output with the same model and
    checkpoint are skipped, so a rerun after a crash does only the rest; ``force`` redoes all.

    A row whose id already holds the restoration of another source in this output becomes an
    error row, with or without ``force``: an output key belongs to one source.

    Progress goes to ``progress_stream`` (stderr) as one line; ``verbose`` leaves Ray Data's own
    progress and logs on.

    Raises:
        ManifestError: the input cannot be read; nothing was processed.
        CheckpointError: the checkpoint cannot be loaded; nothing was processed.
        ConfigError: the output cannot be written, or another run holds it (its lease);
            nothing was processed.
    """
    plan = plan_restore(config, force, log)
    options = plan.storage_options
    if config.model.checkpoint:  # loads, before any work, what every actor will load
        read_checkpoint(config.model.checkpoint, options)
    try:  # the last check, since it creates the output
        storage.check_writable(config.output.uri, options)
    except OSError as e:
        raise ConfigError(f"output {config.output.uri} cannot be written: "
                          f"{e.__class__.__name__}: {e}") from e
    lease = Lease(config.output.uri, plan.run_id, options)
    lease.acquire()
    try:
        return _restore(config, plan, log, verbose, progress_stream)
    finally:
        lease.release()


def _restore(config: JobConfig, plan: Plan, log, verbose: bool, progress_stream) -> Summary:
    rows, total, key = plan.rows, plan.total, plan.key
    options, metrics_uri, run_id = plan.storage_options, plan.metrics_uri, plan.run_id
    ctx = StageContext(
        output_uri=config.output.uri, model=key.model, checkpoint_sha256=key.checkpoint_sha256,
        settings_sha256=key.settings_sha256, run_id=run_id,
        output_format=config.output.format, output_quality=config.output.quality,
        output_png_level=config.output.png_level,
        limits=DecodeLimits(config.limits.max_pixels, config.limits.max_bytes),
        storage_options=options,
    )
    log(f"run {run_id}: {rows.num_rows} of {total} rows to do from {config.input.manifest}; "
        f"model {config.model.name}, checkpoint "
        f"{ctx.checkpoint_sha256[:12] if ctx.checkpoint_sha256 else 'none (random weights)'}")

    started = time.time()
    todo = rows
    progress = Progress(rows.num_rows, stream=progress_stream)
    # A worker that dies (crash, kill, out of memory) loses its block after Ray's retries; the
    # rows of lost blocks are retried one per block, so only a poisoned image stays lost, and
    # then gets its error row from the driver: every row ends with exactly one metrics row.
    for attempt, block_rows in enumerate((config.input.rows_per_block, 1)):
        if not todo.num_rows:
            break
        if attempt:
            progress.close()
            log(f"{todo.num_rows} rows were lost with failed workers; retrying them one by one")
        if not ray.is_initialized():
            ray.init(**quiet_ray(verbose))
        elif not verbose:
            quiet_ray()
        _wait_for_a_free_cpu()
        ledger = LedgerWriter(metrics_uri, options, prefix=f"run-{run_id}_p{attempt}")
        quiet = contextlib.nullcontext() if verbose else without_known_noise()
        try:
            with quiet, _lost_blocks_tolerated(verbose) as failures:
                dataset = _restore_graph(todo, ctx, config, block_rows)
                for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
                    ledger.write(batch)
                    progress.advance(batch.num_rows)
                    failures.raise_if_a_stage_failed()
                failures.raise_if_a_stage_failed()
        finally:
            ledger.flush()  # what was restored stays done, even when the run stops here
        todo = todo.filter(pc.invert(pc.is_in(todo["row"], value_set=ledger.written_rows())))
    progress.close()
    if todo.num_rows:
        _write_lost(todo, ctx, metrics_uri, options)
    written = read_metrics(metrics_uri, options, run_id=run_id, log=log, schema=SUMMARY_SCHEMA)
    summary = summarize(
        written,
        expected_rows=rows["row"], seconds=time.time() - started,
        images_uri=storage.join(config.output.uri, "images"), metrics_uri=metrics_uri,
        run_id=run_id, skipped=total - rows.num_rows,
        max_error_rate=config.limits.max_error_rate,
    )
    if not rows.num_rows:
        return summary  # nothing was to do: a rerun like this writes nothing
    write_run_record(config.output.uri, {
        "run_id": run_id, "started_at": datetime.fromtimestamp(started, timezone.utc),
        "listed_at": datetime.fromtimestamp(plan.listed_at, timezone.utc),
        "finished_at": datetime.now(timezone.utc), "config": config.model_dump(mode="json"),
        "checkpoint_sha256": ctx.checkpoint_sha256, "settings_sha256": ctx.settings_sha256,
        "rows_in_input": total, "rows_skipped": summary.skipped, "rows_done": summary.rows,
        "ok": summary.ok, "errors": summary.errors,
        "images_per_s": round(summary.images_per_s, 3), "ray_version": ray.__version__,
    }, options)
    if config.output.report:
        summary.report_uri = write_report(config.output.uri, options=options, log=log)
    return summary


def _wait_for_a_free_cpu(timeout_s: float = 10.0) -> None:
    """An earlier pass's actors release their CPUs a moment after it ends; starting before
    then makes Ray Data warn that the job "will hang", which it would not."""
    deadline = time.time() + timeout_s
    while not ray.available_resources().get("CPU") and time.time() < deadline:
        time.sleep(0.1)


class StageError(RuntimeError):
    """A stage raised outside its per-row handling: a bug or a broken environment, not a bad
    image. The run stops with the stage's traceback; the rows written so far stay done."""


# Failures of the machinery, not of the code: the block's rows are redone one per block.
_SYSTEM_FAILURES = (rx.RayActorError, rx.WorkerCrashedError, rx.ObjectLostError,
                    rx.NodeDiedError, rx.OutOfMemoryError, rx.LocalRayletDiedError,
                    rx.RaySystemError)


class _BlockFailures(logging.Filter):
    """Sorts the block failures Ray Data reports (and, with max_errored_blocks=-1, skips):
    system failures are left to the lost-rows pass; the first application error is kept, to
    stop the run with it. Ray Data's own report of either is shown only when verbose."""

    def __init__(self, verbose: bool):
        super().__init__()
        self.verbose = verbose
        self.stage_error: BaseException | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is None:
            return True
        if not isinstance(error, _SYSTEM_FAILURES) and self.stage_error is None:
            self.stage_error = error  # the driver raises it, traceback and all
        return self.verbose

    def raise_if_a_stage_failed(self) -> None:
        if self.stage_error is not None:
            trace = "".join(traceback.format_exception(self.stage_error)).rstrip()
            raise StageError(f"a stage failed; the run stops here (the rows restored so far "
                             f"are kept, a rerun does the rest):\n{trace}") from self.stage_error


@contextlib.contextmanager
def _lost_blocks_tolerated(verbose: bool = False):
    """Lost blocks are found and redone by the caller; they must not abort the other blocks.
    Yields the :class:`_BlockFailures` that tells a lost block from a failing stage.

    A dataset copies the current DataContext when it is created, so this wraps creation too.
    """
    data_context = DataContext.get_current()
    saved = data_context.max_errored_blocks
    data_context.max_errored_blocks = -1
    failures = _BlockFailures(verbose)
    executor_log = logging.getLogger("ray.data._internal.execution.streaming_executor_state")
    executor_log.addFilter(failures)
    try:
        yield failures
    finally:
        executor_log.removeFilter(failures)
        data_context.max_errored_blocks = saved


def _write_lost(rows: pa.Table, ctx: StageContext, metrics_uri: str, options) -> None:
    now = datetime.now(timezone.utc)
    reason = ("restore: the worker process died on this image in every attempt "
              "(crash, kill or out of memory)")
    lost = [{"row": r["row"], "id": r["id"], "source_uri": r["source_uri"], "status": "error",
             "error": r["error"] or reason, "model": ctx.model, "run_id": ctx.run_id,
             "checkpoint_sha256": ctx.checkpoint_sha256,
             "settings_sha256": ctx.settings_sha256, "finished_at": now}
            for r in rows.to_pylist()]
    write_table(to_table(lost, METRICS_SCHEMA),
                storage.join(metrics_uri, f"run-{ctx.run_id}_lost.parquet"), options)


def _restore_graph(rows: pa.Table, ctx: StageContext, config: JobConfig,
                   rows_per_block: int) -> Dataset:
    actors = plan_actors(config)
    actor_args = {
        "model": config.model.name, "checkpoint_uri": config.model.checkpoint,
        "checkpoint_sha256": ctx.checkpoint_sha256, "storage_options": ctx.storage_options,
        "device": actors.device,
        "settings": InferenceSettings(**config.inference.model_dump(exclude={"device"})),
        "threads": actors.threads,
    }
    k = rows_per_block
    blocks = ray.data.from_arrow([rows.slice(i, k) for i in range(0, rows.num_rows, k)])
    prepared = blocks.map_batches(prepare, fn_kwargs={"ctx": ctx}, batch_format="pyarrow",
                                  batch_size=None)
    # Ray 2.60 has no named parameter for max_task_retries and warns that the generic remote
    # arguments go in Ray 2.64; the pin in pyproject.toml keeps this working until then.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        restored = prepared.map_batches(
            RestoreActor, fn_constructor_kwargs=actor_args,
            compute=ActorPoolStrategy(min_size=actors.min_actors, max_size=actors.max_actors),
            num_cpus=config.resources.cpus_per_actor, num_gpus=actors.gpus,
            # A whole block per call: the restorer groups its images into bucket shapes and runs
            # inference.batch_size of each at a time, so more rows make fuller batches.
            batch_size=rows_per_block, batch_format="pyarrow",
            # Ray's default retries a task forever on restarted actors; an image that kills
            # its worker would then stall the job.
            max_task_retries=2,
        )
    return restored.map_batches(finish, fn_kwargs={"ctx": ctx}, batch_format="pyarrow",
                                batch_size=None)
