"""The HTTP CAS client (httpx): the project's CAS server (``fetcher.casserver``) over HTTP.

Batch endpoints where the server has them (``blobs:missing``, ``blobs:batch``,
``blobs:get``), a bearer token on every request (writes need it; reads too on a server
with a read token), TLS for ``https://`` URLs (``lazycaf.cas.tls``), refs with
compare-and-swap (``If-Match`` / ``If-None-Match``). Every blob it returns is verified
(``verify_blob``).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Final

import httpx
import trio

from lazycaf.cas.batch import BatchReader, Record, pack_batch, unpack_batch
from lazycaf.cas.bundle import MAX_BUNDLE_BLOBS, Bundle
from lazycaf.cas.bundlepart import PartReader
from lazycaf.cas.casdir import check_ref_name
from lazycaf.cas.gc import StoredBlob
from lazycaf.cas.refs import ANY, Expected
from lazycaf.cas.tls import certificate_failure, client_ssl_context
from lazycaf.core import framing
from lazycaf.core.digest import Digest
from lazycaf.core.errors import (
    AccessDenied,
    BlobNotFound,
    CasUnavailable,
    DigestMismatch,
    IntegrityError,
    LazyCafError,
    RefMoved,
    RefNotFound,
    TlsFailure,
    UsageError,
    first_error,
)
from lazycaf.core.verified import verify_blob

__all__ = ["MISSING_BATCH", "STREAM_RUN_BYTES", "Arrived", "HttpCAS"]

# ``stream_many_encoded``'s callback: records (digest, encoding, payload) as they arrive.
Arrived = Callable[[list[Record]], Awaitable[None]]
STREAM_RUN_BYTES: Final = 1 << 20  # hand records over once this much of them arrived
_FIRST_RUN: Final = 64 << 10  # a bundle part's first run (the first blobs a run waits for)
_DECODED_RUN: Final = 4 << 20  # runs of a compressed part, whose records are decoded bytes
# a part's stream is "near its end" (``stream_bundle``'s ``near_end``) once this much of it is
# left to come: about a round trip of bytes at 1-10 Gbit/s, so the next part's request can
# follow without sharing the link for long
NEAR_END_BYTES: Final = 512 << 10

MISSING_BATCH: Final = 4096


PUT_CONCURRENCY: Final = 8  # PUTs an HttpCAS keeps in flight (the server commits them as a group)


_DEFAULT_TIMEOUT: Final = httpx.Timeout(30.0, connect=5.0)


_BATCH_BODY: Final = 8 << 20


class _NoBatchEndpoint(Exception):
    """The server has no POST /v1/blobs:batch (an older server)."""


class HttpCAS:
    """Client of the HTTP CAS API v1 (httpx, pooled connections).

    Transport failures and 5xx answers become ``CasUnavailable`` naming the URL; every request
    is bounded by ``timeout``. Blobs travel as zstd frames (``Accept-Encoding: zstd``) and are
    decoded and verified here, never trusted.
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        timeout: httpx.Timeout = _DEFAULT_TIMEOUT,
        max_connections: int = 16,
        put_concurrency: int = PUT_CONCURRENCY,
        cacert: Path | None = None,
    ) -> None:
        self.where = url.rstrip("/")
        self._put_limiter = trio.CapacityLimiter(min(put_concurrency, max_connections))
        self._batch_supported = True
        headers = {"authorization": f"Bearer {token}"} if token else {}
        # the transport makes the connections, so it is the one that needs the context
        verify = client_ssl_context(cacert) if self.where.startswith("https://") else True
        self._client = httpx.AsyncClient(
            base_url=self.where,
            headers=headers,
            timeout=timeout,
            limits=httpx.Limits(max_connections=max_connections),
            transport=httpx.AsyncHTTPTransport(retries=2, verify=verify),
        )

    def _unavailable(self, exc: httpx.TransportError) -> CasUnavailable:
        reason = certificate_failure(exc)
        if reason is not None:
            return TlsFailure(self.where, reason)
        return CasUnavailable(self.where, f"{type(exc).__name__}: {exc}")

    def _refused(self, method: str, path: str, response: httpx.Response) -> AccessDenied:
        return AccessDenied(f"CAS {self.where} refused {method} {path}: {_detail(response)}")

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self._client.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise self._unavailable(exc) from exc
        self._check_status(response, method, path)
        return response

    def _check_status(self, response: httpx.Response, method: str, path: str) -> None:
        """Raise for a server that failed (5xx) or refused the client (401/403)."""
        if response.status_code >= 500:
            raise CasUnavailable(self.where, f"{method} {path}: HTTP {response.status_code}")
        if response.status_code in (401, 403):
            raise self._refused(method, path, response)

    async def has(self, digest: Digest) -> bool:
        r = await self._request("HEAD", f"/v1/blobs/{digest.hex}")
        return r.status_code == 200

    async def find_missing(self, digests: Sequence[Digest]) -> set[Digest]:
        missing: set[Digest] = set()
        unique = list(dict.fromkeys(digests))
        for start in range(0, len(unique), MISSING_BATCH):
            batch = [d.hex for d in unique[start : start + MISSING_BATCH]]
            r = await self._request("POST", "/v1/blobs:missing", json={"digests": batch})
            self._expect(r, "POST /v1/blobs:missing")
            missing.update(Digest.parse(h) for h in r.json()["missing"])
        return missing

    async def get_encoded(self, digest: Digest) -> tuple[framing.Encoding, bytes]:
        path = f"/v1/blobs/{digest.hex}"
        try:
            async with self._client.stream(
                "GET", path, headers={"accept-encoding": "zstd"}
            ) as response:
                if response.status_code == 404:
                    raise BlobNotFound(digest, self.where)
                if response.status_code >= 500:
                    raise CasUnavailable(self.where, f"GET {path}: HTTP {response.status_code}")
                if response.status_code in (401, 403):
                    await response.aread()
                    raise self._refused("GET", path, response)
                if response.status_code != 200:
                    raise CasUnavailable(self.where, f"GET {path}: HTTP {response.status_code}")
                payload = b"".join([chunk async for chunk in response.aiter_raw()])
                encoding = response.headers.get("content-encoding", framing.IDENTITY)
        except httpx.TransportError as exc:
            raise self._unavailable(exc) from exc
        if encoding not in (framing.IDENTITY, framing.ZSTD):
            raise IntegrityError(f"blob {digest}: unexpected content encoding {encoding!r}")
        return encoding, payload

    async def get(self, digest: Digest) -> bytes:
        encoding, payload = await self.get_encoded(digest)
        data = await trio.to_thread.run_sync(_decode_verify, digest, encoding, payload)
        return data

    async def put(self, digest: Digest, data: bytes) -> bool:
        encoded = await trio.to_thread.run_sync(framing.encode, data)
        return await self._put_encoded(digest, data, encoded)

    async def _put_encoded(
        self, digest: Digest, data: bytes, encoded: tuple[framing.Encoding, bytes]
    ) -> bool:
        encoding, payload = encoded
        headers = {"content-encoding": encoding} if encoding != framing.IDENTITY else {}
        r = await self._request("PUT", f"/v1/blobs/{digest.hex}", content=payload, headers=headers)
        if r.status_code == 400:
            # The server refuses what does not verify; name the mismatch as LocalCAS does.
            actual = await trio.to_thread.run_sync(Digest.of, data)
            if actual != digest:
                raise DigestMismatch(digest, actual)
            raise IntegrityError(f"CAS {self.where} refused blob {digest}: {_detail(r)}")
        self._expect(r, f"PUT blob {digest}")
        return r.status_code == 201

    async def put_many(self, items: Sequence[tuple[Digest, bytes]]) -> int:
        """PUT the blobs concurrently: at most ``put_concurrency`` in flight per client (shared
        by concurrent calls), so the server can commit them as a group. The first failure
        cancels the rest and is raised as it is (not wrapped in an exception group)."""
        batch = dict(items)
        if len(batch) < len(items):  # a repeated blob still has to verify
            for digest, data in items:
                if batch[digest] is not data:
                    await trio.to_thread.run_sync(digest.verify, data)
        # One thread hop encodes the batch (the per-blob hops of ``put`` add up).
        encoded = await trio.to_thread.run_sync(_encode_all, list(batch.values()))
        records = [(d, enc, payload) for d, (enc, payload) in zip(batch, encoded, strict=True)]
        if self._batch_supported:
            try:
                return await self._post_batches(records)
            except _NoBatchEndpoint:
                self._batch_supported = False  # an older server: one PUT per blob
        stored = 0

        async def put_one(digest: Digest, data: bytes, enc: tuple[framing.Encoding, bytes]) -> None:
            nonlocal stored
            async with self._put_limiter:
                new = await self._put_encoded(digest, data, enc)
            stored += new  # not ``stored += await ...``: that reads ``stored`` before awaiting

        try:
            async with trio.open_nursery() as nursery:
                for (digest, data), enc in zip(batch.items(), encoded, strict=True):
                    nursery.start_soon(put_one, digest, data, enc)
        except BaseExceptionGroup as group:
            leaf = first_error(group)
            if isinstance(leaf, LazyCafError):
                raise leaf from None
            raise
        return stored

    async def get_many_encoded(
        self, digests: Sequence[Digest]
    ) -> dict[Digest, tuple[framing.Encoding, bytes]]:
        """POST /v1/blobs:get: several blobs in one response (``lazycaf.cas.batch`` records).
        Against a server without it, one GET per blob, concurrently."""
        if self._batch_supported:
            body = json.dumps({"digests": [d.hex for d in digests]})
            r = await self._request(
                "POST", "/v1/blobs:get", content=body, headers={"content-type": "application/json"}
            )
            if r.status_code not in (404, 405):
                self._expect(r, "POST /v1/blobs:get")
                records = await trio.to_thread.run_sync(unpack_batch, r.content)
                return {d: (enc, payload) for d, enc, payload in records}  # type: ignore[misc]
            self._batch_supported = False
        out: dict[Digest, tuple[framing.Encoding, bytes]] = {}

        async def one(d: Digest) -> None:
            with contextlib.suppress(BlobNotFound):
                out[d] = await self.get_encoded(d)

        async with trio.open_nursery() as nursery:
            for d in digests:
                nursery.start_soon(one, d)
        return out

    async def stream_many_encoded(self, digests: Sequence[Digest], arrived: Arrived) -> None:
        """``get_many_encoded`` as the answer arrives: ``arrived`` gets the records parsed so
        far, in runs of at least ``STREAM_RUN_BYTES`` (or what is left at the end), while
        the rest is still on the wire. Blobs the store lacks are never handed over. Against
        a server without ``blobs:get``, one hand-over of everything."""
        if not self._batch_supported:
            got = await self.get_many_encoded(digests)
            await arrived([(d, enc, payload) for d, (enc, payload) in got.items()])
            return
        path = "/v1/blobs:get"
        body = json.dumps({"digests": [d.hex for d in digests]})
        try:
            async with self._client.stream(
                "POST", path, content=body, headers={"content-type": "application/json"}
            ) as r:
                if r.status_code in (404, 405):
                    self._batch_supported = False
                elif r.status_code >= 400:
                    await r.aread()
                    self._check_status(r, "POST", path)
                    self._expect(r, f"POST {path}")
                else:
                    await _hand_over(r, arrived)
                    return
        except httpx.TransportError as exc:
            raise self._unavailable(exc) from exc
        except UsageError as exc:  # the answer did not parse
            raise CasUnavailable(self.where, f"POST {path}: {exc}") from exc
        await self.stream_many_encoded(digests, arrived)  # the older server's way

    async def build_bundle(self, digests: Sequence[Digest]) -> Bundle:
        """``POST /v1/bundles``: the server builds and stores the bundle of ``digests`` from
        its own store (``lazycaf.cas.bundle``; a write: it needs the write token)."""
        body = json.dumps({"digests": [d.hex for d in digests[:MAX_BUNDLE_BLOBS]]})
        r = await self._request(
            "POST", "/v1/bundles", content=body, headers={"content-type": "application/json"}
        )
        self._expect(r, "POST /v1/bundles")
        try:
            return Bundle.from_json(r.json())
        except ValueError as exc:
            raise CasUnavailable(
                self.where, f"POST /v1/bundles: a malformed answer ({exc})"
            ) from None

    async def stream_bundle(
        self, digest: Digest, arrived: Arrived, near_end: Callable[[], None] | None = None
    ) -> None:
        """GET a bundle's part and hand its records to ``arrived`` as they come in (in runs of
        ``STREAM_RUN_BYTES``); the records are not verified here, each is on its own where
        it is stored. ``near_end`` is called once ``NEAR_END_BYTES`` or less of the part
        are left to arrive (by its Content-Length; without one, never). ``BlobNotFound``
        if the store lacks the part."""
        path = f"/v1/blobs/{digest.hex}"
        try:  # compressed already: ask for the part's bytes as they are
            async with self._client.stream(
                "GET", path, headers={"accept-encoding": "identity"}
            ) as r:
                if r.status_code == 404:
                    raise BlobNotFound(digest, self.where)
                if r.status_code != 200:
                    await r.aread()
                    self._check_status(r, "GET", path)
                    self._expect(r, f"GET {path}")
                await _hand_over(r, arrived, first=_FIRST_RUN, part=True, near_end=near_end)
        except httpx.TransportError as exc:
            raise self._unavailable(exc) from exc
        except UsageError as exc:  # the bundle did not parse
            raise IntegrityError(f"bundle {digest} from {self.where}: {exc}") from None

    async def _post_batches(self, records: Sequence[tuple[Digest, str, bytes]]) -> int:
        """POST /v1/blobs:batch in bodies of about ``_BATCH_BODY`` bytes, two at a time."""
        bodies: list[list[tuple[Digest, str, bytes]]] = [[]]
        size = 0
        for rec in records:
            if size + len(rec[2]) > _BATCH_BODY and bodies[-1]:
                bodies.append([])
                size = 0
            bodies[-1].append(rec)
            size += len(rec[2])
        stored = 0
        limiter = trio.CapacityLimiter(2)

        async def post(part: list[tuple[Digest, str, bytes]]) -> None:
            nonlocal stored
            async with limiter:
                body = await trio.to_thread.run_sync(pack_batch, part)
                r = await self._request("POST", "/v1/blobs:batch", content=body)
            if r.status_code in (404, 405):
                raise _NoBatchEndpoint
            if r.status_code == 400:
                raise IntegrityError(f"CAS {self.where} refused a blob batch: {_detail(r)}")
            self._expect(r, "POST /v1/blobs:batch")
            stored += int(r.json()["stored"])

        try:
            async with trio.open_nursery() as nursery:
                for part in bodies:
                    if part:
                        nursery.start_soon(post, part)
        except BaseExceptionGroup as group:
            leaf = first_error(group)
            if isinstance(leaf, LazyCafError | _NoBatchEndpoint):
                raise leaf from None
            raise
        return stored

    async def get_ref(self, name: str) -> Digest:
        check_ref_name(name)
        r = await self._request("GET", f"/v1/refs/{name}")
        if r.status_code == 404:
            raise RefNotFound(name, self.where)
        self._expect(r, f"GET ref {name!r}")
        return Digest.parse(r.text.strip())

    async def set_ref(self, name: str, digest: Digest, *, expected: Expected = ANY) -> None:
        check_ref_name(name)
        headers = {}
        if expected is None:
            headers["if-none-match"] = "*"
        elif isinstance(expected, Digest):
            headers["if-match"] = f'"{expected.hex}"'
        r = await self._request(
            "PUT", f"/v1/refs/{name}", content=digest.hex.encode(), headers=headers
        )
        if r.status_code == 412:
            found = r.headers.get("etag", "").strip('"') or "no ref"
            raise RefMoved(name, expected or "no ref", found)
        if r.status_code == 404:  # the server refuses a ref to a blob it does not hold
            raise BlobNotFound(digest, f"{self.where} (ref {name!r} must name a stored blob)")
        if r.status_code == 400:  # the name is valid here, so it conflicts with another ref
            raise UsageError(f"CAS {self.where} refused ref {name!r}: {_detail(r)}")
        self._expect(r, f"PUT ref {name!r}")

    def _expect(self, r: httpx.Response, what: str) -> None:
        if r.status_code >= 400:
            if r.status_code == 404:
                raise LazyCafError(f"CAS {self.where}: {what}: not found ({_detail(r)})")
            raise LazyCafError(f"CAS {self.where}: {what}: HTTP {r.status_code} {_detail(r)}")

    # -- store GC: not through the server ------------------------------------------------
    def _gc_refused(self) -> UsageError:
        return UsageError(
            f"{self.where}: gc and ref removal run against the store itself: use the "
            "server's directory or the s3:// address it serves"
        )

    async def list_blobs(self) -> list[StoredBlob]:
        raise self._gc_refused()

    async def delete_blobs(self, digests: Sequence[Digest]) -> int:
        raise self._gc_refused()

    async def list_refs(self) -> list[str]:
        return sorted(await self.read_refs())

    async def read_refs(self, prefix: str = "") -> dict[str, Digest]:
        r = await self._request("GET", "/v1/refs", params={"prefix": prefix})
        self._expect(r, "GET refs")
        try:
            refs = r.json()["refs"]
            return {check_ref_name(n): Digest.parse(h) for n, h in refs.items()}
        except (ValueError, KeyError, TypeError, AttributeError, UsageError) as exc:
            raise IntegrityError(f"CAS {self.where}: GET /v1/refs: bad answer ({exc})") from None

    async def delete_ref(self, name: str) -> None:
        raise self._gc_refused()

    async def aclose(self) -> None:
        await self._client.aclose()


