"""A loopback HTTP proxy in front of the moto S3 server that fails chosen requests, for retry tests.

`FaultyS3Proxy(upstream_url, rule)` forwards every request to moto unchanged, except that `rule(method,
path)` may return a fault: an HTTP status to answer with (e.g. 503) or "reset" to drop the connection
after sending half of the real response. Faults are counted in `injected`.
"""

from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import urlparse

Rule = Callable[[str, str], "int | str | None"]


class FaultyS3Proxy:
    def __init__(self, upstream_url: str, rule: Rule) -> None:
        upstream = urlparse(upstream_url)
        self.rule = rule
        self.injected: list[tuple[str, str, int | str]] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                fault = proxy.rule(self.command, self.path)
                if isinstance(fault, int):
                    with proxy._lock:
                        proxy.injected.append((self.command, self.path, fault))
                    payload = b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>InternalError</Code><Message>injected</Message></Error>"
                    self.send_response(fault)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                connection = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                connection.request(self.command, self.path, body=body, headers=headers)
                response = connection.getresponse()
                data = response.read()
                self.send_response(response.status)
                for name, value in response.getheaders():
                    if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(name, value)
                # A HEAD answer has no body but must keep the object's real Content-Length.
                self.send_header("Content-Length", response.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data)))
                self.end_headers()
                if fault == "reset" and len(data) > 1:
                    with proxy._lock:
                        proxy.injected.append((self.command, self.path, fault))
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(data)
                connection.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> "FaultyS3Proxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


def fail_first(count: int, method: str, path_fragment: str, fault: int | str = 503) -> Rule:
    """A rule failing the first `count` requests of `method` whose path contains `path_fragment`."""
    seen = {"n": 0}
    lock = threading.Lock()

    def rule(request_method: str, path: str):
        if request_method != method or path_fragment not in path:
            return None
        with lock:
            seen["n"] += 1
            return fault if seen["n"] <= count else None

    return rule
