"""A peer daemon that misbehaves, for the peer tests: an HTTP server on 127.0.0.1 answering
the peer API's blob requests wrongly.

Modes: ``corrupt`` answers the right length of wrong bytes, ``hang`` never answers,
``die`` announces the whole body and closes halfway, ``garbage`` sends a body that is not
even a batch. ``requests`` (when given) collects the paths it was asked for.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any, ClassVar

from lazycaf.cas.batch import pack_batch
from lazycaf.core.digest import Digest

__all__ = ["MODES", "BadPeer", "serve_bad_peer"]

MODES = ("corrupt", "hang", "die", "garbage")


class BadPeer(http.server.BaseHTTPRequestHandler):
    mode: ClassVar[str] = "corrupt"
    hang_seconds: ClassVar[float] = 30.0
    requests: ClassVar[list[str] | None] = None
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _body(self) -> bytes:
        if self.mode == "garbage":
            return b"\x00\x01 nothing a peer should send"
        if self.path.startswith("/v1/blobs/"):
            return os.urandom(3000)
        length = int(self.headers.get("content-length", 0))
        digests = [Digest.parse(h) for h in json.loads(self.rfile.read(length))["digests"]]
        return pack_batch([(d, "identity", os.urandom(2500)) for d in digests])

    def _answer(self) -> None:
        if self.requests is not None:
            self.requests.append(self.path)
        body = self._body()
        if self.mode == "hang":
            time.sleep(self.hang_seconds)
            self.close_connection = True
            return
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        if self.mode == "die":
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self.wfile.write(body)

    do_GET = _answer
    do_POST = _answer


@contextlib.contextmanager
def serve_bad_peer(
    mode: str, *, requests: list[str] | None = None, hang_seconds: float = 30.0
) -> Iterator[str]:
    """A ``BadPeer`` of ``mode`` on a free port; yields its ``HOST:PORT``."""
    assert mode in MODES, mode
    attrs = {"mode": mode, "requests": requests, "hang_seconds": hang_seconds}
    handler = type(f"BadPeer_{mode}", (BadPeer,), attrs)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
