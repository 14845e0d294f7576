"""The ASGI toolkit the HTTP servers share (the CAS server and the daemon's peer API).

Serving an app on an already bound socket with hypercorn on trio, reading bounded bodies,
answering with a status and a body, mapping the project's errors to statuses in one place
(``answer_errors``), bearer tokens compared in constant time, Accept-Encoding, digests from
URL paths, and ``{"digests": [hex, ...]}`` bodies (``read_digests``: capped in size and in
count, parsed in a worker thread when large, so one big or deeply nested body never stalls
the other requests nor ends in a 500), and TLS for a server (``ServerTls``: hypercorn's
certfile and keyfile, checked before the socket serves).
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import socket
import ssl
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from lazycaf.core.digest import Digest
from lazycaf.core.errors import IntegrityError, LazyCafError, NotFound, UsageError

__all__ = [
    "PARSE_INLINE",
    "HttpError",
    "Message",
    "Receive",
    "Scope",
    "Send",
    "ServerTls",
    "accepts",
    "answer_errors",
    "bind_socket",
    "check_bearer",
    "digest_from",
    "lifespan",
    "parse_digests",
    "read_body",
    "read_digests",
    "respond",
    "serve_app",
    "server_tls",
]

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

PARSE_INLINE: Final = 64 << 10  # bodies up to this size are parsed on the event loop


class HttpError(Exception):
    def __init__(
        self, status: int, message: str, *, headers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or []


async def answer_errors(send: Send, handler: Awaitable[None]) -> None:
    """Await ``handler``; answer the errors it raises with one status line each: its own
    for an ``HttpError``, 404 not found, 400 bad input or bytes, 503 anything unavailable."""
    try:
        await handler
    except HttpError as exc:
        await respond(send, exc.status, (str(exc) + "\n").encode(), extra=exc.headers)
    except NotFound as exc:
        await respond(send, 404, (str(exc) + "\n").encode())
    except (IntegrityError, UsageError) as exc:
        await respond(send, 400, (str(exc) + "\n").encode())
    except LazyCafError as exc:
        await respond(send, 503, (str(exc) + "\n").encode())


def check_bearer(scope: Scope, token: str | None, refusal: str) -> None:
    """Raise a 401 ``HttpError`` saying ``refusal`` unless the request carries ``token``
    (no token configured: every request passes)."""
    if token is None:
        return
    auth = dict(scope["headers"]).get(b"authorization", b"")
    scheme, _, credentials = auth.partition(b" ")
    # The scheme is case-insensitive (RFC 9110 11.1); the token is compared in constant time.
    if scheme.lower() != b"bearer" or not hmac.compare_digest(credentials.strip(), token.encode()):
        raise HttpError(401, refusal)


def digest_from(text: str) -> Digest:
    if not Digest.is_hex(text):
        raise HttpError(400, f"not a blob digest: {text[:80]!r}")
    return Digest.parse(text)


def accepts(header: bytes, coding: bytes) -> bool:
    """Whether an Accept-Encoding value accepts ``coding`` (``zstd;q=0`` refuses it)."""
    wildcard: bool | None = None
    for item in header.lower().split(b","):
        name, *params = (part.strip() for part in item.split(b";"))
        q = 1.0
        for param in params:
            key, _, value = param.partition(b"=")
            if key.strip() == b"q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if name == coding:
            return q > 0
        if name == b"*":
            wildcard = q > 0
    return bool(wildcard)


async def read_body(receive: Receive, limit: int, *, hint: str = "") -> bytes:
    """The whole request body; past ``limit`` bytes a 413 (``hint`` says what fits)."""
    parts: list[bytes] = []
    total = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise HttpError(400, "client disconnected")
        chunk = message.get("body", b"")
        total += len(chunk)
        if total > limit:
            raise HttpError(413, f"body larger than {limit} bytes{hint}")
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


async def read_digests(
    receive: Receive, *, max_digests: int, max_body: int, limiter: trio.CapacityLimiter
) -> list[Digest]:
    """The digests of a ``{"digests": [hex, ...]}`` body: a 400 for anything else (a body
    nested too deep included), a 413 past ``max_body`` bytes or ``max_digests`` digests.
    A body above ``PARSE_INLINE`` bytes is parsed in a thread under ``limiter``."""
    hint = f" (at most {max_digests} digests per request)"
    body = await read_body(receive, max_body, hint=hint)
    if len(body) <= PARSE_INLINE:
        return parse_digests(body, max_digests)
    digests: list[Digest] = await trio.to_thread.run_sync(
        parse_digests, body, max_digests, limiter=limiter
    )
    return digests


def parse_digests(body: bytes, max_digests: int) -> list[Digest]:
    """``read_digests``'s parsing (sync: it runs in a thread for large bodies)."""
    expected = 'expected {"digests": [hex, ...]}'
    try:
        hexes = json.loads(body)["digests"]
        if not isinstance(hexes, list):
            raise TypeError(f"digests is a {type(hexes).__name__}, not a list")
    except RecursionError:  # the C decoder's depth limit: not worth a traceback and a 500
        raise HttpError(400, f"{expected}: JSON nested too deeply") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise HttpError(400, f"{expected}: {str(exc)[:200]}") from None
    if len(hexes) > max_digests:
        raise HttpError(413, f"at most {max_digests} digests per request, got {len(hexes)}")
    try:
        return [Digest.parse(h) for h in hexes]
    except UsageError as exc:
        raise HttpError(400, f"{expected}: {exc}") from None


