"""Planning a restore: the input's rows less those whose exact output the ledger already holds.

All of it is column-wise Arrow over the manifest and the ledger, with no Python object per row
and neither torch nor Ray imported: a dry run over millions of rows stays small and quick.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import storage
from pipeline.config import ConfigError, JobConfig
from pipeline.restore import manifest
from pipeline.restore.ledger import (
    LEDGER_SCHEMA,
    LedgerFormatError,
    newest_first,
    read_metrics,
)
from pipeline.restore.run_records import newest_run_record


@dataclass(frozen=True)
class OutputKey:
    """What makes an output file "this exact output": an image restored by this model and
    checkpoint with these output settings need not be restored again."""

    model: str
    checkpoint_sha256: str | None
    settings_sha256: str | None


@dataclass
class Plan:
    """What a run would do: the rows left, and how fast the output's last run went."""

    rows: pa.Table  # to do
    total: int  # rows in the input
    key: OutputKey
    run_id: str
    metrics_uri: str
    storage_options: Mapping = field(default_factory=dict)
    earlier_rate: float | None = None  # images/s of the newest earlier run, if any
    since: float | None = None  # the input listed only what was modified after this
    listed_at: float = 0.0  # when the input was listed: the next run's "since last"
    # The checkpoint file as read for its hash, so that the run checks it without reading again.
    checkpoint: bytes | None = field(default=None, repr=False)

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


def plan_restore(config: JobConfig, force: bool = False) -> Plan:
    """Read the input and the output's ledger and decide what is left to do; reads only.

    Raises:
        ManifestError: the input cannot be read.
        ConfigError: the checkpoint is missing, a directory or empty.
        ConfigError: the output's ledger cannot be read (after retries).
    """
    with _memory_returned():
        return _plan(config, force)


@contextlib.contextmanager
def _memory_returned():
    """Planning's scratch memory goes back to the system soon after it is freed. Arrow's default
    pool (mimalloc) keeps it mapped, so the steps' peaks stack up (docs/performance.md: a
    lower peak with jemalloc). Tables made here keep their pool; later work uses the default
    again."""
    try:
        pool = pa.jemalloc_memory_pool()
    except NotImplementedError:  # a pyarrow built without it
        yield
        return
    default = pa.default_memory_pool()
    pa.set_memory_pool(pool)
    try:
        yield
    finally:
        pa.set_memory_pool(default)


def _plan(config: JobConfig, force: bool) -> Plan:
    options = config.storage.fsspec_options()
    listed_at = time.time()
    since = _since(config, options)
    rows = manifest.load_rows(config.input.manifest, options, exclude=config.output.uri,
                              since=since, columns=(config.input.image_column,
                                                    config.input.id_column))
    checkpoint = _checkpoint_bytes(config.model.checkpoint, options)
    key = OutputKey(
        model=config.model.name, settings_sha256=output_settings_sha256(config),
        # The file's hash, not its parsed weights: planning needs no torch.
        checkpoint_sha256=hashlib.sha256(checkpoint).hexdigest() if checkpoint else None)
    metrics_uri = storage.join(config.output.uri, "metrics")
    try:
        ledger = read_metrics(metrics_uri, options, schema=LEDGER_SCHEMA)
    except (OSError, LedgerFormatError) as e:
        raise ConfigError(f"cannot read the output's ledger under {metrics_uri}: "
                          f"{e.__class__.__name__}: {e}") from e
    total = rows.num_rows
    return Plan(rows=against_ledger(rows, ledger, key, force), total=total, key=key,
                run_id=datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-"
                + uuid.uuid4().hex[:6],
                metrics_uri=metrics_uri, storage_options=options,
                earlier_rate=_latest_rate(ledger), since=since, listed_at=listed_at,
                checkpoint=checkpoint)


def _checkpoint_bytes(uri: str | None, options) -> bytes | None:
    """The checkpoint file's bytes (None without one).

    Raises:
        ConfigError: it is missing, a directory, empty or unreadable, naming it and the fix.
    """
    if not uri:
        return None
    fix = ("--checkpoint (or model.checkpoint) takes a checkpoint file: a .pt or .pth state "
           "dict, or the official MIMO-UNet .pkl")
    try:
        data = storage.read_bytes(uri, options)
    except IsADirectoryError:
        raise ConfigError(f"checkpoint {uri} is a directory; {fix}") from None
    except FileNotFoundError:
        raise ConfigError(f"checkpoint {uri} does not exist; {fix}") from None
    except OSError as e:
        raise ConfigError(f"checkpoint {uri} cannot be read ({e.__class__.__name__}: {e}); "
                          f"{fix}") from e
    if not data:
        raise ConfigError(f"checkpoint {uri} is empty (0 bytes: a copy that did not finish?); "
                          f"{fix}")
    return data


def against_ledger(rows: pa.Table, ledger: pa.Table, key: OutputKey,
                   force: bool = False) -> pa.Table:
    """``rows`` less those whose exact output exists (unless ``force``), and with an error for
    each row whose id already holds another source's restoration in this output.

    An id belongs to the source of its newest ``ok`` row: restoring a second source into it
    would overwrite the first, and a later run of the first manifest would then skip its row
    as done while the file holds the other picture. A row is done when its (id, source) is
    that owner and the item's newest row is ``ok`` with ``key``. Rows that already carry an
    error are kept, to get their error row again. "Newest" is by run order (run ids begin with
    the run's start on its driver), then by the row's own time.
    """
    if not ledger.num_rows:
        return rows
    owners = _owners(ledger, key)
    at = pc.index_in(rows["id"], value_set=owners["id"])
    owned = owners["ok"].take(at).fill_null(False)
    same = pc.and_(owned, _same_source(rows["source_uri"], owners["source_uri"], at))
    claimed = pc.and_(pc.and_(owned, pc.invert(same)), pc.is_null(rows["error"]))
    if pc.any(claimed).as_py():
        rows = _with_errors(rows, claimed, [
            f"id already holds the image restored from {source} in this output; give this "
            "row another id, or restore into another output"
            for source in owners["source_uri"].take(at.filter(claimed)).to_pylist()])
    if force:
        return rows
    done = pc.and_(same, owners["done"].take(at).fill_null(False))
    return rows.filter(pc.or_(pc.is_valid(rows["error"]), pc.invert(done)))


def _same_source(sources: pa.ChunkedArray, owners: pa.ChunkedArray, at: pa.ChunkedArray,
                 step: int = 256 * 1024) -> pa.Array:
    """``sources[i] == owners[at[i]]`` (False where ``at`` is null), a slice at a time: the
    owners' strings are never copied for all rows at once."""
    return pa.chunked_array([
        pc.equal(sources.slice(i, step), owners.take(at.slice(i, step))).fill_null(False)
        for i in range(0, len(sources), step)], pa.bool_())


def _owners(ledger: pa.Table, key: OutputKey) -> pa.Table:
    """One row per id of the ledger: ``id``; ``ok``, whether it has an ``ok`` row, and then
    ``source_uri``, its owner, and ``done``, whether the owner's newest row is ``ok`` with
    ``key``.

    Most ids appear once in a ledger; their one row says it all, at no copy. Only the ids with
    several rows (reruns, contested ids) are sorted by run order and grouped.
    """
    repeated = manifest.repeated_values(ledger["id"])
    singles = ledger
    if len(repeated):
        several = pc.is_in(ledger["id"], value_set=repeated)
        singles = ledger.filter(pc.invert(several))
    owners = pa.table({"id": singles["id"], "source_uri": singles["source_uri"],
                       "ok": pc.equal(singles["status"], "ok"), "done": _is_key(singles, key)})
    if not len(repeated):
        return owners
    return pa.concat_tables([owners, _owners_of_history(ledger.filter(several), key)])


def _owners_of_history(history: pa.Table, key: OutputKey) -> pa.Table:
    """:func:`_owners` for ids with several rows."""
    history = pa.table({
        "id": history["id"], "source_uri": history["source_uri"],
        "ok": pc.equal(history["status"], "ok"), "done": _is_key(history, key),
        "run_id": history["run_id"], "finished_at": history["finished_at"],
    })
    ordered = newest_first(history).append_column(
        "_i", pa.array(np.arange(history.num_rows, dtype=np.int64)))
    first = ordered.filter(ordered["ok"]).group_by("id", use_threads=False).aggregate(
        [("source_uri", "first"), ("done", "first"), ("_i", "first")])
    owners = pa.table({"id": first["id"], "source_uri": first["source_uri_first"],
                       "done": first["done_first"], "_i": first["_i_first"]})
    # The owner's item may have failed since its newest ok row: then it is not done.
    newest = ordered.group_by(["id", "source_uri"], use_threads=False).aggregate(
        [("_i", "first")])
    owners = owners.join(newest, keys=["id", "source_uri"])
    done = pc.and_(owners["done"], pc.equal(owners["_i"], owners["_i_first"]))
    return pa.table({"id": owners["id"], "source_uri": owners["source_uri"],
                     "ok": np.ones(owners.num_rows, dtype=bool), "done": done})


def _is_key(table: pa.Table, key: OutputKey) -> pa.ChunkedArray:
    """Rows that are ``ok`` and were made with ``key``."""

    def same(column: str, value: str | None) -> pa.ChunkedArray:
        if value is None:
            return pc.is_null(table[column])
        return pc.equal(table[column], value).fill_null(False)

    # Rows of releases before settings were recorded have none (ledger.LEGACY_NULLS): they
    # count as made with today's settings, as those releases' own reruns took them.
    settings = pc.or_(pc.is_null(table["settings_sha256"]),
                      same("settings_sha256", key.settings_sha256))
    return pc.and_(pc.and_(pc.equal(table["status"], "ok"), same("model", key.model)),
                   pc.and_(same("checkpoint_sha256", key.checkpoint_sha256),
                           settings)).fill_null(False)


def _with_errors(rows: pa.Table, where, reasons: list[str]) -> pa.Table:
    error = manifest.set_where(rows["error"], where, reasons)
    return rows.set_column(rows.schema.get_field_index("error"), "error", error)


def _latest_rate(ledger: pa.Table) -> float | None:
    """Rows per second of the newest earlier run in the ledger (first to last row written)."""
    if not ledger.num_rows:
        return None
    run_ids = pc.unique(ledger["run_id"]).cast(pa.string())
    newest = pc.max(run_ids).as_py()
    if newest is None:
        return None
    run = ledger["finished_at"].filter(pc.equal(ledger["run_id"], newest))
    span = pc.min_max(run).as_py()
    if not span["min"] or span["max"] <= span["min"]:
        return None
    return len(run) / (span["max"] - span["min"]).total_seconds()


def _since(config: JobConfig, options) -> float | None:
    """input.since as a POSIX time; "last" is when the newest run recorded under the output
    listed its input (None, so everything is listed, when there is none)."""
    since = config.input.since
    if since is None:
        return None
    if since == "last":
        run = newest_run_record(config.output.uri, options,
                                lambda r: bool(r.get("listed_at") or r.get("started_at")))
        if run is None:
            return None
        since = run.get("listed_at") or run["started_at"]
    when = datetime.fromisoformat(since)
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()


def output_settings_sha256(config: JobConfig) -> str:
    """A hash of the settings that change what is written for an image (format, quality,
    self-ensemble, precision, tiling, buckets, metadata, background, layout), so a rerun with other
    ones redoes the image instead of skipping it. Batch size, device, PNG level (lossless) and
    resources do not."""
    o, i = config.output, config.inference
    settings = {"format": o.format, "quality": o.quality if o.format != "png" else None,
                "self_ensemble": i.self_ensemble, "precision": i.precision, "tile": i.tile,
                "tile_overlap": i.tile_overlap,
                # auto hashes as 64, the fixed default before auto: what GPUs still use, and
                # outputs made with it stay done instead of being redone once.
                "bucket": 64 if i.bucket == "auto" else i.bucket}
    # Settings added later enter the hash only away from their defaults, so that outputs made
    # before them stay done (with --force redoing them; see LEGACY_NULLS in the ledger).
    # The layout too: a run into shards holds every image in shards, not some as files.
    for name, default in (("metadata", "keep"), ("background", "#ffffff"), ("layout", "files")):
        if getattr(o, name) != default:
            settings[name] = getattr(o, name)
    if i.simulated_rate:  # a benchmark's outputs are bicubic images, not restored ones
        settings["simulated_rate"] = i.simulated_rate
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
