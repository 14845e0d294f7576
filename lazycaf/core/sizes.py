"""Byte sizes for people: ``2G`` / ``500M`` in, ``1.5 GiB`` out; durations: ``24h`` in (pure)."""

from __future__ import annotations

import re
from typing import Final

from lazycaf.core.errors import UsageError

__all__ = ["format_size", "parse_duration", "parse_size"]

_UNITS: Final = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE: Final = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``"2G"`` -> 2 GiB. Suffixes K, M, G, T are powers of 1024 (``2GiB``, ``2gb`` too)."""
    m = _SIZE_RE.fullmatch(text)
    if m is None:
        raise UsageError(f"invalid size {text!r} (e.g. 500M, 2G, 1073741824)")
    value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if value <= 0:
        raise UsageError(f"size must be positive: {text!r}")
    return value


_SECONDS: Final = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_RE: Final = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*")


def parse_duration(text: str) -> float:
    """``"24h"`` -> 86400.0 seconds: suffixes s, m, h, d; a plain number is seconds."""
    m = _DURATION_RE.fullmatch(text)
    if m is None:
        raise UsageError(f"invalid duration {text!r} (e.g. 24h, 30m, 90s, 2d, 0s)")
    return float(m.group(1)) * _SECONDS[m.group(2)]


def format_size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"