async def respond(
    send: Send,
    status: int,
    body: bytes,
    content_type: str = "application/octet-stream",
    *,
    extra: list[tuple[bytes, bytes]] | None = None,
    head: bool = False,
    length: int | None = None,
) -> None:
    """Send one response. A HEAD answer sends no body; ``length`` is then the content-length
    a GET would have (when known)."""
    headers = [(b"content-type", content_type.encode())]
    if not head or length is not None:
        size = len(body) if length is None else length
        headers.append((b"content-length", str(size).encode()))
    headers.extend(extra or [])
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else body})


async def lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def bind_socket(listen: str) -> socket.socket:
    """A listening TCP socket for ``HOST:PORT`` (port 0 picks a free one)."""
    host, sep, port_text = listen.rpartition(":")
    if not sep or not port_text.isdigit():
        raise UsageError(f"--listen wants HOST:PORT, got {listen!r}")
    host = host.strip("[]") or "127.0.0.1"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, int(port_text)))
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {listen}: {exc.strerror}") from exc
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


@dataclass(frozen=True)
class ServerTls:
    """A server certificate (chain, PEM) and its private key, known to load together."""

    cert: Path
    key: Path


def server_tls(cert: Path | None, key: Path | None) -> ServerTls | None:
    """The TLS files of ``--tls-cert``/``--tls-key`` (None when neither is given), loaded
    once here so that a wrong path, a key that does not match or a file that is not PEM is a
    ``UsageError`` naming the files, not a traceback when the first client connects."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise UsageError("--tls-cert and --tls-key go together")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except ssl.SSLError as exc:  # an OSError too: first
        raise UsageError(
            f"--tls-cert {cert} and --tls-key {key} do not load as a PEM certificate and "
            f"its key: {exc.reason or exc}"
        ) from exc
    except OSError as exc:
        where = exc.filename or f"{cert} / {key}"
        raise UsageError(f"cannot read TLS file {where}: {exc.strerror}") from exc
    return ServerTls(cert.absolute(), key.absolute())


async def serve_app(
    app: Any,
    sock: socket.socket,
    *,
    tls: ServerTls | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on an already bound socket until cancelled; over TLS with ``tls``.

    Hypercorn closes the socket it serves when it stops, so it gets a duplicate of ``sock``'s
    descriptor: ``sock`` stays the caller's to close.
    """
    config = Config()
    if tls is not None:
        config.certfile = str(tls.cert)
        config.keyfile = str(tls.key)
    config.bind = [f"fd://{os.dup(sock.fileno())}"]
    config.accesslog = None
    config.errorlog = log
    config.keep_alive_timeout = 75
    config.h11_max_incomplete_size = 64 * 1024
    config.workers = 1
    await serve(app, config, mode="asgi", task_status=task_status)  # type: ignore[arg-type]
