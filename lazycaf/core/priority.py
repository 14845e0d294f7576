"""``Priority``: on-demand reads before prefetch, everywhere a blob is asked for (pure).

One value travels the whole fetch path: a mount's request on the daemon socket, the fetch
service's slots, the CAS and peer connection pools, and ``X-LazyCAF-Priority`` between
daemons. Its ``label`` is how it is spelled on the wire.
"""

from __future__ import annotations

import enum

__all__ = ["Priority"]


class Priority(enum.IntEnum):
    """Lower goes first: a read someone waits on, then what is fetched ahead of reads."""

    DEMAND = 0
    PREFETCH = 1

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def from_label(cls, text: str | bytes | None) -> Priority:
        """The priority a wire label names; anything but ``prefetch`` is a read (a peer or
        mount that says nothing is served first, as it waits)."""
        if isinstance(text, bytes):
            text = text.decode("latin-1")
        return cls.PREFETCH if (text or "").strip().lower() == "prefetch" else cls.DEMAND
