"""Where a daemon's cache misses come from: the blob's home peer, then the CAS.

``TieredSource`` is read-only and never writes upstream. Without peers it is the CAS (one
client for reads, one for prefetch, so separate connection pools). With peers, a miss goes to
the blob's home (``PeerSet.ranking``); a home that fails, times out or sends bytes that do not
verify is backed off and skipped for that blob, and the next-ranked live member is asked (at
most ``peer_tries`` peers); the CAS is always the last resort. When this daemon is itself the
blob's home, or the request came from a peer (``direct``: a peer asks us because it ranked us
home), the CAS is asked directly, so a request crosses at most one peer hop and never loops.

Results are tagged with their origin (``Fetched.origin``) so that statistics split bytes by
source. Peer bytes arrive verified and decoded (``fetcher.peers.client``), so the cache does
not hash them again; CAS bytes arrive as stored, and the cache verifies them as it stages
them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Final, Literal

import trio

from fetcher.peers.client import HomeCouldNotFetch, PeerClient, PeerIsSelf
from fetcher.peers.peerset import PeerSet
from lazycaf.cas.api import CAS
from lazycaf.core import framing
from lazycaf.core.digest import Digest
from lazycaf.core.errors import BlobNotFound, LazyCafError

__all__ = ["CAS_ORIGIN", "PEER_ORIGIN", "Fetched", "TieredSource"]

log = logging.getLogger(__name__)

CAS_ORIGIN: Final = "cas"
PEER_ORIGIN: Final = "peer"


@dataclass(frozen=True)
class Fetched:
    encoding: str
    payload: bytes
    origin: Literal["cas", "peer"]
    peer: str | None = None

    @property
    def verified(self) -> bool:
        """Peer bytes arrive decoded and checked against their digest (``peerclient``)."""
        return self.origin == PEER_ORIGIN


class TieredSource:
    """Peers before the CAS. ``priority`` is ``"demand"`` or ``"prefetch"`` throughout."""

    def __init__(
        self,
        cas: CAS,
        prefetch_cas: CAS | None = None,
        *,
        peers: PeerSet | None = None,
        token: str | None = None,
        peer_timeout: float = 5.0,
        peer_tries: int = 2,
        instance: str = "",
    ) -> None:
        self.cas = cas
        self._cas = {"demand": cas, "prefetch": prefetch_cas or cas}
        self.peers = peers
        self.peer_tries = peer_tries
        self._clients: dict[str, PeerClient] = {}
        if peers is not None:
            verify = trio.CapacityLimiter(2)
            self._clients = {
                p: PeerClient(
                    priority=p,
                    token=token,
                    timeout=peer_timeout,
                    verify_limiter=verify,
                    instance=instance,
                )
                for p in ("demand", "prefetch")
            }

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            for client in self._clients.values():
                await client.aclose()
            for cas in dict.fromkeys(self._cas.values()):
                await cas.aclose()

    def first_peer(self, digest: Digest) -> str | None:
        """The peer a routed fetch of ``digest`` asks first (None: the CAS directly)."""
        return next(self._candidates(digest), None)

    def _candidates(self, digest: Digest) -> Iterator[str]:
        """Peers to ask for ``digest``, home first; none when this daemon is its home."""
        if self.peers is None:
            return
        for address in self.peers.ranking(digest)[: self.peer_tries]:
            if address == self.peers.self_address:
                return
            yield address

    async def get(self, digest: Digest, priority: str, *, direct: bool = False) -> Fetched:
        if not direct and self.peers is not None:
            client = self._clients[priority]
            for address in self._candidates(digest):
                try:
                    data = await client.get(address, digest)
                except (BlobNotFound, HomeCouldNotFetch):
                    break  # the home could not get it from the CAS either: ask it ourselves
                except PeerIsSelf:
                    self.peers.is_self(address)
                    break  # this daemon is the blob's home after all
                except LazyCafError as exc:  # failed, timed out, or bytes that do not verify
                    self.peers.failed(address, str(exc))
                    continue
                self.peers.succeeded(address)
                return Fetched(framing.IDENTITY, data, PEER_ORIGIN, address)
        encoding, payload = await self._cas[priority].get_encoded(digest)
        return Fetched(encoding, payload, CAS_ORIGIN)

    async def get_many(
        self, digests: Sequence[Digest], priority: str, *, direct: bool = False
    ) -> tuple[dict[Digest, Fetched], LazyCafError | None]:
        """Several blobs, each from its home peer (one request per peer) or the CAS (one
        request for the rest). Blobs no source gave are absent from the result; the error
        is the CAS's when its request failed (what peers sent is kept either way)."""
        out: dict[Digest, Fetched] = {}
        remaining = list(dict.fromkeys(digests))
        to_cas: list[Digest] = []
        if not direct and self.peers is not None:
            for _ in range(self.peer_tries):
                if not remaining:
                    break
                groups: dict[str, list[Digest]] = {}
                for d in remaining:
                    home = next(self._candidates(d), None)
                    if home is None:
                        to_cas.append(d)
                    else:
                        groups.setdefault(home, []).append(d)
                remaining = []  # the blobs of peers that failed: their next-ranked member
                async with trio.open_nursery() as nursery:
                    for address, part in groups.items():
                        nursery.start_soon(
                            self._from_peer, address, part, priority, out, remaining, to_cas
                        )
        to_cas.extend(remaining)
        if to_cas:
            try:
                got = await self._cas[priority].get_many_encoded(to_cas)
            except LazyCafError as exc:
                return out, exc
            for d, (encoding, payload) in got.items():
                out[d] = Fetched(encoding, payload, CAS_ORIGIN)
        return out, None

    async def _from_peer(
        self,
        address: str,
        digests: list[Digest],
        priority: str,
        out: dict[Digest, Fetched],
        retry: list[Digest],
        to_cas: list[Digest],
    ) -> None:
        """Ask one peer for its share; blobs it failed on go to ``retry`` (it is backed off,
        so the next round asks their next-ranked member), blobs it answered it could not get
        go to ``to_cas``."""
        assert self.peers is not None
        try:
            got, bad = await self._clients[priority].get_many(address, digests)
        except HomeCouldNotFetch:
            to_cas.extend(digests)
            return
        except PeerIsSelf:
            self.peers.is_self(address)
            retry.extend(digests)  # re-ranked without the alias: this daemon or another
            return
        except LazyCafError as exc:  # failed, timed out, or a malformed answer
            self.peers.failed(address, str(exc))
            retry.extend(digests)
            return
        for d, data in got.items():
            out[d] = Fetched(framing.IDENTITY, data, PEER_ORIGIN, address)
        left = [d for d in digests if d not in got]
        if bad is not None:
            self.peers.failed(address, str(bad))
            retry.extend(left)
        else:
            self.peers.succeeded(address)
            to_cas.extend(left)
