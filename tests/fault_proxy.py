"""An HTTP proxy in front of the S3 server that injects faults into chosen requests (and, as
every RequestProxy, records each request)."""

from __future__ import annotations

from collections import Counter

from pipeline.restore.request_proxy import RequestProxy


class FaultProxy(RequestProxy):
    """Forwards to ``upstream``; a request whose path contains a rule's marker gets its faults.

    ``rules`` maps a path marker to a list of faults served to the first matching requests, in
    order, after which requests pass: ``(503, "SlowDown")``, ``(500, "InternalError")``,
    ``(403, "AccessDenied")`` or ``"reset"`` (the connection is closed without an answer).
    A rule whose list ends with ``...`` repeats its last fault forever.
    """

    def __init__(self, upstream: str):
        super().__init__(upstream)
        self.rules: dict[str, list] = {}
        self.hits: Counter = Counter()

    def fault_for(self, path: str):
        for marker, faults in self.rules.items():
            if marker in path:
                self.hits[marker] += 1
                if not faults:
                    return None
                if faults[-1] is Ellipsis:
                    return faults[0] if len(faults) == 2 else faults.pop(0)
                return faults.pop(0)
        return None

