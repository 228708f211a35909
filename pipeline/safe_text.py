"""Text the job writes where people or other programs read it: no credentials, no control codes.

Run records, reports, console lines and error reasons quote URLs, configs and exceptions, and any
of them may carry a credential: userinfo (``https://user:pass@host``), a token in a query string
(a presigned URL's ``X-Amz-Signature``), a storage option, or the value of a secret environment
variable that an exception message happens to echo. Redaction replaces each with ``***``.

Ids, keys and error messages come from the input; printed raw, an escape sequence in an S3 key
would drive the user's terminal. :func:`printable` escapes control characters.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from collections.abc import Iterator, Mapping

MASK = "***"

_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s?#]+@")
# Query parameters whose values are credentials: AWS presigned URLs, Azure SAS, OAuth, API keys.
# A name is a word after ? or &: base64 (an inlined image's data URI) has neither.
_QUERY_SECRET = re.compile(
    r"(?P<name>[?&](?:[\w.-]*?(?:sig|signature|token|secret|credential|password|passwd|"
    r"key|auth|session)[\w.-]*)=)[^&#\s\"'<>]+", re.IGNORECASE)
# Environment variables and storage options whose values are credentials.
_SECRET_NAME = re.compile(r"secret|token|passw|credential|session|(^|_)key(_id)?$|access_key",
                          re.IGNORECASE)
_MIN_SECRET = 6  # shorter values ("1", "true") would mask ordinary text


def secrets(options: Mapping | None = None, environ: Mapping | None = None) -> list[str]:
    """The credential values to mask: secret-named environment variables and storage options."""
    environ = os.environ if environ is None else environ
    found = {v for k, v in environ.items() if _SECRET_NAME.search(k)}

    def walk(value, name: str = "") -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk(v, str(k))
        elif isinstance(value, str) and _SECRET_NAME.search(name):
            found.add(value)

    walk(options or {})
    # Longest first, so that a secret containing another is masked whole.
    return sorted((s for s in found if len(s) >= _MIN_SECRET), key=len, reverse=True)


def redact(text: str, options: Mapping | None = None, known: list[str] | None = None) -> str:
    """``text`` with URL userinfo, credential query values and known secrets masked."""
    text = _USERINFO.sub(lambda m: m["scheme"] + MASK + "@", text)
    text = _QUERY_SECRET.sub(lambda m: m["name"] + MASK, text)
    for secret in secrets(options) if known is None else known:
        text = text.replace(secret, MASK)
    return text


def redact_obj(value, options: Mapping | None = None, known: list[str] | None = None):
    """Every string in ``value`` (dicts, lists, scalars) redacted; the rest as it was."""
    known = secrets(options) if known is None else known
    if isinstance(value, str):
        return redact(value, known=known)
    if isinstance(value, Mapping):
        return {k: redact_obj(v, known=known) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_obj(v, known=known) for v in value]
    return value


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_CONTROL_OR_NEWLINE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text: str, newlines: bool = True) -> str:
    """``text`` with control characters escaped (``\\x1b``), so that untrusted text cannot move
    the cursor, recolour or clear a terminal; newlines and tabs stay unless ``newlines`` is
    False (one field on one line)."""
    pattern = _CONTROL if newlines else _CONTROL_OR_NEWLINE
    return pattern.sub(lambda m: m[0].encode("unicode_escape").decode("ascii"), text)


def for_console(text: str, options: Mapping | None = None) -> str:
    """``text`` as the console may show it: redacted, control characters escaped."""
    return printable(redact(str(text), options))


class _ConsoleHandler(logging.Handler):
    """The library's log records as console lines, redacted and escaped: all on ``stream``
    ("stdout" or "stderr") when one is named, else notes to stdout and warnings to stderr.
    The stream is looked up at each line (a test captures it)."""

    def __init__(self, options: Mapping | None, stream: str | None):
        super().__init__(logging.INFO)
        self.options, self.stream = options, stream

    def emit(self, record: logging.LogRecord) -> None:
        name = self.stream or ("stderr" if record.levelno >= logging.WARNING else "stdout")
        print(for_console(record.getMessage(), self.options), file=getattr(sys, name),
              flush=True)


@contextlib.contextmanager
def console_logging(options: Mapping | None = None, level: int = logging.INFO,
                    stream: str | None = None) -> Iterator[None]:
    """While it lasts, the ``pipeline`` loggers' records of ``level`` and above reach the
    console (see :class:`_ConsoleHandler`); for the jobs' entrypoints."""
    logger = logging.getLogger("pipeline")
    handler, saved = _ConsoleHandler(options, stream), (logger.level, logger.propagate)
    handler.setLevel(level)
    logger.addHandler(handler)
    logger.setLevel(min(level, logging.INFO))
    logger.propagate = False  # Ray's or the user's root handlers would print each line again
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.level, logger.propagate = saved

