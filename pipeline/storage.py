"""fsspec access at one boundary: read, atomic write, listing, retries of transient errors."""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import fsspec
from fsspec.spec import AbstractFileSystem

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """Capped exponential backoff with full jitter for transient storage errors."""

    attempts: int = 5
    base_delay_s: float = 0.2
    max_delay_s: float = 5.0

    def delay(self, attempt: int) -> float:
        return random.uniform(0, min(self.max_delay_s, self.base_delay_s * 2**attempt))


NO_RETRY = RetryPolicy(attempts=1)

# Errors that say the request itself is wrong; retrying them only delays the error row.
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
              ValueError)


def is_transient(error: BaseException) -> bool:
    """True for errors worth retrying: timeouts, connection resets, 5xx and throttling."""
    if isinstance(error, _PERMANENT):
        return False
    if isinstance(error, (TimeoutError, ConnectionError)):
        return True
    text = str(error).lower()
    return isinstance(error, OSError) and any(
        marker in text
        for marker in ("slowdown", "throttl", "internalerror", "serviceunavailable", "503",
                       "500", "timeout", "connection", "reset")
    )


def with_retries(fn: Callable[[], T], policy: RetryPolicy) -> T:
    """Call ``fn`` and retry transient errors under ``policy``; re-raise the last error."""
    for attempt in range(policy.attempts):
        try:
            return fn()
        except Exception as e:
            if attempt + 1 >= policy.attempts or not is_transient(e):
                raise
            time.sleep(policy.delay(attempt))
    raise AssertionError("unreachable")


def filesystem(uri: str, options: Mapping | None = None) -> tuple[AbstractFileSystem, str]:
    """The filesystem for ``uri`` and the path within it."""
    protocol = fsspec.core.split_protocol(uri)[0] or "file"
    fs, path = fsspec.core.url_to_fs(uri, **dict((options or {}).get(protocol, {})))
    return fs, path


def read_bytes(uri: str, options: Mapping | None = None, policy: RetryPolicy = NO_RETRY) -> bytes:
    fs, path = filesystem(uri, options)
    return with_retries(lambda: fs.cat_file(path), policy)


def write_bytes_atomic(
    uri: str, data: bytes, options: Mapping | None = None, policy: RetryPolicy = NO_RETRY
) -> None:
    """Write so that a reader never sees a partial object.

    Object stores publish a PUT whole, so a single write is atomic there; on file systems the
    data goes to a temporary name in the same directory and is renamed over the target.
    """
    fs, path = filesystem(uri, options)
    if _is_local(fs):
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
        return
    with_retries(lambda: fs.pipe_file(path, data), policy)


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def _is_local(fs: AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols
