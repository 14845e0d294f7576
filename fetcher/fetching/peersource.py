"""Another host's daemon as a ``BlobSource``: the client of its peer API (``peerapp``).

    GET  http://PEER/v1/blobs/{hex}   one blob; the peer pulls it from the CAS if it lacks it
    POST http://PEER/v1/blobs:get     several blobs in one body (``lazycaf.cas.batch`` records)

Requests carry ``X-LazyCAF-Priority: demand|prefetch`` (the peer serves reads before
prefetch) and the shared bearer token when there is one. With ``tls`` every peer is reached
over https, its certificate verified as the CAS's is (``lazycaf.cas.tls``); one that does
not verify is a ``PeerUnavailable`` saying so. Nothing a peer sends is trusted:
answers go back as they arrived (``Fetched``, origin ``peer``) and the fetch service verifies
them, backing off a peer whose bytes do not verify. Every request is bounded by ``timeout``
seconds in total, so a peer that hangs or trickles costs at most that, and bodies are capped
in size. Transport failures, timeouts and unexpected answers are ``PeerUnavailable``; a 404
is ``BlobNotFound`` and a 503 ``HomeCouldNotFetch`` (the peer could not get the blob either).
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import httpx
import trio

from fetcher.fetching.source import Fetched, Outcome
from lazycaf.cas.batch import unpack_batch
from lazycaf.cas.tls import certificate_failure, client_ssl_context
from lazycaf.core import framing
from lazycaf.core.digest import Digest
from lazycaf.core.errors import BlobNotFound, IntegrityError, LazyCafError, PeerUnavailable
from lazycaf.core.priority import Priority
from lazycaf.host.defaults import PEER_TIMEOUT

__all__ = [
    "INSTANCE_HEADER",
    "PRIORITY_HEADER",
    "HomeCouldNotFetch",
    "PeerClient",
    "PeerIsSelf",
    "PeerSource",
    "PeerSources",
]

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
        priority: Priority,
        token: str | None = None,
        timeout: float = PEER_TIMEOUT,
        max_connections: int = 64,
        instance: str = "",
        tls: ssl.SSLContext | None = None,
    ) -> None:
        """``tls``: reach peers over https, verifying with this context
        (``lazycaf.cas.tls.client_ssl_context``)."""
        self.priority = priority
        self.scheme = "https" if tls is not None else "http"
        self.instance = instance  # this daemon's id: an answer carrying it came from itself
        self.timeout = timeout
        # zstd: a peer sends the CAS's frames of blobs it fetched lately
        # (``fetcher.fetching.recent``), decoded bytes otherwise; it never compresses for us.
        headers = {PRIORITY_HEADER: priority.label, "accept-encoding": "zstd"}
        if token:
            headers["authorization"] = f"Bearer {token}"
        self._client = httpx.AsyncClient(
            headers=headers,
            verify=tls if tls is not None else True,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 2.0)),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
        )

    async def get(self, address: str, digest: Digest) -> tuple[str, bytes]:
        """The blob from the peer at ``address``: its encoding and payload (not verified)."""
        url = f"{self.scheme}://{address}/v1/blobs/{digest.hex}"
        status, encoding, payload = await self._exchange(address, "GET", url, _MAX_BLOB_BODY)
        if status == 404:
            raise BlobNotFound(digest, f"peer {address}")
        self._expect(address, status, payload, f"GET blob {digest}")
        _check_encoding(address, digest, encoding)
        return encoding, payload

    async def get_many(
        self, address: str, digests: Sequence[Digest]
    ) -> dict[Digest, tuple[str, bytes]]:
        """The blobs the peer sent of those asked (not verified), by digest."""
        url = f"{self.scheme}://{address}/v1/blobs:get"
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
        out: dict[Digest, tuple[str, bytes]] = {}
        for digest, record_encoding, data in records:
            if digest in wanted:
                _check_encoding(address, digest, record_encoding)
                out[digest] = (record_encoding, data)
        return out

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
            reason = certificate_failure(exc)
            if reason is not None:
                url = f"{self.scheme}://{address}"
                raise PeerUnavailable(
                    address, f"TLS: certificate verify failed for {url}: {reason}"
                ) from exc
            raise PeerUnavailable(address, f"{type(exc).__name__}: {exc}") from exc

    def _expect(self, address: str, status: int, body: bytes, what: str) -> None:
        if status == 200:
            return
        detail = body.decode("utf-8", "replace").strip()[:200]
        if status == 503:  # the peer is fine, it could not get the blob (its CAS failed)
            raise HomeCouldNotFetch(address, f"{what}: HTTP 503 {detail}")
        raise PeerUnavailable(address, f"{what}: HTTP {status} {detail}")

    async def aclose(self) -> None:
        await self._client.aclose()


def _check_encoding(address: str, digest: Digest, encoding: str) -> None:
    if encoding not in (framing.IDENTITY, framing.ZSTD):
        raise IntegrityError(f"peer {address} sent blob {digest} as {encoding!r}")


class PeerSource:
    """The daemon at ``address`` as a ``BlobSource`` (over the clients of ``PeerSources``)."""

    def __init__(self, address: str, clients: dict[Priority, PeerClient]) -> None:
        self.address = address
        self.where = f"peer {address}"
        self._clients = clients

    async def fetch(self, digest: Digest, priority: Priority) -> Fetched:
        encoding, payload = await self._clients[priority].get(self.address, digest)
        return Fetched(encoding, payload, "peer", self.address)

    async def fetch_many(self, digests: Sequence[Digest], priority: Priority) -> Outcome:
        try:
            got = await self._clients[priority].get_many(self.address, digests)
        except LazyCafError as exc:
            return {}, exc
        return {d: Fetched(e, p, "peer", self.address) for d, (e, p) in got.items()}, None

    async def aclose(self) -> None:
        """The clients belong to ``PeerSources``, which closes them."""


class PeerSources:
    """Every peer as a ``BlobSource``: ``sources(address)``. One client (so one connection
    pool) per priority, shared by all peers: demand requests never queue behind prefetch
    ones for a connection."""

    def __init__(
        self,
        *,
        token: str | None = None,
        timeout: float = PEER_TIMEOUT,
        instance: str = "",
        tls: bool = False,
        cacert: Path | None = None,
    ) -> None:
        # one context for both clients: building it reads the CA files
        context = client_ssl_context(cacert) if tls else None
        self._clients = {
            p: PeerClient(priority=p, token=token, timeout=timeout, instance=instance, tls=context)
            for p in Priority
        }

    def __call__(self, address: str) -> PeerSource:
        return PeerSource(address, self._clients)

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            for client in self._clients.values():
                await client.aclose()
