"""fsspec access at one boundary: filesystems with the job's retry policy, atomic writes.

Retries of transient S3 errors (5xx, throttling, dropped connections) are botocore's "standard"
mode: capped exponential backoff with jitter, bounded by ``storage.retries`` in the job config
(see :meth:`pipeline.config.StorageConfig.fsspec_options`). Permanent errors (403, 404, invalid
key) are not retried and reach the caller translated by s3fs into ``PermissionError``,
``FileNotFoundError`` or ``OSError``.
"""

from __future__ import annotations

import errno
import os
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import fsspec
from fsspec.spec import AbstractFileSystem

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Retry:
    """How a read that failed for a transient reason is tried again: ``attempts`` in all,
    waiting ``first_s``, then twice as long each time up to ``max_s``. Errors that say the
    object is missing or forbidden are not transient. ``sleep`` is the wait, for tests to
    replace. (botocore retries each request as well; this covers what gets past it: a reset
    connection mid-body, a storage hiccup while many actors start at once.)"""

    attempts: int = 4
    first_s: float = 0.5
    max_s: float = 8.0
    sleep: Callable[[float], None] = time.sleep

    def call(self, fn: Callable[..., R], *args) -> R:
        """``fn(*args)``, tried again after an ``OSError`` other than a missing or forbidden
        object, until ``attempts`` are spent; then the last error is raised."""
        for attempt in range(self.attempts):
            try:
                return fn(*args)
            except (FileNotFoundError, PermissionError):
                raise
            except OSError:
                if attempt == self.attempts - 1:
                    raise
                self.sleep(min(self.max_s, self.first_s * 2 ** attempt))
        raise AssertionError("attempts must be at least 1")


def protocol(uri: str) -> str:
    """The fsspec protocol of ``uri``; ``file`` for plain paths."""
    return fsspec.core.split_protocol(uri)[0] or "file"


def filesystem(uri: str, options: Mapping | None = None) -> tuple[AbstractFileSystem, str]:
    """The filesystem for ``uri`` (with the options for its protocol) and the path within it.

    The path is literal: ``::`` (fsspec's chaining), ``*``/``?``/``[`` (globbing) and anything
    else in a name stay part of the name, because ids and listed file names reach here.
    """
    name = protocol(uri)
    fs = fsspec.filesystem(name, **dict((options or {}).get(name, {})))
    path = fs._strip_protocol(uri)
    if hasattr(fs, "retries"):
        # s3fs has a retry loop of its own around botocore's (a class attribute, not an
        # option); left on, it would multiply the configured bound.
        fs.retries = 1
    return fs, path


# Requests a stage keeps in flight (its threads, and the S3 client's connection pool).
REQUESTS_IN_FLIGHT = 16


def each_concurrently(fn: Callable[[T], R], items: Sequence[T],
                      threads: int = REQUESTS_IN_FLIGHT) -> list[R | Exception]:
    """``fn(item)`` for each item, up to ``threads`` at a time, in order; where ``fn`` raised,
    its exception takes the result's place. Object-store requests spend their time waiting: a
    block's reads or writes issued together cost about one round trip, not one per image."""

    def call(item: T) -> R | Exception:
        try:
            return fn(item)
        except Exception as e:
            return e

    if len(items) <= 1:
        return [call(item) for item in items]
    with ThreadPoolExecutor(min(threads, len(items))) as pool:
        return list(pool.map(call, items))


def read_bytes(uri: str, options: Mapping | None = None) -> bytes:
    fs, path = filesystem(uri, options)
    return fs.cat_file(path)


def write_bytes_atomic(uri: str, data: bytes, options: Mapping | None = None) -> None:
    """Write so that a reader never sees a partial object.

    Object stores publish a PUT whole, so a single write is atomic there; on file systems the
    data goes to a temporary name in the same directory and is renamed over the target.
    """
    fs, path = filesystem(uri, options)
    if not is_local(fs):
        fs.pipe_file(path, data)
        return
    # os.replace lands exactly at path or fails (IsADirectoryError when a directory holds the
    # name); a move would put the file inside such a directory instead.
    _publish_local(path, data, os.replace)


def _publish_local(path: str, data: bytes, publish) -> None:
    """``data`` written whole to a temporary name beside ``path``, then given the name by
    ``publish(tmp, path)`` (a rename, or a hard link that fails if the name exists)."""
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".tmp-{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        publish(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def create_if_absent(uri: str, data: bytes, options: Mapping | None = None) -> None:
    """Write ``data`` at ``uri`` only if nothing is there, atomically: of two writers racing
    for one name exactly one succeeds, and a reader never sees a partial object.

    Local files: the data goes to a temporary name, then a hard link gives it the name, which
    fails if the name exists (POSIX ``link``, as Delta Lake and Iceberg commit on HDFS). S3: a
    PUT with ``If-None-Match: *`` (AWS since 2024; a store that ignores the header overwrites,
    see :mod:`pipeline.restore.lease` for how that is found out).

    Raises:
        FileExistsError: something is at ``uri`` already.
        NotImplementedError: the store has no create-if-absent this function knows.
    """
    fs, path = filesystem(uri, options)
    if is_local(fs):
        try:
            _publish_local(path, data, os.link)
        except OSError as e:
            if e.errno not in _NO_LINKS:
                raise
            _create_exclusive(path, data)
        return
    if protocol(uri) not in ("s3", "s3a"):
        raise NotImplementedError(f"no create-if-absent for {protocol(uri)}://")
    try:
        fs.pipe_file(path, data, mode="create")
    except FileExistsError:
        raise
    except OSError as e:
        if "Precondition" in str(e):  # s3fs names If-None-Match's 412 only when told which
            raise FileExistsError(str(e)) from e
        raise


