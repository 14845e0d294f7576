"""Bearer tokens given on the command line as files (``--token-file``, ``--peer-token-file``).

The reading and the permission check live in ``lazycaf.cas.tokens``, shared with
``LAZYCAF_CAS_TOKEN_FILE``: a file group or others can access is refused.
"""

from __future__ import annotations

from pathlib import Path

from lazycaf.cas.tokens import read_token_file

__all__ = ["read_token"]


def read_token(path: Path, option: str = "--token-file") -> str:
    """The token in ``path`` (surrounding whitespace stripped); a missing, unreadable, empty
    or too open file (mode beyond 0600) is a ``UsageError`` naming ``option``."""
    return read_token_file(path, option)