def _detail(r: httpx.Response) -> str:
    return r.text.strip()[:200]


def _encode_all(blobs: list[bytes]) -> list[tuple[framing.Encoding, bytes]]:
    return [framing.encode(data) for data in blobs]


def _decode_verify(digest: Digest, encoding: str, payload: bytes) -> bytes:
    return verify_blob(digest, encoding, payload).data


async def _hand_over(
    response: httpx.Response,
    arrived: Arrived,
    *,
    first: int = 0,
    part: bool = False,
    near_end: Callable[[], None] | None = None,
) -> None:
    """Parse a ``blobs:get`` answer (or, ``part``, a bundle's part: ``lazycaf.cas.bundlepart``,
    its frames decompressed in a worker thread) as it arrives; hand records over in runs of
    ``STREAM_RUN_BYTES`` (a compressed part's, of decoded bytes, in runs of 4 MiB: about as
    many blobs a run, so as many stored with one thread hop), the first ones smaller when
    ``first`` says so (from ``first`` bytes, doubling): a run's first blob waits for the
    whole run. ``near_end``: see ``HttpCAS.stream_bundle``."""
    batch = BatchReader(max_record=framing.MAX_DECODED + (1 << 20))
    left = _content_length(response) if near_end is not None else None
    reader = PartReader() if part else None
    run: list[Record] = []
    size = 0
    limit = first or STREAM_RUN_BYTES

    async def parsed(chunk: bytes) -> list[Record]:
        if reader is None:
            return batch.feed(chunk)
        reader.feed(chunk)
        if not reader.ready:
            return []
        if reader.compressed:
            return await trio.to_thread.run_sync(reader.records)
        return reader.records()

    try:
        async for chunk in response.aiter_raw():
            if left is not None:
                left -= len(chunk)
                if left <= NEAR_END_BYTES and near_end is not None:
                    near_end()
                    left = None
            for record in await parsed(chunk):
                run.append(record)
                size += len(record[2])
                if size >= limit:
                    await arrived(run)
                    run, size = [], 0
                    cap = (
                        _DECODED_RUN
                        if reader is not None and reader.compressed
                        else STREAM_RUN_BYTES
                    )
                    limit = min(2 * limit, cap)
    except httpx.TransportError:
        if run:  # the whole records that arrived before the connection dropped are kept
            await arrived(run)
        raise
    (batch if reader is None else reader).finish()
    if run:
        await arrived(run)


def _content_length(response: httpx.Response) -> int | None:
    """The body's length as the server declared it (None: not declared or not a number)."""
    value = response.headers.get("content-length", "")
    return int(value) if value.isdigit() else None
