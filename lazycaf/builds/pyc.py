"""``.pyc`` headers (PEP 552) and the rewrite ``pack --normalize`` makes of them.

A ``.pyc`` starts with 16 bytes: the magic number of the Python that wrote it, a flags word,
then either the source's mtime and size (flags 0: timestamp-based) or an 8-byte hash of the
source (flags bit 0: hash-based; bit 1: checked against the source at import). A build that
runs again writes new mtimes, so every timestamp-based ``.pyc`` gets new bytes although its
code did not change.

``hash_based`` turns such a file into an *unchecked* hash-based one, whose header
depends on the source's bytes only. Unchecked, not checked: a checked ``.pyc`` makes every
import read and hash its source again; an executable packed into the CAS is immutable (its
``.py`` and ``.pyc`` are named by digest and mounted read-only), so nothing can make the pair
disagree after the pack, and the pack only rewrites a ``.pyc`` that is valid for its source
at that moment, exactly as the importer would decide (recorded mtime and size equal the
source's). A stale ``.pyc`` (the importer would ignore it), one written by another Python
version (its hash key would differ) or one already hash-based is left as it is.

``with_filename`` sets the ``co_filename`` a ``.pyc`` records (pip and ``compileall`` record
the directory they compiled in) to the source's path in the tree: the importer replaces it
anyway with the path it loads from, so no import sees the difference.
"""

from __future__ import annotations

import _imp
import importlib.util
import marshal
import re
import struct
from types import CodeType
from typing import Final

__all__ = [
    "HEADER_SIZE",
    "importer_mtime",
    "with_filename",
    "MAGIC",
    "PycHeader",
    "parse_header",
    "source_path",
    "hash_based",
]

HEADER_SIZE: Final = 16
MAGIC: Final = importlib.util.MAGIC_NUMBER  # this Python's: only its .pyc files are rewritten
FLAG_HASH: Final = 0b01
FLAG_CHECK: Final = 0b10
_WORD: Final = struct.Struct("<I")
# PEP 3147: DIR/__pycache__/NAME.TAG.pyc or NAME.TAG.opt-N.pyc caches DIR/NAME.py
_CACHED: Final = re.compile(
    r"^(?P<dir>(?:.*/)?)__pycache__/(?P<name>[^/.]+)\.[^/.]+(?:\.opt-\d+)?\.pyc\Z"
)


class PycHeader:
    """The fields of a ``.pyc`` header."""

    __slots__ = ("flags", "magic", "source_hash", "source_mtime", "source_size")

    def __init__(self, data: bytes) -> None:
        self.magic: bytes = data[:4]
        self.flags: int = _WORD.unpack_from(data, 4)[0]
        self.source_mtime: int = _WORD.unpack_from(data, 8)[0]
        self.source_size: int = _WORD.unpack_from(data, 12)[0]
        self.source_hash: bytes = data[8:16]

    @property
    def timestamp_based(self) -> bool:
        return self.flags == 0


def parse_header(data: bytes) -> PycHeader | None:
    """The header of ``data`` if it looks like a ``.pyc`` (a magic number ending in
    ``\\r\\n``, known flags), else None."""
    if len(data) < HEADER_SIZE or data[2:4] != b"\r\n":
        return None
    if not 3000 <= int.from_bytes(data[:2], "little") < 5000:  # Python 3's magic numbers
        return None
    header = PycHeader(data)
    if header.flags & ~(FLAG_HASH | FLAG_CHECK) or header.flags == FLAG_CHECK:
        return None
    return header


def source_path(pyc_path: str) -> str | None:
    """The source a ``__pycache__`` file caches (``a/__pycache__/m.cpython-311.pyc`` ->
    ``a/m.py``), None for any other path."""
    m = _CACHED.match(pyc_path)
    return None if m is None else f"{m['dir']}{m['name']}.py"


def importer_mtime(mtime_ns: int) -> int:
    """The source mtime the importer compares with a ``.pyc``'s: ``int(st.st_mtime)``, where
    ``st_mtime`` is the float ``sec + nsec * 1e-9`` (which rounds up to the next second
    when ``nsec`` is close enough to it)."""
    sec, nsec = divmod(mtime_ns, 1_000_000_000)
    return int(sec + nsec * 1e-9)


