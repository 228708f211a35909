"""An HTTP proxy in front of the S3 server that injects faults into chosen requests and records
every request it forwards or answers."""

from __future__ import annotations

import http.client
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

_ERROR_XML = ('<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
              "<Message>injected {code}</Message></Error>")


class FaultProxy:
    """Forwards to ``upstream``; a request whose path contains a rule's marker gets its faults.

    ``rules`` maps a path marker to a list of faults served to the first matching requests, in
    order, after which requests pass: ``(503, "SlowDown")``, ``(500, "InternalError")``,
    ``(403, "AccessDenied")`` or ``"reset"`` (the connection is closed without an answer).
    A rule whose list ends with ``...`` repeats its last fault forever.
    """

    def __init__(self, upstream: str):
        self.upstream = urlsplit(upstream)
        self.rules: dict[str, list] = {}
        self.hits: Counter = Counter()
        self.requests: list[tuple[str, str]] = []  # (method, path and query), in arrival order
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with proxy._lock:
                    proxy.requests.append((self.command, self.path))
                fault = proxy._fault_for(self.path)
                if fault == "reset":
                    self.close_connection = True
                    self.connection.close()
                    return
                if fault is not None:
                    status, code = fault
                    payload = _ERROR_XML.format(code=code).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                headers["Host"] = proxy.upstream.netloc
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                # a HEAD answer states the object's length without carrying it
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _fault_for(self, path: str):
        for marker, faults in self.rules.items():
            if marker in path:
                self.hits[marker] += 1
                if not faults:
                    return None
                if faults[-1] is Ellipsis:
                    return faults[0] if len(faults) == 2 else faults.pop(0)
                return faults.pop(0)
        return None

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
