"""Asking another host's daemon for blobs (its peer API, ``fetcher.peerapp``), over httpx.

    GET  http://PEER/v1/blobs/{hex}   one blob; the peer pulls it from the CAS if it lacks it
    POST http://PEER/v1/blobs:get     several blobs in one body (``lazycaf.batch`` records)

Requests carry ``X-LazyCAF-Priority: demand|prefetch`` (the peer serves reads before
prefetch) and the shared bearer token when there is one. Nothing a peer sends is trusted:
every blob is decoded and verified here, in a worker thread, and what does not verify is an
``IntegrityError`` naming the peer. Every request is bounded by ``timeout`` seconds in total,
so a peer that hangs or trickles costs at most that. Transport failures, timeouts and
unexpected answers are ``PeerUnavailable``; a 404 is ``BlobNotFound`` (the peer could not
get the blob either).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Final

import httpx
import trio

from lazycaf import framing
from lazycaf.batch import unpack_batch
from lazycaf.digest import Digest
from lazycaf.errors import BlobNotFound, IntegrityError, PeerUnavailable

__all__ = ["PRIORITY_HEADER", "PeerClient"]

PRIORITY_HEADER: Final = "x-lazycaf-priority"
_MAX_BATCH_BODY: Final = 256 << 20


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
    ) -> None:
        self.priority = priority
        self.timeout = timeout
        # zstd: a peer sends the CAS's frames of blobs it fetched lately (``fetcher.recent``),
        # decoded bytes otherwise; it never compresses anything for us.
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
        try:
            with trio.fail_after(self.timeout):
                async with self._client.stream("GET", url) as response:
                    if response.status_code == 404:
                        raise BlobNotFound(digest, f"peer {address}")
                    # raw: zstd frames are decoded (and capped) by framing, not by httpx
                    payload = b"".join([chunk async for chunk in response.aiter_raw()])
                    self._expect(address, response, f"GET blob {digest}", payload)
                    encoding = response.headers.get("content-encoding", framing.IDENTITY)
        except trio.TooSlowError:
            raise PeerUnavailable(address, f"no answer within {self.timeout:g} s") from None
        except httpx.TransportError as exc:
            raise PeerUnavailable(address, f"{type(exc).__name__}: {exc}") from exc
        return await self._verified(address, digest, encoding, payload)

    async def get_many(
        self, address: str, digests: Sequence[Digest]
    ) -> tuple[dict[Digest, bytes], IntegrityError | None]:
        """Verified bytes of the blobs the peer sent, and the first verification failure if
        some did not verify (those are left out: the caller fetches them elsewhere)."""
        url = f"http://{address}/v1/blobs:get"
        body = json.dumps({"digests": [d.hex for d in digests]}).encode()
        response = await self._send(
            address, "POST", url, content=body, headers={"content-type": "application/json"}
        )
        self._expect(address, response, f"POST blobs:get ({len(digests)} blobs)")
        try:
            records = await trio.to_thread.run_sync(unpack_batch, response.content)
        except IntegrityError as exc:
            raise IntegrityError(f"peer {address} sent a malformed batch: {exc}") from None
        wanted = set(digests)
        out: dict[Digest, bytes] = {}
        bad: IntegrityError | None = None
        for digest, encoding, payload in records:
            if digest not in wanted:
                continue
            try:
                out[digest] = await self._verified(address, digest, encoding, payload)
            except IntegrityError as exc:
                bad = bad or exc
        return out, bad

    async def _send(self, address: str, method: str, url: str, **kwargs: object) -> httpx.Response:
        try:
            with trio.fail_after(self.timeout):
                return await self._client.request(method, url, **kwargs)  # type: ignore[arg-type]
        except trio.TooSlowError:
            raise PeerUnavailable(address, f"no answer within {self.timeout:g} s") from None
        except httpx.TransportError as exc:
            raise PeerUnavailable(address, f"{type(exc).__name__}: {exc}") from exc

    def _expect(
        self, address: str, response: httpx.Response, what: str, body: bytes | None = None
    ) -> None:
        if response.status_code != 200:
            text = response.text if body is None else body.decode("utf-8", "replace")
            detail = text.strip()[:200]
            raise PeerUnavailable(address, f"{what}: HTTP {response.status_code} {detail}")

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
