"""The ``Digest`` value: a blake3-256 digest, and the hashing helpers around it.

Digests travel between modules only as ``Digest`` values, never as hex strings or raw bytes.
"""

from __future__ import annotations

import re
from collections import deque
from itertools import repeat
from typing import Final

import blake3

from lazycaf.core.errors import DigestMismatch, UsageError

__all__ = ["DIGEST_SIZE", "Digest", "Hasher"]

DIGEST_SIZE: Final = 32
_HEX_RE: Final = re.compile(r"[0-9a-f]{64}")


class Digest:
    """A blake3-256 digest. Immutable, hashable, ordered by its bytes.

    Invariant: ``raw`` is exactly 32 bytes. Build one with ``Digest.of(data)``,
    ``Digest.parse(hex)`` or ``Digest.from_bytes(raw)``.
    """

    __slots__ = ("raw",)
    raw: bytes

    def __init__(self, raw: bytes) -> None:
        if type(raw) is not bytes or len(raw) != DIGEST_SIZE:
            raise ValueError(f"a digest is {DIGEST_SIZE} bytes, got {raw!r:.80}")
        object.__setattr__(self, "raw", raw)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Digest is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("Digest is immutable")

    @classmethod
    def from_bytes(cls, raw: bytes) -> Digest:
        return cls(bytes(raw))

    @staticmethod
    def trusted(raw: bytes) -> Digest:
        """Wrap 32 bytes already known to be a digest (decoders slicing fixed-size columns)."""
        d = _new_digest(Digest)
        _set(d, "raw", raw)
        return d

    @staticmethod
    def trusted_column(column: bytes) -> list[Digest]:
        """Wrap each 32-byte slice of ``column`` (whose length is a multiple of 32), as
        ``trusted`` does, with no Python-level work per digest."""
        n = len(column)
        if n % DIGEST_SIZE:
            raise ValueError(f"a digest column is a multiple of {DIGEST_SIZE} bytes, got {n}")
        raws = map(
            column.__getitem__,
            map(slice, range(0, n, DIGEST_SIZE), range(DIGEST_SIZE, n + DIGEST_SIZE, DIGEST_SIZE)),
        )
        out = list(map(_new_digest, repeat(Digest, n // DIGEST_SIZE)))
        deque(map(_set_raw, out, raws), maxlen=0)
        return out

    @classmethod
    def parse(cls, text: str) -> Digest:
        """Parse 64 lowercase hex characters; anything else is a ``UsageError``."""
        if not isinstance(text, str) or not _HEX_RE.fullmatch(text):
            raise UsageError(f"not a blake3 digest (64 lowercase hex characters): {text!r:.80}")
        return cls(bytes.fromhex(text))

    @classmethod
    def is_hex(cls, text: str) -> bool:
        return bool(_HEX_RE.fullmatch(text))

    @classmethod
    def of(cls, data: bytes | bytearray | memoryview) -> Digest:
        return cls(blake3.blake3(data).digest())

    @property
    def hex(self) -> str:
        return self.raw.hex()

    @property
    def short(self) -> str:
        return self.raw.hex()[:12]

    def verify(self, data: bytes | bytearray | memoryview, what: str = "blob") -> None:
        """Raise ``DigestMismatch`` unless ``data`` hashes to this digest."""
        actual = Digest.of(data)
        if actual.raw != self.raw:
            raise DigestMismatch(self, actual, what)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Digest) and other.raw == self.raw

    # Explicit methods rather than functools.total_ordering: each is one bytes comparison,
    # and anything but a Digest gives NotImplemented, so ``d < 5`` is a TypeError.
    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Digest):
            return NotImplemented
        return self.raw < other.raw

    def __le__(self, other: object) -> bool:
        if not isinstance(other, Digest):
            return NotImplemented
        return self.raw <= other.raw

    def __gt__(self, other: object) -> bool:
        if not isinstance(other, Digest):
            return NotImplemented
        return self.raw > other.raw

    def __ge__(self, other: object) -> bool:
        if not isinstance(other, Digest):
            return NotImplemented
        return self.raw >= other.raw

    def __hash__(self) -> int:
        return hash(self.raw)

    def __repr__(self) -> str:
        return f"Digest({self.raw.hex()})"

    def __str__(self) -> str:
        return self.raw.hex()

    def __reduce__(self) -> tuple[type[Digest], tuple[bytes]]:
        return (Digest, (self.raw,))


_new_digest = object.__new__
_set = object.__setattr__
_set_raw = Digest.__dict__["raw"].__set__  # the slot's descriptor: no attribute lookup


class Hasher:
    """Incremental blake3 hashing that ends in a ``Digest``."""

    __slots__ = ("_h",)

    def __init__(self) -> None:
        self._h = blake3.blake3()

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._h.update(data)

    def digest(self) -> Digest:
        return Digest(self._h.digest())
