"""The error tree of LazyCAF.

Every error the project raises on purpose is a ``LazyCafError``; the CLI turns one into a
single line on stderr and an exit code, the FUSE layer into an errno. Foreign errors (httpx,
lmdb, OSError) are mapped at the boundary with ``raise X(...) from exc``.

    LazyCafError
    ├── UsageError              bad input from the user (a path, an option)       exit 2
    ├── NotFound                a ref, blob or path that does not exist           exit 1
    │   ├── RefNotFound
    │   ├── BlobNotFound
    │   └── PathNotFound
    ├── Unavailable             a remote or the disk failed; may work later       exit 3
    │   ├── CasUnavailable
    │   │   └── TlsFailure      the CAS's TLS certificate did not verify
    │   ├── PeerUnavailable     a peer daemon failed, timed out or refused
    │   ├── RefMoved            a ref changed since it was read (compare-and-swap lost)
    │   └── CacheFull           the host cache's disk is out of space
    ├── AccessDenied            the CAS refused a request (token missing, wrong)  exit 5
    ├── IntegrityError          bytes did not verify, or a format is corrupt      exit 4
    │   ├── DigestMismatch
    │   └── ManifestError       a manifest that does not decode or validate
    └── PackError               a tree that cannot be packed as it is             exit 2
"""

from __future__ import annotations

__all__ = [
    "first_error",
    "AccessDenied",
    "BlobNotFound",
    "CacheFull",
    "CasUnavailable",
    "DigestMismatch",
    "IntegrityError",
    "LazyCafError",
    "ManifestError",
    "NotFound",
    "PackError",
    "PathNotFound",
    "PeerUnavailable",
    "RefMoved",
    "RefNotFound",
    "TlsFailure",
    "Unavailable",
    "UsageError",
]


class LazyCafError(Exception):
    """Base of every error LazyCAF raises on purpose. ``exit_code`` is what the CLI returns."""

    exit_code = 1


class UsageError(LazyCafError):
    exit_code = 2


class NotFound(LazyCafError):
    exit_code = 1


class RefNotFound(NotFound):
    def __init__(self, name: str, where: str = "") -> None:
        suffix = f" in {where}" if where else ""
        super().__init__(f"unknown ref {name!r}{suffix}")
        self.name = name


class BlobNotFound(NotFound):
    def __init__(self, digest: object, where: str = "") -> None:
        suffix = f" in {where}" if where else ""
        super().__init__(f"blob {digest} not found{suffix}")
        self.digest = digest


class PathNotFound(NotFound):
    def __init__(self, path: str, where: str = "") -> None:
        suffix = f" in {where}" if where else ""
        super().__init__(f"no such path {path!r}{suffix}")
        self.path = path


class Unavailable(LazyCafError):
    exit_code = 3


class CasUnavailable(Unavailable):
    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"CAS {where} unavailable: {reason}")
        self.where = where


class PeerUnavailable(Unavailable):
    def __init__(self, peer: str, reason: str) -> None:
        super().__init__(f"peer {peer} unavailable: {reason}")
        self.peer = peer


class RefMoved(Unavailable):
    """``set_ref(..., expected=...)`` found the ref at another value: read it and retry."""

    def __init__(self, name: str, expected: object, found: object) -> None:
        super().__init__(f"ref {name!r} moved: expected {expected}, found {found}")
        self.name = name


class TlsFailure(CasUnavailable):
    """The CAS at ``where`` (an https URL) presented a certificate the client does not
    trust (a peer's is a ``PeerUnavailable``: the daemon backs that peer off)."""

    def __init__(self, where: str, reason: str) -> None:
        Unavailable.__init__(self, f"TLS: certificate verify failed for {where}: {reason}")
        self.where = where


class CacheFull(Unavailable):
    """The host cache's filesystem ran out of space (ENOSPC) while storing a blob."""


class AccessDenied(LazyCafError):
    exit_code = 5


class IntegrityError(LazyCafError):
    exit_code = 4


class DigestMismatch(IntegrityError):
    def __init__(self, expected: object, actual: object, what: str = "blob") -> None:
        super().__init__(f"{what} {expected} does not verify (content hashes to {actual})")
        self.expected = expected
        self.actual = actual


class ManifestError(IntegrityError):
    pass


class PackError(LazyCafError):
    exit_code = 2


def first_error(exc: BaseException) -> BaseException:
    """The first LazyCafError inside (nested) exception groups, else the first leaf."""
    if not isinstance(exc, BaseExceptionGroup):
        return exc
    leaves = [first_error(e) for e in exc.exceptions]
    return next((e for e in leaves if isinstance(e, LazyCafError)), leaves[0])
