"""fsspec access at one boundary: filesystems with the job's retry policy, atomic writes.

Retries of transient S3 errors (5xx, throttling, dropped connections) are botocore's "standard"
mode: capped exponential backoff with jitter, bounded by ``storage.retries`` in the job config
(see :meth:`pipeline.config.StorageConfig.fsspec_options`). Permanent errors (403, 404, invalid
key) are not retried and reach the caller translated by s3fs into ``PermissionError``,
``FileNotFoundError`` or ``OSError``.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping

import fsspec
from fsspec.spec import AbstractFileSystem


def filesystem(uri: str, options: Mapping | None = None) -> tuple[AbstractFileSystem, str]:
    """The filesystem for ``uri`` (with the options for its protocol) and the path within it."""
    protocol = fsspec.core.split_protocol(uri)[0] or "file"
    fs, path = fsspec.core.url_to_fs(uri, **dict((options or {}).get(protocol, {})))
    if hasattr(fs, "retries"):
        # s3fs has a retry loop of its own around botocore's (a class attribute, not an
        # option); left on, it would multiply the configured bound.
        fs.retries = 1
    return fs, path


def read_bytes(uri: str, options: Mapping | None = None) -> bytes:
    fs, path = filesystem(uri, options)
    return fs.cat_file(path)


def write_bytes_atomic(uri: str, data: bytes, options: Mapping | None = None) -> None:
    """Write so that a reader never sees a partial object.

    Object stores publish a PUT whole, so a single write is atomic there; on file systems the
    data goes to a temporary name in the same directory and is renamed over the target.
    """
    fs, path = filesystem(uri, options)
    if not _is_local(fs):
        fs.pipe_file(path, data)
        return
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    tmp = f"{parent}/.tmp-{uuid.uuid4().hex}"
    try:
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, path)
    finally:
        if fs.exists(tmp):
            fs.rm(tmp)


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def _is_local(fs: AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols
