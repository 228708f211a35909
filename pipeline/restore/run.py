"""A restore run: plan it, run its stages on an engine, keep the ledger, sum it up.

    manifest rows -> prepare (read, decode)
                  -> RestoreActor (one MIMO-UNet: the 2x upscale, the model, sharpness)
                  -> finish (encode, atomic write)
                  -> the driver: progress, and Parquet under {output}/metrics/ (the ledger)

Two engines run the stages (:mod:`pipeline.restore.engine`): Ray Data on a cluster, or wherever
a GPU needs CPU tasks in parallel to keep it fed; a local worker process on a machine alone
without a GPU, which spares the run Ray's start-up (seconds) and its daemons' share of the
cores. Both keep the same promise: one metrics row per manifest row.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import storage
from pipeline.config import ConfigError, JobConfig
from pipeline.restore.blocks import to_table
from pipeline.restore.engine import Engine, choose, local_device
from pipeline.restore.lease import Lease
from pipeline.restore.ledger import (
    METRICS_SCHEMA,
    LedgerWriter,
    merge_run_files,
    read_metrics,
    write_table,
)
from pipeline.restore.plan import Plan, plan_restore
from pipeline.restore.progress import Progress
from pipeline.restore.report_page import write_report
from pipeline.restore.run_records import write_run_record
from pipeline.restore.stages import OUTPUT_UNWRITABLE, StageContext
from pipeline.restore.summary import SUMMARY_SCHEMA, Summary, summarize

logger = logging.getLogger(__name__)


def run_restore(config: JobConfig, force: bool = False, verbose: bool = False,
                progress_stream=None) -> Summary:
    """Restore every row of the configured input; returns the summary read back from Parquet.

    Rows whose id and source were already restored into the same output with the same model and
    checkpoint are skipped, so a rerun after a crash does only the rest; ``force`` redoes all.

    A row whose id already holds the restoration of another source in this output becomes an
    error row, with or without ``force``: an output key belongs to one source.

    Progress goes to ``progress_stream`` (stderr) as one line; ``verbose`` leaves the engine's
    own progress and logs on.

    Raises:
        ManifestError: the input cannot be read; nothing was processed.
        CheckpointError: the checkpoint cannot be loaded; nothing was processed.
        ConfigError: the output cannot be written, or another run holds it (its lease);
            nothing was processed.
    """
    plan = plan_restore(config, force)
    options = plan.storage_options
    if config.model.checkpoint:  # loads, before any work, what every actor will load
        from pipeline.models import read_checkpoint

        read_checkpoint(config.model.checkpoint, options, data=plan.checkpoint)
    if not plan.rows.num_rows:  # nothing to do: a rerun like this writes nothing, not even a lease
        return _restore(config, plan, None, "none", verbose, progress_stream)
    engine = choose(config)
    if engine == "local":
        local_device(config)  # a device that is not there stops the run before any write
    # The last check, since it creates the output: the folders the driver writes, so that a
    # read-only metrics/ or runs/ stops the run before any work rather than at its end.
    for uri in (config.output.uri, plan.metrics_uri, storage.join(config.output.uri, "runs")):
        try:
            storage.check_writable(uri, options)
        except OSError as e:
            raise ConfigError(f"output {uri} cannot be written: "
                              f"{e.__class__.__name__}: {e}") from e
    lease = Lease(config.output.uri, plan.run_id, options)
    try:
        lease.acquire()
    except OSError as e:
        raise ConfigError(f"cannot take the lease of output {config.output.uri}: "
                          f"{e.__class__.__name__}: {e}") from e
    try:
        return _restore(config, plan, lease, engine, verbose, progress_stream)
    finally:
        try:
            lease.release()
        except OSError as e:  # a full disk: the lease then expires by itself
            logger.warning(f"the lease stays until it expires (removing it failed: {e})")


class OutputUnwritable(RuntimeError):
    """The output stopped taking writes during the run (full disk, quota, permission). What
    reached the ledger stays done; images written without their row are redone by a rerun."""

    def __init__(self, output_uri: str, reason: str, done: int):
        super().__init__(
            f"the output {output_uri} stopped taking writes: {reason}. The run stops; "
            f"{done} rows reached the ledger, and the images restored among them stay done. "
            "Free space (or restore the "
            "permission) and run the same command again: it does the rest, including any "
            "image written without its row.")


def _restore(config: JobConfig, plan: Plan, lease: Lease | None, engine: str, verbose: bool,
             progress_stream) -> Summary:
    """The run's three steps: its stage context, the passes over the rows, and the end (lost
    rows, merged files, summary, run record, report)."""
    ctx = _stage_context(config, plan)
    logger.info(f"run {plan.run_id}: {plan.rows.num_rows} of {plan.total} rows to do from "
        f"{config.input.manifest}; model {config.model.name}, checkpoint "
        f"{ctx.checkpoint_sha256[:12] if ctx.checkpoint_sha256 else 'none (random weights)'}")
    started = time.time()
    lost, done = _passes(config, plan, ctx, engine, lease, verbose, progress_stream)
    return _finalise(config, plan, ctx, engine, started, lost, done)


def _stage_context(config: JobConfig, plan: Plan) -> StageContext:
    key = plan.key
    return StageContext(
        output_uri=config.output.uri, model=key.model, checkpoint_sha256=key.checkpoint_sha256,
        settings_sha256=key.settings_sha256, run_id=plan.run_id,
        output_format=config.output.format, output_quality=config.output.quality,
        output_png_level=config.output.png_level,
        metadata=config.output.metadata, background=config.output.background_rgb,
        layout=config.output.layout, key_spread=config.output.key_spread, limits=config.limits,
        image_column=config.input.image_column, id_column=config.input.id_column,
        storage_options=plan.storage_options,
    )


def _passes(config: JobConfig, plan: Plan, ctx: StageContext, engine: str, lease: Lease | None,
            verbose: bool, progress_stream) -> tuple[pa.Table, int]:
    """Run the rows through the engine, the ledger keeping what comes back.

    A worker that dies (crash, kill, out of memory) loses its block after the engine's retries;
    the rows of lost blocks are retried one per block, so only a poisoned image stays lost.

    Returns:
        The rows lost in both passes, and how many rows reached the ledger.

    Raises:
        OutputUnwritable: the output stopped taking writes (or another run took the lease).
    """
    todo, done = plan.rows, 0
    batches = _engine(engine)
    progress = Progress(todo.num_rows, stream=progress_stream)
    for attempt, block_rows in enumerate((config.input.rows_per_block, 1)):
        if not todo.num_rows:
            break
        if attempt:
            progress.close()
            logger.info(f"{todo.num_rows} rows were lost with failed workers; retrying them one "
                        "by one")
        ledger = LedgerWriter(plan.metrics_uri, plan.storage_options,
                              prefix=f"run-{plan.run_id}_p{attempt}")
        unwritable = None
        try:
            with contextlib.closing(batches(todo, ctx, config, block_rows, verbose)) as stream:
                for batch in stream:
                    ledger.write(batch)
                    progress.advance(batch.num_rows)
                    unwritable = _unwritable_reason(batch) or _lease_lost(lease)
                    if unwritable:
                        break
        finally:
            try:  # what was restored stays done, even when the run stops here
                ledger.flush()
            except OSError as e:
                unwritable = unwritable or f"{e.__class__.__name__}: {e}"
            done += len(ledger.written_rows())
        if unwritable:
            progress.close()
            raise OutputUnwritable(config.output.uri, unwritable, done)
        todo = todo.filter(pc.invert(pc.is_in(todo["row"], value_set=ledger.written_rows())))
    progress.close()
    return todo, done


def _finalise(config: JobConfig, plan: Plan, ctx: StageContext, engine: str, started: float,
              lost: pa.Table, done: int) -> Summary:
    """Every lost row its error row, the run's files merged, the summary read back from the
    ledger, and (when there was work) the run record and the report."""
    options, metrics_uri, run_id = plan.storage_options, plan.metrics_uri, plan.run_id
    try:
        if lost.num_rows:
            _write_lost(lost, ctx, metrics_uri, options)
            done += lost.num_rows
    except OSError as e:
        raise OutputUnwritable(config.output.uri, f"{e.__class__.__name__}: {e}", done) from e
    try:
        merge_run_files(metrics_uri, run_id, options)
    except OSError as e:  # fewer files is a convenience; the rows are all written
        logger.warning(f"the run's metrics files stay as written (merging them failed: {e})")
    written = read_metrics(metrics_uri, options, run_id=run_id, schema=SUMMARY_SCHEMA)
    summary = summarize(
        written,
        expected_rows=plan.rows["row"], seconds=time.time() - started,
        images_uri=storage.join(config.output.uri,
                                "images" if config.output.layout == "files" else "shards"),
        metrics_uri=metrics_uri,
        run_id=run_id, skipped=plan.total - plan.rows.num_rows,
        max_error_rate=config.limits.max_error_rate,
    )
    if not plan.rows.num_rows:
        return summary  # nothing was to do: a rerun like this writes nothing
    try:
        write_run_record(config.output.uri, {
            "run_id": run_id, "started_at": datetime.fromtimestamp(started, timezone.utc),
            "listed_at": datetime.fromtimestamp(plan.listed_at, timezone.utc),
            "finished_at": datetime.now(timezone.utc), "config": config.model_dump(mode="json"),
            "checkpoint_sha256": ctx.checkpoint_sha256, "settings_sha256": ctx.settings_sha256,
            "rows_in_input": plan.total, "rows_skipped": summary.skipped,
            "rows_done": summary.rows, "ok": summary.ok, "errors": summary.errors,
            "images_per_s": round(summary.images_per_s, 3), "engine": engine,
            "ray_version": _ray_version(),
        }, options)
    except OSError as e:  # every row is in the ledger; "--since last" needs the record
        raise OutputUnwritable(config.output.uri, f"{e.__class__.__name__}: {e}", done) from e
    if config.output.report:
        try:
            summary.report_uri = write_report(config.output.uri, options=options)
        except OSError as e:  # a convenience: `python -m jobs.report --html` writes it later
            logger.warning(f"the report was not written: {e.__class__.__name__}: {e}")
    return summary


def _lease_lost(lease: Lease | None) -> str | None:
    if lease is None or not lease.lost:
        return None
    return f"another run took over its lease ({lease.dir}) while this one stalled past it"


def _unwritable_reason(batch: pa.Table) -> str | None:
    """The reason of the first row of ``batch`` whose write failed for the whole output."""
    marker = f"write: {OUTPUT_UNWRITABLE}"
    hits = batch["error"].filter(pc.starts_with(batch["error"], marker).fill_null(False))
    return hits[0].as_py()[len(marker):] if len(hits) else None


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


def _engine(name: str) -> Engine:
    # Each engine loads what it needs: a local run never imports Ray.
    if name == "ray":
        from pipeline.restore.ray_engine import restore_batches
    else:
        from pipeline.restore.local_engine import restore_batches
    return restore_batches


def _ray_version() -> str | None:
    ray = sys.modules.get("ray")
    return ray.__version__ if ray is not None else None
