"""A service waits at start for a registry started alongside it (compose, a pod restarted with it)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from streamml.registry import Registry
from streamml.settings import Settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def answering(port: int, status: int) -> Iterator[list[str]]:
    """An HTTP server on 127.0.0.1:port answering every GET with `status` (and `[]`); the paths it got."""
    paths: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            paths.append(self.path)
            body = b"[]" if status == 200 else b'{"error_code": %d, "message": "no"}' % status
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield paths
    finally:
        server.shutdown()
        server.server_close()


def registry(port: int) -> Registry:
    settings = Settings(schema_registry_url=f"http://127.0.0.1:{port}", _env_file=None)  # type: ignore[call-arg]
    return Registry(settings, timeout_s=2.0)


def test_waits_for_a_registry_that_comes_up_later() -> None:
    port = free_port()
    later: dict[str, list[str]] = {}
    up = threading.Event()

    def start_later() -> None:
        time.sleep(0.6)
        with answering(port, 200) as paths:
            later["paths"] = paths
            up.wait(10)

    thread = threading.Thread(target=start_later)
    thread.start()
    try:
        began = time.monotonic()
        assert registry(port).wait_ready(20.0, pause_s=0.1)
        assert time.monotonic() - began >= 0.5
        assert any(p.startswith("/subjects") for p in later["paths"])
    finally:
        up.set()
        thread.join()


def test_gives_up_after_its_timeout_when_nothing_answers() -> None:
    began = time.monotonic()
    assert not registry(free_port()).wait_ready(0.5, pause_s=0.1)
    assert time.monotonic() - began < 10


def test_an_answer_that_is_not_a_server_error_counts_as_up() -> None:
    """A 401 is the registry answering: registration then reports why, waiting longer would not help."""
    port = free_port()
    with answering(port, 401):
        assert registry(port).wait_ready(0.0)
    port = free_port()
    with answering(port, 503):
        assert not registry(port).wait_ready(0.3, pause_s=0.1)
