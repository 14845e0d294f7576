"""The HTTP API, v1, as an ASGI app served by hypercorn on trio.

CAS role (``lazycaf cas serve``) over a ``ServedStore`` (``fetcher.casserver.served``: a
local directory, or an S3 bucket that any number of frontends share):

    GET  /v1/blobs/{hex}     the blob (Range supported; zstd frames when the client accepts)
    HEAD /v1/blobs/{hex}     200 with its decoded size in content-length, or 404
    PUT  /v1/blobs/{hex}     store (verified; idempotent: 201 new, 200 already there); answered
                             once the blob is durable (on a directory, concurrent PUTs share
                             one syncfs: ``fetcher.casserver.groupcommit``)
    POST /v1/blobs:missing   {"digests": [hex, ...]} -> {"missing": [hex, ...]}; at most
                             100,000 digests (413 beyond)
    POST /v1/blobs:get       {"digests": [...]} -> those blobs in one body (``lazycaf.cas.batch``);
                             at most 1,024 digests (413 beyond)
    POST /v1/blobs:batch     many blobs in one body (``lazycaf.cas.batch``); all or nothing
    POST /v1/bundles         {"digests": [...]} -> {"parts": [{"digest": hex, "blobs": [hex, ...],
                             "bytes": n}, ...]}: those blobs stored as a bundle's parts
                             (``lazycaf.cas.bundle``), built here from the store; at most 8,192
                             digests (413 beyond); a write
    GET  /v1/refs?prefix=P   {"refs": {name: hex, ...}}: every ref whose name starts with P
                             (``profiles/``: every profile, for crowd prefetch)
    GET  /v1/refs/{name}     the manifest digest a ref names (text)
    PUT  /v1/refs/{name}     set a ref (the blob must be stored); ``If-Match: "<hex>"`` /
                             ``If-None-Match: *`` make it a compare-and-swap (412 and the
                             current digest as ETag when the ref moved)
    GET  /v1/stats           request and byte counters (for tests and operators)

Writes need ``Authorization: Bearer <token>`` when the server has a token; with a read
token, reads (blob GET/HEAD, ``blobs:missing``, ``blobs:get``, ref GET, stats) need it or
the write token (a writer reads too: pack asks ``blobs:missing``). A path that is not a
well-formed digest or ref name is a 400; nothing outside the store is ever served. A disk
that fails while storing is a 503. Without a read token reads are open to anyone, so what a
request may cost is bounded: bodies by size, digest lists by count, and large JSON bodies
are parsed (and large answers encoded) in worker threads, never on the event loop that
serves the others.
"""

from __future__ import annotations

import contextlib
import json
import logging
import urllib.parse
from collections.abc import Awaitable
from dataclasses import asdict, dataclass
from typing import Final

import trio

from fetcher.casserver.metrics import CasMetrics
from fetcher.casserver.served import MAX_UPLOAD, ServedStore
from fetcher.web.asgi import (
    PARSE_INLINE,
    HttpError,
    Receive,
    Scope,
    Send,
    accepts,
    answer_errors,
    check_bearer,
    digest_from,
    lifespan,
    read_body,
    read_digests,
    respond,
)
from lazycaf.cas.batch import pack_batch, unpack_batch
from lazycaf.cas.bundle import MAX_BUNDLE_BLOBS, Bundle, assemble, store_parts
from lazycaf.cas.refs import ANY, Expected
from lazycaf.core import framing
from lazycaf.core.digest import Digest
from lazycaf.core.errors import RefMoved

__all__ = ["CasApp", "CasStatistics"]

log = logging.getLogger(__name__)

MAX_BODY: Final = MAX_UPLOAD
MAX_MISSING: Final = 100_000  # digests per blobs:missing (the client sends 4,096)
MAX_GET: Final = 1024  # digests per blobs:get
_BUILDS: Final = 2  # bundles built at once (each holds up to 2 x 256 MiB while it is built)
_BUNDLES_REMEMBERED: Final = 64  # bundles built lately, by digest list (a job saves at once)
_DIGESTS_BODY: Final = 16 << 20  # a body of MAX_MISSING digests is ~6.7 MB
_BLOBS: Final = "/v1/blobs/"
_REFS: Final = "/v1/refs/"
_READ_POSTS: Final = frozenset({"/v1/blobs:missing", "/v1/blobs:get"})


@dataclass
class CasStatistics:
    blob_gets: int = 0
    blob_heads: int = 0
    blob_puts: int = 0
    blobs_stored: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    missing_queries: int = 0


class CasApp:
    """ASGI app of the CAS role over ``store``, whose background service (a directory's group
    committer) runs for the app's ASGI lifespan."""

    def __init__(
        self, store: ServedStore, *, token: str | None = None, read_token: str | None = None
    ) -> None:
        self.store = store
        self._token = token
        self._read_token = read_token
        self._parse = trio.CapacityLimiter(2)  # threads parsing or encoding large JSON
        self.stats = CasStatistics()
        self._bundling: dict[Digest, trio.Event] = {}  # builds in progress, by digest list
        self._bundles: dict[Digest, Bundle] = {}  # built lately, by digest list
        self._builds = trio.CapacityLimiter(_BUILDS)
        self.metrics = CasMetrics(self)  # its registry: ``lazycaf cas serve --metrics-listen``

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            # The lifespan call lasts as long as the server: it hosts the store's service.
            async with trio.open_nursery() as nursery:
                await nursery.start(self.store.run)
                await lifespan(receive, send)
                nursery.cancel_scope.cancel()
            return
        if scope["type"] != "http":
            return

        def handle(sending: Send) -> Awaitable[None]:
            return answer_errors(sending, self._route(scope, receive, sending))

        await self.metrics.measure(scope, send, handle)

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        method, path = scope["method"], scope["path"]
        if self._read_token is not None and (method in ("GET", "HEAD") or path in _READ_POSTS):
            self._check_read_token(scope)
        if path.startswith(_BLOBS):
            digest = digest_from(path[len(_BLOBS) :])
            if method in ("GET", "HEAD"):
                await self._get_blob(scope, send, digest, head=method == "HEAD")
            elif method == "PUT":
                self._check_token(scope)
                await self._put_blob(scope, receive, send, digest)
            else:
                raise HttpError(405, f"{method} not allowed on blobs")
        elif path == "/v1/blobs:missing" and method == "POST":
            await self._missing(receive, send)
        elif path == "/v1/blobs:get" and method == "POST":
            await self._get_many(receive, send)
        elif path == "/v1/blobs:batch" and method == "POST":
            self._check_token(scope)
            await self._put_batch(receive, send)
        elif path == "/v1/bundles" and method == "POST":
            self._check_token(scope)
            await self._bundle(receive, send)
        elif path == "/v1/refs" and method == "GET":
            await self._list_refs(scope, send)
        elif path.startswith(_REFS):
            name = path[len(_REFS) :]
            if method == "GET":
                digest = await self.store.read_ref(name)
                await respond(send, 200, digest.hex.encode() + b"\n")
            elif method == "PUT":
                self._check_token(scope)
                text = (await read_body(receive, 1024)).decode("ascii", "replace").strip()
                if not Digest.is_hex(text):
                    raise HttpError(400, f"a ref names a blob digest, got {text[:80]!r}")
                try:
                    await self.store.write_ref(name, Digest.parse(text), expected=_expected(scope))
                except RefMoved as exc:
                    found = await self.store.ref_or_none(name)
                    etag = [(b"etag", f'"{found.hex}"'.encode())] if found else []
                    raise HttpError(412, str(exc), headers=etag) from None
                await respond(send, 200, b"ok\n")
            else:
                raise HttpError(405, f"{method} not allowed on refs")
        elif path == "/v1/stats" and method == "GET":
            stats = {**asdict(self.stats), "commit_rounds": self.store.commit_rounds()}
            await respond(send, 200, json.dumps(stats).encode(), "application/json")
        else:
            raise HttpError(404, f"no such endpoint: {method} {path}")

    def _check_token(self, scope: Scope) -> None:
        check_bearer(scope, self._token, "writes need a valid bearer token")

    def _check_read_token(self, scope: Scope) -> None:
        refusal = "reads need a valid bearer token"
        if self._token is not None:  # the write token reads too
            with contextlib.suppress(HttpError):
                check_bearer(scope, self._token, refusal)
                return
        check_bearer(scope, self._read_token, refusal)

    async def _get_blob(self, scope: Scope, send: Send, digest: Digest, *, head: bool) -> None:
        if head:
            size = await self.store.size(digest)
            self.stats.blob_heads += 1
            await respond(send, 200, b"", head=True, length=size)
            return
        encoding, payload = await self.store.read_encoded(digest)
        headers = dict(scope["headers"])
        accepts_zstd = accepts(headers.get(b"accept-encoding", b""), b"zstd")
        range_header = headers.get(b"range")
        self.stats.blob_gets += 1
        if encoding == framing.ZSTD and accepts_zstd and range_header is None:
            self.stats.bytes_sent += len(payload)
            await respond(send, 200, payload, extra=[(b"content-encoding", b"zstd")])
            return
        data = await trio.to_thread.run_sync(framing.decode, encoding, payload)
        if range_header is None:
            self.stats.bytes_sent += len(data)
            await respond(send, 200, data)
            return
        start, end = _parse_range(range_header.decode("latin-1"), len(data))
        part = data[start:end]
        self.stats.bytes_sent += len(part)
        content_range = f"bytes {start}-{end - 1}/{len(data)}".encode()
        await respond(send, 206, part, extra=[(b"content-range", content_range)])

    async def _put_blob(self, scope: Scope, receive: Receive, send: Send, digest: Digest) -> None:
        self.stats.blob_puts += 1
        body = await read_body(receive, MAX_BODY)
        self.stats.bytes_received += len(body)
        raw_encoding = dict(scope["headers"]).get(b"content-encoding", b"identity")
        encoding = raw_encoding.decode("latin-1").strip().lower()  # codings ignore case
        stored = await self.store.put_encoded(digest, encoding, body)
        self.stats.blobs_stored += int(stored)
        await respond(send, 201 if stored else 200, b"stored\n" if stored else b"exists\n")

    async def _list_refs(self, scope: Scope, send: Send) -> None:
        query = urllib.parse.parse_qs(scope.get("query_string", b"").decode("latin-1"))
        prefix = query.get("prefix", [""])[0]
        refs = await self.store.read_refs(prefix)
        body = json.dumps({"refs": {name: d.hex for name, d in refs.items()}}).encode()
        await respond(send, 200, body, "application/json")

    async def _get_many(self, receive: Receive, send: Send) -> None:
        """Several blobs in one response, as stored (zstd frames or raw); absent ones are
        left out. For prefetching many small blobs with one request."""
        digests = await self._digests(receive, MAX_GET)
        records = await self.store.read_many(digests)
        self.stats.blob_gets += len(records)
        if sum(len(r[2]) for r in records) > PARSE_INLINE:  # a copy of megabytes: not here
            body = await trio.to_thread.run_sync(pack_batch, records)
        else:
            body = pack_batch(records)
        self.stats.bytes_sent += len(body)
        await respond(send, 200, body)

    async def _put_batch(self, receive: Receive, send: Send) -> None:
        """Many blobs in one request: all verified and staged first (one bad blob refuses the
        whole batch), then published with one syncfs."""
        body = await read_body(receive, MAX_BODY)
        self.stats.bytes_received += len(body)
        records = unpack_batch(body)
        self.stats.blob_puts += len(records)
        stored = await self.store.put_batch(records)
        self.stats.blobs_stored += stored
        reply = json.dumps({"received": len(records), "stored": stored}).encode()
        await respond(send, 200, reply, "application/json")

    async def _bundle(self, receive: Receive, send: Send) -> None:
        """Build the bundle of the digests asked for from this store, store it, and say what
        it holds. Requests for the same list at once share one build (its waiters build
        again if it failed); builds run ``_BUILDS`` at a time (each holds its parts in
        memory, up to twice ``MAX_BUNDLE_BYTES``)."""
        digests = await self._digests(receive, MAX_BUNDLE_BLOBS)
        key = Digest.of(b"".join(d.raw for d in digests))
        while True:
            while (waiting := self._bundling.get(key)) is not None:
                await waiting.wait()
            bundle = self._bundles.get(key)
            if bundle is not None:
                if not await self.store.find_missing([p.digest for p in bundle.parts]):
                    break
                self._bundles.pop(key, None)  # collected since (the store GC runs apart)
                continue
            done = self._bundling[key] = trio.Event()
            try:
                async with self._builds:
                    parts = await assemble(self.store.read_many, digests)
                    bundle = await store_parts(parts, self._put_identity)
                self._bundles[key] = bundle
                while len(self._bundles) > _BUNDLES_REMEMBERED:
                    del self._bundles[next(iter(self._bundles))]
            finally:
                if self._bundling.get(key) is done:
                    del self._bundling[key]
                done.set()
            break
        reply = await trio.to_thread.run_sync(_json_body, bundle.to_json(), limiter=self._parse)
        await respond(send, 200, reply, "application/json")

    async def _put_identity(self, digest: Digest, body: bytes) -> None:
        stored = await self.store.put_encoded(digest, framing.IDENTITY, body)
        self.stats.blobs_stored += int(stored)  # not ``+= await``: that reads it before

    async def _missing(self, receive: Receive, send: Send) -> None:
        self.stats.missing_queries += 1
        digests = await self._digests(receive, MAX_MISSING)
        missing = await self.store.find_missing(digests)
        if len(missing) > 1000:
            body = await trio.to_thread.run_sync(_missing_body, missing, limiter=self._parse)
        else:
            body = _missing_body(missing)
        await respond(send, 200, body, "application/json")

    async def _digests(self, receive: Receive, max_digests: int) -> list[Digest]:
        return await read_digests(
            receive, max_digests=max_digests, max_body=_DIGESTS_BODY, limiter=self._parse
        )