# A file system without hard links (some FUSE and SMB mounts) says so with one of these.
_NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.ENOSYS}


def _create_exclusive(path: str, data: bytes) -> None:
    """``O_CREAT | O_EXCL``: as exclusive as a link, but a reader may see the file before its
    bytes are all in (the lease reads such a record as garbled, which is refused, never taken)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


# Errors of a write that every later write to the same output would meet as well.
_OUTPUT_WIDE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def is_output_wide(error: BaseException) -> bool:
    """Whether a failed write says the output as a whole cannot take writes (full disk, quota,
    read-only file system, no permission) rather than that one name cannot."""
    return isinstance(error, PermissionError) or (
        isinstance(error, OSError) and error.errno in _OUTPUT_WIDE_ERRNOS)


def check_writable(uri: str, options: Mapping | None = None) -> None:
    """Create and remove a probe object under ``uri``, so an unusable output fails before any
    work rather than on every row.

    Raises:
        OSError: with the reason (a file where a directory should be, no permission, ...).
    """
    probe = join(uri, f".write-probe-{uuid.uuid4().hex}")
    write_bytes_atomic(probe, b"", options)
    fs, path = filesystem(probe, options)
    fs.rm_file(path)


def list_files(fs: AbstractFileSystem, path: str, modified_after: float | None = None,
               exclude: str | None = None) -> list[str]:
    """Every file under ``path``, sorted; with ``modified_after`` (a POSIX time) only those
    modified later; nothing under ``exclude`` (a path in ``fs``). Local directories reached
    through symbolic links are followed (each real directory once, so a link loop ends), and
    ``exclude`` is compared by real path there: spelled with ``.``/``..`` or reached through a
    link, the same directory is the same."""
    if not is_local(fs):
        listed = _find_concurrently(fs, path)
        found = sorted(p for p, info in listed.items()
                       if modified_after is None or _mtime(info) > modified_after)
        if exclude:
            inside = exclude.rstrip("/") + "/"
            found = [p for p in found if not p.startswith(inside)]
        return found
    excluded = os.path.realpath(exclude) if exclude else None

    def is_excluded(real: str) -> bool:
        return excluded is not None and (real == excluded
                                         or real.startswith(excluded.rstrip(os.sep) + os.sep))

    found, seen = [], set()
    for root, dirs, files in os.walk(path, followlinks=True):
        real = os.path.realpath(root)
        if real in seen or is_excluded(real):
            dirs.clear()
            continue
        seen.add(real)
        found += [os.path.join(root, f) for f in files
                  if not (excluded and os.path.islink(os.path.join(root, f))
                          and is_excluded(os.path.realpath(os.path.join(root, f))))]
    if modified_after is not None:
        found = [p for p in found if os.stat(p).st_mtime > modified_after]
    return sorted(found)


def same_store(a: str, b: str) -> bool:
    """Whether two URIs name the same kind of store (``s3a://`` is ``s3://``, a plain path
    is ``file://``)."""
    aliases = {"s3a": "s3", "s3n": "s3", "local": "file"}
    return aliases.get(protocol(a), protocol(a)) == aliases.get(protocol(b), protocol(b))


def _find_concurrently(fs: AbstractFileSystem, path: str) -> dict[str, Mapping]:
    """``fs.find(path, detail=True)``, its first level's folders listed at once: an object
    store pages through one prefix a page after another (each page waits for the last one's
    continuation), but lists different prefixes side by side."""
    fs.invalidate_cache(path)  # s3fs keeps listings; a rerun in this process lists afresh
    try:
        top = fs.ls(path, detail=True)
    except FileNotFoundError:
        return {}
    if not isinstance(top, list) or not top:  # a single object: what find says of it
        return fs.find(path, detail=True)
    found = {entry["name"]: entry for entry in top if entry.get("type") != "directory"}
    folders = [entry["name"] for entry in top if entry.get("type") == "directory"]
    for listed in each_concurrently(lambda folder: fs.find(folder, detail=True), folders):
        if isinstance(listed, Exception):
            raise listed
        found.update(listed)
    return found


def _mtime(info: Mapping) -> float:
    """An object's modification time from fsspec's listing details (s3fs: LastModified)."""
    value = info.get("LastModified") or info.get("mtime") or info.get("last_modified")
    if value is None:
        return float("inf")  # unknown: list it rather than miss it
    return value.timestamp() if hasattr(value, "timestamp") else float(value)


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def is_local(fs: AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols
