"""The restore job's stages as plain functions over Arrow batches; Ray calls them, tests too.

Each stage turns every failure of a row into that row's ``status='error'`` with a reason that
names the stage, so a broken image never costs another row.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import torch

from pipeline import __version__, device_ops, image_metadata, imaging, safe_text, storage
from pipeline.inference import InferenceSettings, Restorer, resolve_device
from pipeline.models import build_model, read_checkpoint
from pipeline.restore import shard_input
from pipeline.restore.blocks import to_rows, to_table
from pipeline.restore.ledger import METRICS_SCHEMA
from pipeline.restore.manifest import output_key
from pipeline.restore.simulated_device import LOG_ENV, SimulatedDevice


@dataclass(frozen=True)
class StageContext:
    """What the CPU stages need; small and picklable, shipped to every task."""

    output_uri: str
    model: str
    checkpoint_sha256: str | None
    run_id: str
    output_format: str = "png"
    output_quality: int = 95
    output_png_level: int = 1
    settings_sha256: str | None = None  # see plan.output_settings_sha256
    limits: imaging.DecodeLimits = imaging.DEFAULT_LIMITS
    storage_options: Mapping = field(default_factory=dict)
    metadata: str = "keep"  # output.metadata
    background: tuple[int, int, int] = (255, 255, 255)  # output.background
    layout: str = "files"  # output.layout
    key_spread: int = 0  # output.key_spread
    image_column: str | None = None  # input.image_column, for Parquet datasets of images
    id_column: str | None = None  # input.id_column

    @property
    def provenance(self) -> image_metadata.Provenance:
        return image_metadata.Provenance(f"mimo-restore {__version__}", self.model,
                                         self.checkpoint_sha256, self.run_id)

    def image_uri(self, image_id: str) -> str:
        key = output_key(image_id) + imaging.EXTENSIONS[self.output_format]
        if self.key_spread:
            key = hashlib.sha256(image_id.encode()).hexdigest()[:self.key_spread] + "/" + key
        return storage.join(self.output_uri, "images", key)


# The reason of a write that failed for a reason the whole output shares (see storage).
OUTPUT_UNWRITABLE = "output unwritable: "


def _fail(row: dict, stage: str, error: BaseException | str) -> dict:
    reason = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    # An exception may quote a presigned URL or an endpoint with its credentials.
    row.update(status="error", error=f"{stage}: {safe_text.redact(reason)}", pixels=None)
    return row


def prepare(batch: pa.Table, ctx: StageContext) -> pa.Table:
    """Read (the block's reads at once) and decode each row; the thumbnail's pixels go on to the
    restoring actor, which upscales them on its device (a quarter of the 2x image's bytes
    between the stages)."""
    sources = batch.to_pylist()
    rows = [{"row": row["row"], "id": row["id"], "source_uri": row["source_uri"],
             "error": row.get("error"), "model": ctx.model, "run_id": ctx.run_id,
             "checkpoint_sha256": ctx.checkpoint_sha256,
             "settings_sha256": ctx.settings_sha256, "status": "ok"}
            for row in sources]
    for row in rows:
        if row["error"]:
            _fail(row, "manifest", row["error"])
    todo = [row for row in rows if row["status"] == "ok"]
    for row, read in zip(todo, _read_sources(todo, sources, ctx)):
        if isinstance(read, Exception):
            _fail(row, "read", read)
            continue
        data, row["members"], row["read_s"] = read
        row["bytes_in"] = len(data)
        try:
            t = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                image = imaging.read(data, ctx.limits)
            for w in caught:  # Pillow's (corrupt EXIF, say) would otherwise name no image
                warnings.warn(safe_text.redact(f"row {row['row']} ({row['source_uri']}): "
                                               f"{w.message}"),
                              w.category, stacklevel=1)
            h, w = image.rgb.shape[:2]
            row.update(decode_s=time.perf_counter() - t, in_height=h, in_width=w,
                       out_height=2 * h, out_width=2 * w, pixels=image.rgb,
                       alpha_plane=image.alpha, depth=image.depth,
                       **carried(image, ctx, (2 * w, 2 * h)))
        except Exception as e:
            _fail(row, "decode", e)
    return to_table(rows)


def _read_sources(rows: list[dict], sources: list[dict], ctx: StageContext) -> list:
    """Each row's ``(image bytes, carried members or None, seconds)``, or the exception that
    stopped it: image files a request each, all at once; a shard's samples (``sources``: the
    manifest's rows, with where each lies) one ranged read per shard."""
    where = {source["row"]: source for source in sources}
    by_shard: dict[str | None, list[dict]] = {}
    for row in rows:
        by_shard.setdefault(where[row["row"]].get("source_shard"), []).append(where[row["row"]])
    jobs = [(None, [source]) for source in by_shard.pop(None, [])] + list(by_shard.items())

    def read(job: tuple[str | None, list[dict]]) -> list[tuple]:
        t = time.perf_counter()
        shard, targets = job
        if shard is None:
            got = [(storage.read_bytes(targets[0]["source_uri"], ctx.storage_options), None)]
        elif shard.endswith(shard_input.PARQUET_SUFFIX):
            got = shard_input.read_parquet_block(shard, targets, ctx.storage_options,
                                                 ctx.image_column, ctx.id_column)
        else:
            got = shard_input.read_block(shard, targets, ctx.storage_options)
        share = (time.perf_counter() - t) / len(got)
        return [item if isinstance(item, Exception) else (item[0], item[1] or None, share)
                for item in got]

    results: dict[int, object] = {}
    for (_, targets), got in zip(jobs, storage.each_concurrently(read, jobs)):
        for i, target in enumerate(targets):
            results[target["row"]] = got if isinstance(got, Exception) else got[i]
    return [results[row["row"]] for row in rows]


def carried(image: imaging.Decoded, ctx: StageContext, size: tuple[int, int]) -> dict:
    """What the output of ``image`` embeds and the row records of it: alpha, colour, metadata
    (made true for the copy, under ``ctx.metadata``, with the copy's provenance) and depth."""
    carried = image_metadata.carry(image.blocks, ctx.metadata, size)
    blocks = {name: data for name, data in carried.blocks.items()
              if name in imaging.CARRIES[ctx.output_format]}
    dropped = image.notes + carried.dropped + [
        f"{name} ({ctx.output_format} output has no place for it)"
        for name in carried.blocks if name not in blocks]
    blocks["xmp"] = image_metadata.with_provenance(blocks.get("xmp"), ctx.provenance)
    alpha = ("none" if image.alpha is None else "kept" if ctx.output_format != "jpeg"
             else "flattened over #{:02x}{:02x}{:02x}".format(*ctx.background))
    return {"icc": image.icc, "blocks": blocks, "alpha": alpha,
            "colour_profile": image.profile, "colour": image.colour,
            "metadata_kept": [name for name in carried.kept if name in blocks],
            "metadata_dropped": dropped,
            "bit_depth": 16 if image.depth == 16 and ctx.output_format == "png" else 8}


def _pixels(row: dict, size: str = "out", column: str = "pixels") -> np.ndarray:
    """The row's pixels: the thumbnail (``size="in"``) before the actor, the restored image
    after it; ``column="alpha_plane"``: the thumbnail's alpha plane."""
    dtype = np.uint16 if row["depth"] == 16 else np.uint8
    shape = (row[f"{size}_height"], row[f"{size}_width"]) + ((3,) if column == "pixels" else ())
    return np.frombuffer(row[column], dtype).reshape(shape)


class RestoreActor:
    """One model replica; Ray Data keeps a pool of these and streams batches through them."""

    # How the actor's process ends after a fatal device error (see FATAL_DEVICE_ERRORS): at
    # once, without cleanup that would touch the broken CUDA context. Tests put their own.
    exit = staticmethod(os._exit)

    def __init__(self, model: str, checkpoint_uri: str | None, checkpoint_sha256: str | None,
                 device: str, settings: InferenceSettings, storage_options: Mapping,
                 threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        # Each actor reads the weights itself rather than taking them as a constructor argument,
        # so that Ray can restart it after a node loss; the sha256 proves it read the same file.
        checkpoint = (_read_checkpoint_retrying(checkpoint_uri, storage_options)
                      if checkpoint_uri else None)
        if checkpoint and checkpoint.sha256 != checkpoint_sha256:
            raise RuntimeError(f"checkpoint {checkpoint_uri} changed during the job: sha256 "
                               f"{checkpoint.sha256} != {checkpoint_sha256}")
        self.device = resolve_device(device)
        self.restorer = Restorer(build_model(model, checkpoint), self.device, settings)
        self.simulated = None
        if settings.simulated_rate:  # a benchmark's stand-in for the model's device work
            self.simulated = SimulatedDevice(settings.simulated_rate, os.environ.get(LOG_ENV))
            self.restorer.restore_stacks = (  # type: ignore[method-assign]
                self.simulated.restore_stacks)
        self.provenance = {"device": self.device.type, "precision": self.restorer.precision}

    async def __call__(self, batch: pa.Table) -> pa.Table:
        """Upscale each thumbnail 2x and measure it, restore, measure the result: all on the
        actor's device, so that the CPU tasks around it only decode, encode and move bytes.

        A coroutine, so that Ray Data runs the actor's calls (``max_concurrent_calls_per_actor``)
        interleaved on one event loop: while one block's work is on the device, the next
        block's host work (its rows, the copy in, the launch) and the last one's (results out,
        its table) go on. See "Overlap in the restoring actor" in docs/performance.md."""
        rows = to_rows(batch)
        todo = [r for r in rows if r["status"] == "ok"]
        try:
            await self._restore(todo)
        except Exception as e:
            _exit_if_device_is_broken(e, self.exit)
            # One bad image must not fail the batch: retry each on its own.
            for row in todo:
                try:
                    await self._restore([row])
                except Exception as e:
                    _exit_if_device_is_broken(e, self.exit)
                    _fail(row, "restore", e)
        return to_table(rows)

    def restore_block(self, batch: pa.Table) -> pa.Table:
        """One call outside an event loop (the local engine, tests): one block at a time."""
        return asyncio.run(self(batch))

    async def _restore(self, rows: list[dict]) -> None:
        """The rows' thumbnails to the device (their one crossing, all in one copy), 2x there,
        restored and measured, each shape's images together; the measures and the pixels come
        back in one transfer per dtype, waited for at a fence that lets the other calls run.
        The rows are changed only once all of it has worked."""
        if not rows:
            return
        started = time.perf_counter()
        groups, thumbs = device_ops.to_device_by_shape([_pixels(r, "in") for r in rows],
                                                       self.device)
        upscaled = [device_ops.upscale2x(stack) for stack in thumbs]
        restored = self.restorer.restore_stacks(upscaled)
        copy = device_ops.HostCopy([device_ops.sharpness_on_device(upscaled + restored),
                                    *restored])
        fence = self.simulated.fence() if self.simulated else device_ops.Fence(self.device)
        launched = time.perf_counter()
        await fence.reached()
        waited = time.perf_counter()
        measures, *stacks = copy.arrays()
        pixels = [image for stack in stacks for image in stack]
        order = [rows[i] for group in groups for i in group]
        share = (time.perf_counter() - started) / len(rows)
        for row, (lapvar_in, tenengrad_in), (lapvar_out, tenengrad_out), out in zip(
                order, measures[:len(rows)].tolist(), measures[len(rows):].tolist(), pixels):
            row.update(lapvar_in=lapvar_in, tenengrad_in=tenengrad_in, lapvar_out=lapvar_out,
                       tenengrad_out=tenengrad_out, pixels=out, restore_s=share,
                       **self.provenance)
        if self.simulated:
            self.simulated.log_host(launched - started + time.perf_counter() - waited,
                                    len(rows))


# After one of these the CUDA context is unusable: every later call would fail too, turning the
# rest of the queue into error rows. The actor's process exits instead; Ray starts a new one
# (a fresh context, possibly on another GPU) and retries the block, and a block that keeps
# killing its actor ends in the one-row-per-block pass, where only the culprit gets an error.
FATAL_DEVICE_ERRORS = ("illegal memory access", "illegal instruction", "device-side assert",
                       "uncorrectable ECC error", "unspecified launch failure",
                       "misaligned address", "CUDA error: an illegal", "cudaErrorLaunchFailure")


def is_fatal_device_error(error: BaseException) -> bool:
    return isinstance(error, RuntimeError) and any(m in str(error) for m in FATAL_DEVICE_ERRORS)


def _exit_if_device_is_broken(error: BaseException, exit: Callable[[int], None]) -> None:
    if is_fatal_device_error(error):
        print(f"restore actor: fatal device error, restarting: {error}", flush=True)
        exit(70)


# Many actors start at once and read the checkpoint together: a storage hiccup then is likely,
# and each actor's start is worth a longer wait than a ledger read.
CHECKPOINT_RETRY = storage.Retry(first_s=1.0, max_s=30.0)


def _read_checkpoint_retrying(uri: str, options: Mapping,
                              retry: storage.Retry = CHECKPOINT_RETRY):
    """The checkpoint, read again after a transient failure; a missing or forbidden file fails
    at once."""
    return retry.call(read_checkpoint, uri, options)


def _encode(row: dict, ctx: StageContext) -> bytes:
    rgb = _pixels(row)
    alpha = (None if row["alpha_plane"] is None
             else imaging.upscale_alpha(_pixels(row, "in", "alpha_plane")))
    if alpha is not None and ctx.output_format == "jpeg":
        rgb, alpha = imaging.flatten(rgb, alpha, ctx.background), None
    return imaging.encode(rgb, ctx.output_format, ctx.output_quality, ctx.output_png_level,
                          alpha=alpha, icc=row["icc"],
                          blocks={k: v for k, v in (row["blocks"] or {}).items() if v})


def finish(batch: pa.Table, ctx: StageContext) -> pa.Table:
    """The files layout: encode each restored image and write it as a file, atomically."""
    rows = to_rows(batch)
    _encode_rows(rows, ctx)
    _write_files(rows, ctx)
    now = datetime.now(timezone.utc)
    for row in rows:
        row["finished_at"] = now
    return to_table(rows, METRICS_SCHEMA)


# Between encoding and a shard's writer (pipeline.restore.shard_stream): a ledger row, its
# image encoded and the members its input sample carried.
ENCODED_SCHEMA = pa.schema([*METRICS_SCHEMA, pa.field("encoded", pa.binary()),
                            pa.field("members", pa.map_(pa.string(), pa.binary()))])


def encode(batch: pa.Table, ctx: StageContext) -> pa.Table:
    """The shard layouts: each restored image encoded, for a shard's writer to append; an
    image the block's task cannot encode is an error row here."""
    rows = to_rows(batch)
    _encode_rows(rows, ctx)
    for row in rows:
        if row["status"] == "ok":
            row["bytes_out"] = len(row["encoded"])
    return to_table(rows, ENCODED_SCHEMA)


def _encode_rows(rows: list[dict], ctx: StageContext) -> None:
    """Each ok row's image encoded into ``row["encoded"]``, its seconds in ``write_s``; a row
    whose image cannot be encoded fails."""
    for row in rows:
        if row["status"] == "ok":
            try:
                t = time.perf_counter()
                row["encoded"] = _encode(row, ctx)
                row["write_s"] = time.perf_counter() - t
            except Exception as e:
                _fail(row, "write", e)


def _write_files(rows: list[dict], ctx: StageContext) -> None:
    """Each encoded row's image written to its file (with what its sample carried beside it),
    all at once."""
    todo = [row for row in rows if row["status"] == "ok"]

    def write(row: dict) -> tuple[str, float]:
        uri = ctx.image_uri(row["id"])
        t = time.perf_counter()
        storage.write_bytes_atomic(uri, row["encoded"], ctx.storage_options)
        # A shard's sample's other members, beside the image: <id>.txt, <id>.json, ...
        stem = uri[:-len(imaging.EXTENSIONS[ctx.output_format])]
        for extension, member in _members(row).items():
            storage.write_bytes_atomic(f"{stem}.{extension}", member, ctx.storage_options)
        return uri, time.perf_counter() - t

    for row, written in zip(todo, storage.each_concurrently(write, todo)):
        if isinstance(written, Exception):
            fail_write(row, written)
            row["write_s"] = None  # nothing was written
        else:
            uri, write_s = written
            row.update(output_uri=uri, bytes_out=len(row["encoded"]),
                       write_s=row["write_s"] + write_s)


def _members(row: dict) -> dict[str, bytes]:
    """The members a shard's sample carried besides its image (as Arrow's map gives them)."""
    return dict(row.get("members") or ())


def fail_write(row: dict, error: BaseException) -> None:
    # A full disk or a lost permission fails every later row too: the driver stops the run on
    # this reason instead of turning the rest of the input into errors.
    _fail(row, "write", f"{OUTPUT_UNWRITABLE}{type(error).__name__}: {error}"
          if storage.is_output_wide(error) else error)
