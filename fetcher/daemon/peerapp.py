"""The daemon's peer API: other hosts' daemons read this host's cache (ASGI, hypercorn/trio).

    GET  /v1/blobs/{hex}           the blob, from the cache; on a miss this daemon fetches it
                                   from the CAS first (it is the blob's home for the asker),
                                   once however many peers ask at the same time
    HEAD /v1/blobs/{hex}           200 with its size if cached, else 404 (never fetches)
    POST /v1/blobs:get             {"digests": [...]} (at most 1,024: 413 beyond; a malformed
                                   or too deeply nested body is a 400) -> those blobs
                                   (``lazycaf.cas.batch`` records, identity); missing ones are
                                   fetched from the CAS with one request first; ones no source
                                   has are left out
    GET  /v1/coverage/{manifest}   {"blobs", "bytes", "held_blobs", "held_bytes", "hot_*"}: how
                                   much of the executable this cache holds; ``?profile=NAME``
                                   adds that profile's hot set
    GET  /v1/peers                 this daemon's view of its peers (live, back-off, errors)
    GET  /v1/stats                 the fetch statistics (bytes by source, served to peers),
                                   the blob requests peers made here by priority, and the
                                   bytes those answers took on the wire
    GET  /metrics                  the daemon's Prometheus metrics (``fetcher.daemon.metrics``;
                                   the token applies to it too)

``X-LazyCAF-Priority: prefetch`` marks a request as prefetch; sending bodies takes a slot of
a ``PriorityGate`` where waiting demand requests always go before waiting prefetch ones, and
fetches on a miss use the service's slots of that priority. With a token, every request needs
``Authorization: Bearer <token>`` (peers share one). A blob this daemon fetched lately is
sent as the zstd frames the CAS sent (``fetcher.fetching.recent``), to askers that accept
zstd; others as the cache holds them, decoded. The askers verify everything.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict
from typing import Any, Final
from urllib.parse import parse_qs

import trio
from prometheus_client import CollectorRegistry

from fetcher.fetching.peersource import INSTANCE_HEADER, PRIORITY_HEADER
from fetcher.fetching.service import FetchService
from fetcher.peers import coverage
from fetcher.peers.peerset import PeerSet
from fetcher.web.asgi import (
    HttpError,
    Message,
    Receive,
    Scope,
    Send,
    accepts,
    answer_errors,
    check_bearer,
    digest_from,
    lifespan,
    read_digests,
    respond,
)
from fetcher.web.metrics import answer_metrics
from lazycaf.cas.batch import pack_batch
from lazycaf.cas.refs import check_ref_name
from lazycaf.core import framing
from lazycaf.core.digest import Digest
from lazycaf.core.errors import NotFound, Unavailable
from lazycaf.core.framing import IDENTITY
from lazycaf.core.manifest import Manifest
from lazycaf.core.priority import Priority
from lazycaf.traces.profiles import load_profile

__all__ = ["PeerApp", "PriorityGate"]

log = logging.getLogger(__name__)

_BLOBS: Final = "/v1/blobs/"
_COVERAGE: Final = "/v1/coverage/"
_MAX_BATCH: Final = 1024
_MAX_BATCH_BODY: Final = 192 << 20  # answers stay under what a PeerClient accepts (256 MiB)


class PriorityGate:
    """``capacity`` slots; a freed slot goes to the oldest waiting demand request, and only
    when none waits to the oldest waiting prefetch request. Invariant: ``_free`` plus the
    slots held equals ``capacity``."""

    def __init__(self, capacity: int) -> None:
        self._free = capacity
        self._waiting: dict[Priority, deque[trio.Event]] = {p: deque() for p in Priority}

    @contextlib.asynccontextmanager
    async def slot(self, priority: Priority) -> AsyncIterator[None]:
        ahead = self._waiting[Priority.DEMAND] if priority == Priority.PREFETCH else ()
        if self._free > 0 and not ahead and not self._waiting[priority]:
            self._free -= 1
        else:
            turn = trio.Event()
            self._waiting[priority].append(turn)
            try:
                await turn.wait()  # the releaser handed its slot to us
            except BaseException:
                if turn.is_set():
                    self._release()  # handed over as we were cancelled: pass it on
                else:
                    self._waiting[priority].remove(turn)
                raise
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        for priority in Priority:
            if self._waiting[priority]:
                self._waiting[priority].popleft().set()
                return
        self._free += 1


class PeerApp:
    def __init__(
        self,
        service: FetchService,
        peers: PeerSet,
        *,
        token: str | None = None,
        send_slots: int = 8,
        instance: str = "",
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.service = service
        self.registry = registry  # served on GET /metrics when given
        self.peers = peers
        self.instance = instance  # sent with every answer: askers recognise themselves
        self._token = token
        self._gate = PriorityGate(send_slots)
        self._disk = trio.CapacityLimiter(4)
        self.served = dict.fromkeys(Priority, 0)  # requests answered, by priority
        self.wire_bytes = 0  # bodies sent to peers (zstd frames where the CAS sent those)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        stamp = (INSTANCE_HEADER.encode(), self.instance.encode())

        async def stamped(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), stamp]}
            await send(message)

        await answer_errors(stamped, self._checked(scope, receive, stamped))

    async def _checked(self, scope: Scope, receive: Receive, send: Send) -> None:
        check_bearer(scope, self._token, "peers need a valid bearer token")
        await self._route(scope, receive, send)

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        method, path = scope["method"], scope["path"]
        priority = Priority.from_label(dict(scope["headers"]).get(PRIORITY_HEADER.encode()))
        if path.startswith(_BLOBS) and method in ("GET", "HEAD"):
            digest = digest_from(path[len(_BLOBS) :])
            if method == "HEAD":
                record = await trio.to_thread.run_sync(self.service.cache.index.get, digest)
                if record is None or not self.service.is_cached(digest):
                    raise NotFound(f"blob {digest} is not in this cache")
                await respond(send, 200, b"", head=True, length=record.size)
                return
            await self._get_blob(scope, send, digest, priority)
        elif path == "/v1/blobs:get" and method == "POST":
            await self._get_many(receive, send, priority)
        elif path.startswith(_COVERAGE) and method == "GET":
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            name = query.get("profile", [None])[0]
            result = await self._coverage(digest_from(path[len(_COVERAGE) :]), name)
            await respond(send, 200, json.dumps(result).encode(), "application/json")
        elif path == "/v1/peers" and method == "GET":
            body = json.dumps([asdict(s) for s in self.peers.statuses()])
            await respond(send, 200, body.encode(), "application/json")
        elif path == "/v1/stats" and method == "GET":
            requests = {
                "requests_demand": self.served[Priority.DEMAND],
                "requests_prefetch": self.served[Priority.PREFETCH],
                "wire_bytes_to_peers": self.wire_bytes,
                "recent_payloads": len(self.service.recent),
            }
            body = json.dumps(asdict(self.service.statistics()) | requests)
            await respond(send, 200, body.encode(), "application/json")
        elif path == "/metrics" and method == "GET" and self.registry is not None:
            await answer_metrics(send, self.registry)
        else:
            raise HttpError(404, f"no such endpoint: {method} {path}")

    async def _read(self, digest: Digest, priority: Priority) -> bytes:
        """The cached blob's bytes (``ensure`` ran). GC may evict it between the fetch and
        the read: then fetch once more."""
        for attempt in range(2):
            if attempt:
                await self.service.ensure(digest, priority=priority, for_peer=True)
            try:
                return await trio.to_thread.run_sync(
                    self.service.cache.path(digest).read_bytes, limiter=self._disk
                )
            except FileNotFoundError:
                continue
        raise Unavailable(f"blob {digest} was evicted while being served")

    async def _get_blob(self, scope: Scope, send: Send, digest: Digest, priority: Priority) -> None:
        """The blob as the CAS sent it here when that is still in memory (zstd frames) and
        the asker takes zstd, else its decoded bytes from the cache."""
        size = await self.service.ensure(digest, priority=priority, for_peer=True)
        recent = self.service.recent.get(digest)
        if recent is not None and accepts(
            dict(scope["headers"]).get(b"accept-encoding", b""), recent[0].encode()
        ):
            body, extra = recent[1], [(b"content-encoding", recent[0].encode())]
        else:
            body, extra = await self._read(digest, priority), []
        async with self._gate.slot(priority):
            await respond(send, 200, body, extra=extra)
        self.service.note_served_to_peer(1, size)
        self.wire_bytes += len(body)
        self.served[priority] += 1

    async def _get_many(self, receive: Receive, send: Send, priority: Priority) -> None:
        digests = await read_digests(
            receive, max_digests=_MAX_BATCH, max_body=1 << 20, limiter=self._disk
        )
        digests = list(dict.fromkeys(digests))
        await self.service.fetch_many(digests, priority=priority, for_peer=True, join=True)
        recent = {d: r for d in digests if (r := self.service.recent.get(d)) is not None}
        body, blobs, size = await trio.to_thread.run_sync(
            self._batch, digests, recent, limiter=self._disk
        )
        async with self._gate.slot(priority):
            await respond(send, 200, body)
        self.service.note_served_to_peer(blobs, size)
        self.wire_bytes += len(body)
        self.served[priority] += 1

    def _batch(
        self, digests: list[Digest], recent: dict[Digest, tuple[str, bytes]]
    ) -> tuple[bytes, int, int]:
        """The answer to a blobs:get (sync, a worker thread: it reads files and joins up to
        ~192 MiB): records of the CAS's frames where still in memory, else of the cached
        bytes; with how many blobs and how many decoded bytes it carries."""
        out: list[tuple[Digest, str, bytes]] = []
        size = decoded = 0
        for d in digests:
            if size > _MAX_BATCH_BODY:  # the asker fetches what is left out elsewhere
                break
            if d in recent:
                encoding, data = recent[d]
            else:
                try:
                    encoding, data = IDENTITY, self.service.cache.path(d).read_bytes()
                except FileNotFoundError:
                    continue
            out.append((d, encoding, data))
            size += len(data)
            decoded += framing.decoded_size(encoding, data)
        return pack_batch(out), len(out), decoded

    async def _coverage(self, manifest_digest: Digest, profile_name: str | None) -> dict[str, Any]:
        await self.service.ensure(manifest_digest)
        cache = self.service.cache
        data = await trio.to_thread.run_sync(cache.path(manifest_digest).read_bytes)
        name = f"manifest {manifest_digest}"
        manifest = await trio.to_thread.run_sync(lambda: Manifest.decode(data, name=name))
        profile = None
        if profile_name is not None:
            check_ref_name(f"profiles/{profile_name}")
            profile = await load_profile(self.service.cas, profile_name)
        has: Callable[[Digest], bool] = cache.has
        result = await trio.to_thread.run_sync(coverage.measure, manifest, has, profile)
        return {
            "manifest": manifest_digest.hex,
            "profile": profile_name if profile is not None else None,
            **asdict(result),
        }
