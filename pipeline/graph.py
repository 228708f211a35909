"""The restore job as one Ray Data graph.

    manifest rows -> prepare (CPU tasks: read, decode, 2x bicubic, metrics in)
                  -> RestoreActor pool (one MIMO-UNet each, GPU when the cluster has them)
                  -> finish (CPU tasks: encode, atomic write, metrics out)
                  -> the driver: progress, and Parquet under {output}/metrics/ (the ledger)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
import traceback
import uuid
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.exceptions as rx
from ray.data import ActorPoolStrategy, DataContext, Dataset

from pipeline import manifest, storage
from pipeline.cluster import plan_actors
from pipeline.config import ConfigError, JobConfig
from pipeline.imaging import DecodeLimits
from pipeline.inference import InferenceSettings
from pipeline.lease import Lease
from pipeline.models import read_checkpoint
from pipeline.progress import Progress, quiet_ray, without_known_noise
from pipeline.report_page import write_report
from pipeline.results import (
    LEDGER_COLUMNS,
    METRICS_SCHEMA,
    LedgerWriter,
    Summary,
    completed,
    item_keys,
    read_metrics,
    read_run_records,
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
    try:  # the last check, since it creates the output
        storage.check_writable(config.output.uri, plan.ctx.storage_options)
    except OSError as e:
        raise ConfigError(f"output {config.output.uri} cannot be written: "
                          f"{e.__class__.__name__}: {e}") from e
    lease = Lease(config.output.uri, plan.ctx.run_id, plan.ctx.storage_options)
    lease.acquire()
    try:
        return _restore(config, plan, log, verbose, progress_stream)
    finally:
        lease.release()


def _restore(config: JobConfig, plan: Plan, log, verbose: bool, progress_stream) -> Summary:
    ctx, rows, total = plan.ctx, plan.rows, plan.total
    options, metrics_uri, run_id = ctx.storage_options, plan.metrics_uri, ctx.run_id
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
    written = read_metrics(metrics_uri, options, run_id=run_id, log=log)
    summary = summarize(
        written,
        expected_rows=rows["row"].to_pylist(), seconds=time.time() - started,
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


def _latest_rate(previous: pa.Table) -> float | None:
    """Rows per second of the newest earlier run in the ledger (first to last row written)."""
    if not previous.num_rows:
        return None
    newest = pc.max(previous["run_id"]).as_py()
    run = previous.filter(pc.equal(previous["run_id"], newest))
    span = pc.min_max(run["finished_at"]).as_py()
    if not span["min"] or span["max"] <= span["min"]:
        return None
    return run.num_rows / (span["max"] - span["min"]).total_seconds()


@dataclass
class Plan:
    """What a run would do: the rows left, and how fast the output's last run went."""

    ctx: StageContext
    rows: pa.Table  # to do
    total: int  # rows in the input
    metrics_uri: str
    earlier_rate: float | None  # images/s of the newest earlier run, if any
    since: float | None = None  # the input listed only what was modified after this
    listed_at: float = 0.0  # when the input was listed: the next run's "since last"


    def render(self) -> str:
        done = self.total - self.rows.num_rows
        listed = "" if self.since is None else " modified since " + datetime.fromtimestamp(
            self.since, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        lines = [f"{self.total} rows in the input{listed}, {done} already done, "
                 f"{self.rows.num_rows} to do"]
        if self.earlier_rate and self.rows.num_rows:
            eta = time.strftime("%H:%M:%S", time.gmtime(self.rows.num_rows / self.earlier_rate))
            lines.append(f"at the last run's {self.earlier_rate:.2f} images/s: about {eta}")
        return "\n".join(lines)


def plan_restore(config: JobConfig, force: bool = False, log=print) -> Plan:
    """Read the input and the output's ledger and decide what is left to do; reads only.

    Raises:
        ManifestError: the input cannot be read.
        CheckpointError: the checkpoint cannot be loaded.
        ConfigError: the output's ledger cannot be read (after retries).
    """
    options = config.storage.fsspec_options()
    listed_at = time.time()
    since = _since(config, options)
    rows = manifest.load_rows(config.input.manifest, options, exclude=config.output.uri,
                              since=since)
    checkpoint = (read_checkpoint(config.model.checkpoint, options)
                  if config.model.checkpoint else None)
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    metrics_uri = storage.join(config.output.uri, "metrics")
    ctx = StageContext(
        settings_sha256=output_settings_sha256(config),
        output_uri=config.output.uri, model=config.model.name,
        checkpoint_sha256=checkpoint.sha256 if checkpoint else None, run_id=run_id,
        output_format=config.output.format, output_quality=config.output.quality,
        output_png_level=config.output.png_level,
        limits=DecodeLimits(config.limits.max_pixels, config.limits.max_bytes),
        storage_options=options,
    )
    total = rows.num_rows
    try:
        previous = read_metrics(metrics_uri, options, log=log, columns=LEDGER_COLUMNS)
    except OSError as e:
        raise ConfigError(f"cannot read the output's ledger under {metrics_uri}: "
                          f"{e.__class__.__name__}: {e}") from e
    rows = _claimed_by_other_sources(rows, previous)
    if not force:
        rows = _without_completed(rows, previous, ctx)
    return Plan(ctx=ctx, rows=rows, total=total, metrics_uri=metrics_uri,
                earlier_rate=_latest_rate(previous), since=since, listed_at=listed_at)


def _since(config: JobConfig, options) -> float | None:
    """input.since as a POSIX time; "last" is when the newest run recorded under the output
    listed its input (None, so everything is listed, when there is none)."""
    since = config.input.since
    if since is None:
        return None
    if since == "last":
        runs = read_run_records(config.output.uri, options)
        if not runs:
            return None
        since = runs[-1].get("listed_at") or runs[-1]["started_at"]
    when = datetime.fromisoformat(since)
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()


def output_settings_sha256(config: JobConfig) -> str:
    """A hash of the settings that change what is written for an image (format, quality,
    self-ensemble, precision, tiling, buckets), so a rerun with other ones redoes the image
    instead of skipping it. Batch size, device, PNG level (lossless) and resources do not."""
    o, i = config.output, config.inference
    settings = {"format": o.format, "quality": o.quality if o.format != "png" else None,
                "self_ensemble": i.self_ensemble, "precision": i.precision, "tile": i.tile,
                "tile_overlap": i.tile_overlap, "bucket": i.bucket}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


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


def _claimed_by_other_sources(rows: pa.Table, previous: pa.Table) -> pa.Table:
    """Error rows for ids whose output already holds another source's restoration.

    An output key belongs to the source first restored into it: restoring a second source
    there would overwrite it, and a later run of the first manifest would then skip its row as
    done while the file holds the other picture. Set operations find the few suspect rows; only
    their ids' owners are looked up one by one.
    """
    ok = previous.filter(pc.equal(previous["status"], "ok"))
    if not ok.num_rows:
        return rows
    pairs = ok.group_by(["id", "source_uri"]).aggregate([])
    counts = pc.value_counts(pairs["id"])
    contested = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    known_id = pc.is_in(rows["id"], value_set=pairs["id"])
    other_source = pc.invert(pc.is_in(item_keys(rows), value_set=item_keys(pairs)))
    suspect = pc.and_(pc.and_(known_id, pc.or_(other_source,
                                                 pc.is_in(rows["id"], value_set=contested))),
                      pc.is_null(rows["error"]))
    indices = pc.indices_nonzero(suspect.fill_null(False))
    if not len(indices):
        return rows
    suspects = rows.take(indices)
    history = ok.filter(pc.is_in(ok["id"], value_set=suspects["id"]))
    owner = {}  # id -> source of its newest ok row
    for r in history.sort_by([("finished_at", "ascending")]).select(
            ["id", "source_uri"]).to_pylist():
        owner[r["id"]] = r["source_uri"]
    errors = rows["error"].to_pylist()
    for i, r in zip(indices.to_pylist(), suspects.select(["id", "source_uri"]).to_pylist()):
        if owner[r["id"]] != r["source_uri"]:
            errors[i] = (f"id already holds the image restored from {owner[r['id']]} in this "
                         "output; give this row another id, or restore into another output")
    return rows.set_column(rows.schema.get_field_index("error"), "error",
                           pa.array(errors, pa.string()))


def _without_completed(rows: pa.Table, previous: pa.Table, ctx: StageContext) -> pa.Table:
    """``rows`` less those already restored with this model and checkpoint; rows that carry an
    error are kept (they get their error row again)."""
    done = completed(previous, ctx.model, ctx.checkpoint_sha256, ctx.settings_sha256)
    if not len(done):
        return rows
    keep = pc.or_(pc.is_valid(rows["error"]),
                  pc.invert(pc.is_in(item_keys(rows), value_set=done)))
    return rows.filter(keep.fill_null(True))
