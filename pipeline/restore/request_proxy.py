"""An HTTP proxy in front of an S3-compatible server that records every request, and can add
a delay to each (a far region's round trip) or answer some with a fault (a subclass's
:meth:`RequestProxy.fault_for`). The request benchmark counts through it; tests inject faults.
"""

from __future__ import annotations

import http.client
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

_ERROR_XML = ('<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
              "<Message>injected {code}</Message></Error>")


class RequestProxy:
    """Forwards to ``upstream`` after ``delay_s``; ``requests`` lists (method, path and query)
    of each request in arrival order."""

    def __init__(self, upstream: str, delay_s: float = 0.0):
        self.upstream = urlsplit(upstream)
        self.delay_s = delay_s
        self.requests: list[tuple[str, str]] = []
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
                if proxy.delay_s:
                    time.sleep(proxy.delay_s)
                fault = proxy.fault_for(self.path)
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
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def fault_for(self, path: str):
        """The fault to answer a request for ``path`` with: None (forward it), ``"reset"``,
        or ``(status, code)``."""
        return None

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
