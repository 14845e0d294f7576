"""Ref names: ``trainer:latest`` names a manifest, ``profiles/trainer`` a profile (pure);
and ``Expected``, the condition of a compare-and-swap ``set_ref``."""

from __future__ import annotations

import enum
import re
from typing import Final, TypeAlias

from lazycaf.core.digest import Digest
from lazycaf.core.errors import UsageError

__all__ = ["ANY", "Expected", "check_ref_name", "profile_name_for", "profile_ref"]


class _Any(enum.Enum):
    ANY = "any"


#: ``set_ref(..., expected=ANY)`` sets the ref whatever it points at now.
ANY: Final = _Any.ANY
#: What a compare-and-swap expects a ref to hold: a digest, None (no such ref yet), or ANY.
Expected: TypeAlias = "Digest | _Any | None"

_REF_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]*(?:/[A-Za-z0-9][A-Za-z0-9._:@+-]*)*")
_MAX_REF: Final = 200


def check_ref_name(name: str) -> str:
    """Return ``name`` if it is a valid ref name (``trainer:latest``, ``profiles/x``)."""
    if len(name) > _MAX_REF or not _REF_RE.fullmatch(name) or ".." in name:
        raise UsageError(f"invalid ref name {name!r} (letters, digits, . _ : @ + - and /)")
    return name


def profile_ref(name: str) -> str:
    return check_ref_name(f"profiles/{name}")


def profile_name_for(ref: str) -> str | None:
    """The default profile of a mounted ref: its name without the tag, so that a profile
    recorded on ``trainer:v1`` serves ``trainer:v2``; None for a bare digest."""
    if Digest.is_hex(ref):
        return None
    last = ref.rsplit("/", 1)[-1]
    name = ref.rsplit(":", 1)[0] if ":" in last else ref
    try:
        profile_ref(name)
    except UsageError:
        return None
    return name