def _json_body(obj: object) -> bytes:
    return json.dumps(obj).encode()


def _missing_body(missing: list[Digest]) -> bytes:
    return json.dumps({"missing": [d.hex for d in missing]}).encode()


def _expected(scope: Scope) -> Expected:
    """The compare-and-swap condition of a ref PUT: ``If-Match: "<hex>"`` (the ref must hold
    that digest) or ``If-None-Match: *`` (it must not exist yet); neither: unconditional."""
    headers = dict(scope["headers"])
    if headers.get(b"if-none-match", b"").strip() == b"*":
        return None
    match = headers.get(b"if-match")
    if match is None:
        return ANY
    text = match.decode("latin-1").strip().strip('"')
    if not Digest.is_hex(text):
        raise HttpError(400, f"If-Match wants a quoted blob digest, got {text[:80]!r}")
    return Digest.parse(text)


def _parse_range(header: str, size: int) -> tuple[int, int]:
    """One ``bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` range as [start, end)."""
    unit, _, spec = header.partition("=")
    first, dash, last = spec.strip().partition("-")
    try:
        if unit.strip() != "bytes" or not dash or "," in spec:
            raise ValueError
        if first == "":
            start, end = max(size - int(last), 0), size
        else:
            start = int(first)
            end = min(int(last) + 1, size) if last else size
    except ValueError:
        raise HttpError(400, f"unsupported Range header {header!r}") from None
    if start >= end:
        raise HttpError(
            416,
            f"range {header!r} not satisfiable for {size} bytes",
            headers=[(b"content-range", f"bytes */{size}".encode())],
        )
    return start, end