def hash_based(
    data: bytes, source: bytes, source_mtime_ns: int, *, checked: bool = False
) -> bytes | None:
    """``data`` with a hash-based header (PEP 552; unchecked unless ``checked``) instead of
    its timestamp one, or None when it is not to be rewritten: not a timestamp-based ``.pyc``
    of this Python, or not valid for ``source`` (the importer would recompile it: its
    recorded mtime and size are not the source's)."""
    header = parse_header(data)
    if header is None or header.magic != MAGIC or not header.timestamp_based:
        return None
    if header.source_mtime != importer_mtime(source_mtime_ns) & 0xFFFFFFFF:
        return None
    if header.source_size != len(source) & 0xFFFFFFFF:
        return None
    key = int.from_bytes(MAGIC, "little")
    digest = _imp.source_hash(key, source)
    flags = FLAG_HASH | (FLAG_CHECK if checked else 0)
    return MAGIC + _WORD.pack(flags) + digest + data[HEADER_SIZE:]


# marshal's string types (CPython Python/marshal.c): short ASCII (1-byte length), ASCII,
# Unicode (4-byte length); each plain and interned; bit 0x80 marks an object others refer to.
_SHORT: Final = (ord("z"), ord("Z"))
_LONG_ASCII: Final = (ord("a"), ord("A"))
_UNICODE: Final = (ord("u"), ord("t"))
_FLAG_REF: Final = 0x80


def with_filename(data: bytes, filename: str) -> bytes | None:
    """``data`` (a ``.pyc``) with every code object's ``co_filename`` set to ``filename``,
    or None when there is nothing to change or it cannot be done exactly.

    The importer replaces a ``.pyc``'s ``co_filename`` with the path it loads the source's
    module from (``_imp._fix_co_filename``), so the build directory a ``.pyc`` records is
    never seen through an import. The string is replaced where marshal wrote it (later uses
    are references by index, not by offset); the result must load as the same code, with the
    new file name everywhere, or the ``.pyc`` is left as it was."""
    if data[:4] != MAGIC:  # marshal's format is this Python's
        return None
    try:
        code = marshal.loads(data[HEADER_SIZE:])
    except (EOFError, ValueError, TypeError, RecursionError, MemoryError):
        return None
    if not isinstance(code, CodeType) or code.co_filename == filename:
        return None
    old = code.co_filename
    body = data[HEADER_SIZE:]
    for kind in (*_SHORT, *_LONG_ASCII, *_UNICODE):
        for flag in (0, _FLAG_REF):
            pattern = _marshalled(old, kind | flag)
            if pattern is not None and pattern in body:
                new = _marshalled(filename, _kind_for(filename, kind) | flag)
                assert new is not None
                body = body.replace(pattern, new)
    try:
        rewritten = marshal.loads(body)
    except (EOFError, ValueError, TypeError, RecursionError, MemoryError):
        return None
    if rewritten != code or not all(c.co_filename == filename for c in _codes(rewritten)):
        return None
    return data[:HEADER_SIZE] + body


def _marshalled(text: str, kind: int) -> bytes | None:
    base = kind & ~_FLAG_REF
    if base in _SHORT:
        if not text.isascii() or len(text) > 255:
            return None
        return bytes([kind, len(text)]) + text.encode("ascii")
    if base in _LONG_ASCII:
        if not text.isascii():
            return None
        return bytes([kind]) + _WORD.pack(len(text)) + text.encode("ascii")
    raw = text.encode("utf-8", "surrogatepass")
    return bytes([kind]) + _WORD.pack(len(raw)) + raw


def _kind_for(text: str, old_kind: int) -> int:
    """The marshal type ``text`` takes in the place of a string of type ``old_kind``
    (interned stays interned)."""
    interned = old_kind in (ord("Z"), ord("A"), ord("t"))
    if not text.isascii():
        return ord("t") if interned else ord("u")
    if len(text) <= 255:
        return ord("Z") if interned else ord("z")
    return ord("A") if interned else ord("a")


def _codes(code: CodeType) -> list[CodeType]:
    out = [code]
    for const in code.co_consts:
        if isinstance(const, CodeType):
            out += _codes(const)
    return out
