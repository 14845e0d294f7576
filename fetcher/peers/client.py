"""Asking another host's daemon for blobs (its peer API, ``fetcher.daemon.peerapp``), over httpx.

    GET  http://PEER/v1/blobs/{hex}   one blob; the peer pulls it from the CAS if it lacks it
    POST http://PEER/v1/blobs:get     several blobs in one body (``lazycaf.cas.batch`` records)

Requests carry ``X-LazyCAF-Priority: demand|prefetch`` (the peer serves reads before
prefetch) and the shared bearer token when there is one. Nothing a peer sends is trusted:
every blob is decoded and verified here, in a worker thread, and what does not verify is an
``IntegrityError`` naming the peer. Every request is bounded by ``timeout`` seconds in total,
so a peer that hangs or trickles costs at most that, and bodies are capped in size. Transport
failures, timeouts and unexpected answers are ``PeerUnavailable``; a 404 is ``BlobNotFound``
and a 503 ``HomeCouldNotFetch`` (the peer could not get the blob either).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Final

import httpx
import trio

from lazycaf.cas.batch import unpack_batch
from lazycaf.core import framing
from lazycaf.core.digest import Digest
from lazycaf.core.errors import BlobNotFound, IntegrityError, LazyCafError, PeerUnavailable

__all__ = ["INSTANCE_HEADER", "PRIORITY_HEADER", "HomeCouldNotFetch", "PeerClient", "PeerIsSelf"]

PRIORITY_HEADER: Final = "x-lazycaf-priority"
INSTANCE_HEADER: Final = "x-lazycaf-instance"  # a daemon's random id, on its peer answers
_MAX_BATCH_BODY: Final = 256 << 20  # what a peer may answer to one blobs:get
_MAX_BLOB_BODY: Final = framing.MAX_DECODED + (1 << 20)


class PeerIsSelf(PeerUnavailable):
    """The address answered with this daemon's own instance id."""


class HomeCouldNotFetch(PeerUnavailable):
    """The peer answered, but could not get the blob itself (a 503: its CAS failed): do not
    back it off, ask the CAS directly."""


class PeerClient:
    """One connection pool for all peers; use one client per priority so that demand
    requests never queue behind prefetch ones for a connection."""

    def __init__(
        self,
        *,
        priority: str,
        token: str | None = None,
        timeout: float = 5.0,
        max_connections: int = 64,
        verify_limiter: trio.CapacityLimiter | None = None,
        instance: str = "",
    ) -> None:
        self.priority = priority
        self.instance = instance  # this daemon's id: an answer carrying it came from itself
        self.timeout = timeout
        # zstd: a peer sends the CAS's frames of blobs it fetched lately
        # (``fetcher.fetching.recent``), decoded bytes otherwise; it never compresses for us.
        headers = {PRIORITY_HEADER: priority, "accept-encoding": "zstd"}
        if token:
            headers["authorization"] = f"Bearer {token}"
        self._client = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 2.0)),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
        )
        self._verify = verify_limiter or trio.CapacityLimiter(2)

    async def get(self, address: str, digest: Digest) -> bytes:
        """The blob's verified bytes from the peer at ``address``."""
        url = f"http://{address}/v1/blobs/{digest.hex}"
        status, encoding, payload = await self._exchange(address, "GET", url, _MAX_BLOB_BODY)
        if status == 404:
            raise BlobNotFound(digest, f"peer {address}")
        self._expect(address, status, payload, f"GET blob {digest}")
        return await self._verified(address, digest, encoding, payload)

    async def get_many(
        self, address: str, digests: Sequence[Digest]
    ) -> tuple[dict[Digest, bytes], IntegrityError | None]:
        """Verified bytes of the blobs the peer sent, and the first verification failure if
        some did not verify (those are left out: the caller fetches them elsewhere)."""
        url = f"http://{address}/v1/blobs:get"
        body = json.dumps({"digests": [d.hex for d in digests]}).encode()
        status, encoding, payload = await self._exchange(
            address,
            "POST",
            url,
            _MAX_BATCH_BODY,
            content=body,
            headers={"content-type": "application/json"},
        )
        self._expect(address, status, payload, f"POST blobs:get ({len(digests)} blobs)")
        if encoding != framing.IDENTITY:  # records carry their own encodings
            raise IntegrityError(f"peer {address} sent a batch as {encoding!r}")
        try:
            records = await trio.to_thread.run_sync(unpack_batch, payload)
        except LazyCafError as exc:
            raise IntegrityError(f"peer {address} sent a malformed batch: {exc}") from None
        wanted = set(digests)
        out: dict[Digest, bytes] = {}
        bad: IntegrityError | None = None
        for digest, record_encoding, data in records:
            if digest not in wanted:
                continue
            try:
                out[digest] = await self._verified(address, digest, record_encoding, data)
            except IntegrityError as exc:
                bad = bad or exc
        return out, bad

    async def _exchange(
        self, address: str, method: str, url: str, limit: int, **kwargs: Any
    ) -> tuple[int, str, bytes]:
        """One request, bounded by ``timeout`` in total; the raw body (never decoded by
        httpx: zstd frames go to ``framing``, whose caps hold) of at most ``limit`` bytes."""
        try:
            with trio.fail_after(self.timeout):
                async with self._client.stream(method, url, **kwargs) as response:
                    if self.instance and response.headers.get(INSTANCE_HEADER) == self.instance:
                        raise PeerIsSelf(address, "that address is this daemon")
                    parts: list[bytes] = []
                    size = 0
                    async for chunk in response.aiter_raw():
                        size += len(chunk)
                        if size > limit:
                            raise IntegrityError(
                                f"peer {address} sent more than {limit} bytes for {url}"
                            )
                        parts.append(chunk)
                    encoding = response.headers.get("content-encoding", framing.IDENTITY)
                    return response.status_code, encoding.strip().lower(), b"".join(parts)
        except trio.TooSlowError:
            raise PeerUnavailable(address, f"no answer within {self.timeout:g} s") from None
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise PeerUnavailable(address, f"{type(exc).__name__}: {exc}") from exc

    def _expect(self, address: str, status: int, body: bytes, what: str) -> None:
        if status == 200:
            return
        detail = body.decode("utf-8", "replace").strip()[:200]
        if status == 503:  # the peer is fine, it could not get the blob (its CAS failed)
            raise HomeCouldNotFetch(address, f"{what}: HTTP 503 {detail}")
        raise PeerUnavailable(address, f"{what}: HTTP {status} {detail}")

    async def _verified(self, address: str, digest: Digest, encoding: str, payload: bytes) -> bytes:
        if encoding not in (framing.IDENTITY, framing.ZSTD):
            raise IntegrityError(f"peer {address} sent blob {digest} as {encoding!r}")
        try:
            return await trio.to_thread.run_sync(
                _decode_verify, digest, encoding, payload, limiter=self._verify
            )
        except IntegrityError as exc:
            raise IntegrityError(f"peer {address}: {exc}") from None

    async def aclose(self) -> None:
        await self._client.aclose()


def _decode_verify(digest: Digest, encoding: str, payload: bytes) -> bytes:
    data = framing.decode(encoding, payload, what=f"blob {digest}")
    digest.verify(data)
    return data
