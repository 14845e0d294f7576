"""Bearer tokens read from files: the CAS's write token and the peers' shared token.

A token file that group or others may read, write or run is refused, as ssh refuses such a
private key: a token grants writes to the CAS (or makes peers fetch on request), and a file
another user can read has leaked it already. The message names the file and its mode.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from lazycaf.core.errors import UsageError

__all__ = ["read_token_file"]


def read_token_file(path: Path, what: str) -> str:
    """The token in ``path`` (surrounding whitespace stripped). A missing, unreadable, empty
    or too open file (any permission for group or others) is a ``UsageError`` naming
    ``what`` (the option or variable that named the file)."""
    try:
        with open(path, "rb") as f:
            mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
            raw = f.read(1 << 16)
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror}") from exc
    if mode & 0o077:
        raise UsageError(
            f"{what} {path} has mode {mode:04o}: a token file must not be accessible by group "
            f"or others (chmod 600 {path})"
        )
    try:
        token = raw.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise UsageError(f"cannot read {what} {path}: not UTF-8 text") from exc
    if not token:
        raise UsageError(f"{what} {path} is empty")
    return token
