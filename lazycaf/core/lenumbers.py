"""Columns of fixed-size numbers stored little-endian (the manifest's and the stat cache's
formats): an ``array`` from such bytes and back, with no object per number."""

from __future__ import annotations

import sys
from array import array

__all__ = ["from_le", "to_le"]


def from_le(typecode: str, data: bytes) -> array[int]:
    """The little-endian numbers in ``data`` as an array (``ValueError``: a length that is
    not a whole number of items)."""
    out = array(typecode)
    out.frombytes(data)
    if sys.byteorder != "little":
        out.byteswap()
    return out


def to_le(numbers: array[int]) -> bytes:
    """An array's numbers as little-endian bytes."""
    if sys.byteorder == "little":
        return numbers.tobytes()
    swapped = array(numbers.typecode, numbers)
    swapped.byteswap()
    return swapped.tobytes()
