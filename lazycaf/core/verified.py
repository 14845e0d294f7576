"""``Verified``: a blob's bytes checked against its digest, and the one function that checks.

Every byte that enters the host cache or reaches a reader passed ``verify_blob``: decode the
payload as its encoding says (``framing``: its caps hold against hostile frames), hash the
result, compare with the digest it was asked for. A ``Verified`` keeps the payload as it
arrived beside the decoded bytes, so a cache can store zstd frames as they are (Btrfs
encoded writes) and a daemon can forward them to its peers without compressing again.
"""

from __future__ import annotations

from dataclasses import dataclass

from lazycaf.core import framing
from lazycaf.core.digest import Digest
from lazycaf.core.errors import IntegrityError

__all__ = ["Verified", "verify_blob"]


@dataclass(frozen=True, slots=True)
class Verified:
    """Bytes that hash to ``digest``. Made only by ``verify_blob``."""

    digest: Digest
    data: bytes
    encoding: str  # of ``payload``, as it arrived
    payload: bytes

    @property
    def size(self) -> int:
        return len(self.data)


def verify_blob(digest: Digest, encoding: str, payload: bytes, *, what: str = "") -> Verified:
    """Decode and verify a blob; ``IntegrityError`` (``DigestMismatch`` or a malformed
    payload) names ``what`` (say, the peer that sent it) when given. CPU-bound: call it in a
    worker thread."""
    try:
        data = framing.decode(encoding, payload, what=f"blob {digest}")
        digest.verify(data)
    except IntegrityError as exc:
        if not what:
            raise
        raise IntegrityError(f"{what}: {exc}") from None
    return Verified(digest, data, encoding, payload)
