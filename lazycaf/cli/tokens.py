"""Bearer tokens given on the command line as files (``--token-file``, ``--peer-token-file``)."""

from __future__ import annotations

from pathlib import Path

from lazycaf.core.errors import UsageError

__all__ = ["read_token"]


def read_token(path: Path, option: str = "--token-file") -> str:
    """The token in ``path`` (surrounding whitespace stripped); a missing, unreadable or
    empty file is a ``UsageError`` naming ``option``."""
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise UsageError(f"cannot read {option} {path}: {reason}") from exc
    if not token:
        raise UsageError(f"{option} {path} is empty")
    return token
