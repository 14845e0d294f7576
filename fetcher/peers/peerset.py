"""The peer set: which daemons share their caches, which are live, and each blob's home.

Peers are listed in a file (``--peers``), one ``HOST:PORT`` a line (``#`` starts a comment);
the daemon re-reads it when it changes (``reload``), keeping the health of peers that stay.
A daemon that serves peers (``--peer-listen``) is a member under its own advertised address
whether or not the file lists it; a daemon without one only asks.

Selection is rendezvous (highest-random-weight) hashing: every member scores a blob with
``blake3(address | digest)`` and the highest live score is the blob's home. Every daemon with
the same view picks the same home, so the home pulls the blob from the CAS once and serves the
others; adding or removing a member moves only the blobs whose home it is or becomes.

Health: a failed or slow request backs a peer off for 1 s, doubling per consecutive failure
up to 30 s; while backed off it is not live, so its blobs' homes move to their next-ranked
member (consistently on every daemon that saw it fail). When the back-off ends the peer is
tried again; one success clears its record. Pure logic except ``reload``'s file read (sync).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import blake3

from lazycaf.core.digest import Digest
from lazycaf.core.errors import UsageError

__all__ = ["PeerSet", "PeerStatus", "check_address", "parse_peer_list", "rendezvous_order"]

log = logging.getLogger(__name__)

BACKOFF_MIN: Final = 1.0
BACKOFF_MAX: Final = 30.0


def check_address(text: str) -> str:
    """``HOST:PORT`` (IPv6 hosts in brackets), normalized; raises ``UsageError``."""
    address = text.strip()
    for prefix in ("http://", "https://"):
        address = address.removeprefix(prefix)
    address = address.rstrip("/")
    host, sep, port = address.rpartition(":")
    bad_host = (
        not host
        or any(c.isspace() or c in "/?#@" for c in host)
        or host.startswith("[") != host.endswith("]")
        or (":" in host and not host.startswith("["))
    )
    if not sep or bad_host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"not a peer address (HOST:PORT): {text.strip()[:100]!r}")
    return f"{host}:{int(port)}"


def parse_peer_list(text: str, *, where: str = "peer list") -> list[str]:
    """The addresses of a peer list file, in order, each once."""
    out: dict[str, None] = {}
    for n, line in enumerate(text.splitlines(), 1):
        item = line.split("#", 1)[0].strip()
        if not item:
            continue
        try:
            out[check_address(item)] = None
        except UsageError as exc:
            raise UsageError(f"{where} line {n}: {exc}") from None
    return list(out)


def _score(address: str, digest: Digest) -> bytes:
    return blake3.blake3(address.encode() + b"\0" + digest.raw).digest(8)


def rendezvous_order(members: Iterable[str], digest: Digest) -> list[str]:
    """Members from the blob's home down (highest score first)."""
    return sorted(members, key=lambda a: _score(a, digest), reverse=True)


@dataclass(frozen=True)
class PeerStatus:
    address: str
    live: bool
    failures: int
    backoff_left: float
    served: int  # successful requests this daemon made to it
    last_error: str


@dataclass
class _Health:
    failures: int = 0
    until: float = 0.0
    served: int = 0
    last_error: str = ""


class PeerSet:
    """Invariants: ``self_address`` (when given) is always a member; a peer's health record
    lives exactly as long as the peer is listed."""

    def __init__(
        self,
        *,
        self_address: str | None = None,
        path: Path | None = None,
        addresses: Iterable[str] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.self_address = check_address(self_address) if self_address else None
        self.path = path
        self._clock = clock
        self._stamp: tuple[int, int, int] | None = None
        self._health: dict[str, _Health] = {}
        self._aliases: set[str] = set()  # list entries found to be this daemon
        self.set_addresses(addresses)
        if path is not None:
            self.reload()

    def set_addresses(self, addresses: Iterable[str]) -> None:
        wanted = [a for a in map(check_address, addresses) if a not in self._aliases]
        if self.self_address is not None and self.self_address not in wanted:
            wanted.append(self.self_address)
        self._health = {a: self._health.get(a) or _Health() for a in wanted}

    def reload(self) -> bool:
        """Re-read the peer list file if it changed since the last read; returns whether
        the member set changed. A file that is missing or malformed keeps the last good set
        (and is logged): a half-written edit must not empty the cluster."""
        if self.path is None:
            return False
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            if stamp == self._stamp:
                return False
            text = self.path.read_text(encoding="utf-8")
            addresses = parse_peer_list(text, where=str(self.path))
        except (OSError, UnicodeDecodeError, UsageError) as exc:
            log.warning("peer list %s not read, keeping %d peers: %s", self.path, len(self), exc)
            return False
        self._stamp = stamp
        before = set(self._health)
        self.set_addresses(addresses)
        if set(self._health) == before:
            return False
        log.info("peer list %s: %d members", self.path, len(self))
        return True

    def __len__(self) -> int:
        return len(self._health)

    def members(self) -> list[str]:
        return list(self._health)

    def is_live(self, address: str) -> bool:
        health = self._health.get(address)
        return health is not None and health.until <= self._clock()

    def ranking(self, digest: Digest) -> list[str]:
        """Live members (this daemon always counts as live) from the blob's home down."""
        live = [a for a in self._health if a == self.self_address or self.is_live(a)]
        return rendezvous_order(live, digest)

    def home(self, digest: Digest) -> str | None:
        ranked = self.ranking(digest)
        return ranked[0] if ranked else None

    def failed(self, address: str, reason: str) -> None:
        health = self._health.get(address)
        if health is None or address == self.self_address:
            return
        health.failures += 1
        backoff = min(BACKOFF_MIN * 2 ** (health.failures - 1), BACKOFF_MAX)
        health.until = self._clock() + backoff
        health.last_error = reason
        log.warning("peer %s backed off for %.0f s: %s", address, backoff, reason)

    def is_self(self, address: str) -> None:
        """``address`` answered as this very daemon (the list spells this host another way
        than ``self_address``): drop it, now and on every reload, or hosts that spell it
        differently would disagree on homes and this daemon would ask itself."""
        if address == self.self_address or address in self._aliases:
            return
        self._aliases.add(address)
        self._health.pop(address, None)
        log.warning(
            "peer list entry %s is this daemon (advertised as %s): ignored; list every host "
            "the way it advertises itself",
            address,
            self.self_address,
        )

    def succeeded(self, address: str) -> None:
        health = self._health.get(address)
        if health is not None:
            health.failures = 0
            health.until = 0.0
            health.served += 1

    def statuses(self) -> list[PeerStatus]:
        now = self._clock()
        return [
            PeerStatus(a, h.until <= now, h.failures, max(h.until - now, 0), h.served, h.last_error)
            for a, h in self._health.items()
        ]
