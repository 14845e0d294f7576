"""Why two versions of a file differ: the causes ``lazycaf diff --explain`` names.

``explain(a, b)`` tries, in order, what a rebuild of unchanged sources changes without
meaning: the source-mtime field of a ``.pyc`` header, the build path a ``.pyc`` records as
``co_filename`` (the importer replaces it with the path it loads from), the timestamps
inside a zip (wheels, jars) or a tar archive (also inside a gzip stream), a gzip header's
mtime, an ELF file's build id and ``.gnu_debuglink``. Each step blanks those fields in both
versions; a step is a cause when it removed differences. If the versions still differ, a
path embedded in both whose root differs between the builds (``/tmp/build-1/...`` against
``/tmp/build-2/...``, a random temporary name) is tried: its root in the first version
replaced by the second's. What remains is "bytes": the first differing offset and the
share of bytes that differ.

Pure and synchronous (parsing of headers only: nothing is executed or unpacked to disk);
callers run it in a worker thread.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from lazycaf.builds.pyc import HEADER_SIZE, MAGIC, parse_header, with_filename

__all__ = ["MEANINGLESS", "Cause", "Explanation", "explain"]

# Kinds of cause that change no byte a program reads as code or data.
MEANINGLESS: Final = frozenset(
    {"mtime", "pyc-mtime", "pyc-filename", "zip-time", "tar-time", "gzip-time", "elf-build-id"}
)
_DESCRIBED: Final = {
    "mtime": "the mtime in the manifest",
    "pyc-mtime": "the .pyc source-mtime field",
    "pyc-header": "the .pyc header's source fields",
    "pyc-filename": "the build path a .pyc records (imports replace it)",
    "zip-time": "a timestamp inside a zip member",
    "tar-time": "a timestamp inside a tar member",
    "gzip-time": "the gzip header's timestamp",
    "gzip-member": "the contents of a gzip stream",
    "elf-build-id": "the ELF build id or .gnu_debuglink",
    "build-path": "an embedded build path that differs between the builds",
    "bytes": "byte differences",
}
_MAX_UNZIP: Final = 256 << 20  # a gzip stream is looked into up to this size decoded
_BLOCK: Final = 4096
_PATH_MAX: Final = 4096  # a root longer than a path can be is not one


@dataclass(frozen=True)
class Cause:
    kind: str
    detail: str = ""

    def text(self) -> str:
        base = _DESCRIBED[self.kind]
        return f"{base} ({self.detail})" if self.detail else base


@dataclass(frozen=True)
class Explanation:
    causes: tuple[Cause, ...]

    @property
    def meaningless(self) -> bool:
        """Every cause is one that carries no meaning."""
        return bool(self.causes) and all(c.kind in MEANINGLESS for c in self.causes)

    def text(self) -> str:
        """The causes, one after the other ("only ..." when there is one, not "bytes")."""
        text = "; ".join(c.text() for c in self.causes)
        alone = len(self.causes) == 1 and self.causes[0].kind != "bytes"
        return f"only {text}" if alone else text


def explain(a: bytes, b: bytes) -> Explanation:
    """The causes of the differences from ``a`` to ``b`` (two versions of one file)."""
    if a == b:
        return Explanation(())
    causes: list[Cause] = []
    gz = _gzip_inside(a, b)
    if gz is not None:
        return gz
    for blank in _BLANKERS:
        na, nb = blank(a), blank(b)
        if _fewer_differences(a, b, na, nb):
            kind = blank.__name__.removeprefix("_blank_").replace("_", "-")
            cause = _pyc_cause(a, b) if kind == "pyc" else Cause(kind)
            if cause is None:
                continue  # other code: its header differs as a matter of course
            causes.append(cause)
            a, b = na, nb
            if a == b:
                return Explanation(tuple(causes))
    paths = _build_paths(a, b)
    if paths is not None:
        roots, a = paths
        detail = ", ".join(
            f"{ra.decode(errors='replace')} -> {rb.decode(errors='replace')}" for ra, rb in roots
        )
        causes.append(Cause("build-path", detail))
        if a == b:
            return Explanation(tuple(causes))
    causes.append(Cause("bytes", _byte_detail(a, b)))
    return Explanation(tuple(causes))


def _fewer_differences(a: bytes, b: bytes, na: bytes, nb: bytes) -> bool:
    if na == a and nb == b:
        return False
    if na == nb:
        return True
    return _differing(na, nb) < _differing(a, b)  # position by position, plus the lengths


def _pyc_cause(a: bytes, b: bytes) -> Cause | None:
    """Which source fields of two ``.pyc`` headers differ (None: the headers are of another
    kind of file): only the mtime carries no meaning. The code after the header may differ
    too; the next steps look at it."""
    if a[:8] != b[:8]:
        return None
    return Cause("pyc-mtime") if a[12:16] == b[12:16] else Cause("pyc-header")


# -- the blankers: each returns its input with the fields it knows zeroed -------------------
def _blank_pyc(data: bytes) -> bytes:
    header = parse_header(data)
    if header is None:
        return data
    return data[:8] + bytes(8) + data[HEADER_SIZE:]


_ZIP_EOCD: Final = b"PK\x05\x06"
_ZIP_CEN: Final = b"PK\x01\x02"
_ZIP_LOC: Final = b"PK\x03\x04"


def _blank_pyc_filename(data: bytes) -> bytes:
    """``co_filename`` set to one value: only in a ``.pyc`` of this Python (``marshal``
    reads no other version's code, and it is not meant for arbitrary bytes)."""
    header = parse_header(data)
    if header is None or header.magic != MAGIC:
        return data
    return with_filename(data, "?") or data


def _blank_zip_time(data: bytes) -> bytes:
    """Zero the DOS times and dates of every member (local and central headers) and the
    extended-timestamp (0x5455) and NTFS (0x000a) extra fields."""
    if not data.startswith(_ZIP_LOC):
        return data
    end = data.rfind(_ZIP_EOCD, max(0, len(data) - (1 << 16) - 22))
    if end < 0 or end + 22 > len(data):
        return data
    count, cd_size, cd_off = struct.unpack_from("<HII", data, end + 10)
    if cd_off + cd_size > end:
        return data  # ZIP64 or damaged: not looked into
    out = bytearray(data)
    pos = cd_off
    try:
        for _ in range(count):
            if out[pos : pos + 4] != _ZIP_CEN:
                return data
            name_len, extra_len, comment_len = struct.unpack_from("<HHH", out, pos + 28)
            local = struct.unpack_from("<I", out, pos + 42)[0]
            out[pos + 12 : pos + 16] = bytes(4)
            _blank_zip_extra(out, pos + 46 + name_len, extra_len)
            if local + 30 <= len(out) and out[local : local + 4] == _ZIP_LOC:
                out[local + 10 : local + 14] = bytes(4)
                lname, lextra = struct.unpack_from("<HH", out, local + 26)
                _blank_zip_extra(out, local + 30 + lname, lextra)
            pos += 46 + name_len + extra_len + comment_len
    except struct.error:
        return data
    return bytes(out)


def _blank_zip_extra(out: bytearray, start: int, length: int) -> None:
    pos, end = start, min(start + length, len(out))
    while pos + 4 <= end:
        tag, size = struct.unpack_from("<HH", out, pos)
        if pos + 4 + size > end:  # a field past its header's end: not looked into
            return
        if tag == 0x5455 and size > 1:  # flags byte, then 32-bit times
            out[pos + 5 : pos + 4 + size] = bytes(size - 1)
        elif tag == 0x000A:  # NTFS: reserved, then tagged attributes holding times
            out[pos + 8 : pos + 4 + size] = bytes(max(0, size - 4))
        pos += 4 + size


def _blank_tar_time(data: bytes) -> bytes:
    """Zero each member header's mtime and checksum, and the digits of pax ``mtime=``,
    ``atime=`` and ``ctime=`` records."""
    if len(data) < 512 or data[257:262] != b"ustar":
        return data
    out = bytearray(data)
    pos = 0
    while pos + 512 <= len(out) and out[pos : pos + 512] != bytes(512):
        if out[pos + 257 : pos + 262] != b"ustar":
            return data
        try:
            size = int(bytes(out[pos + 124 : pos + 136]).strip(b"\0 ") or b"0", 8)
        except ValueError:
            return data
        typeflag = bytes(out[pos + 156 : pos + 157])
        out[pos + 136 : pos + 148] = bytes(12)
        out[pos + 148 : pos + 156] = bytes(8)
        body = pos + 512
        if typeflag in (b"x", b"g"):
            _blank_pax_times(out, body, size)
        pos = body + -(-size // 512) * 512
    return bytes(out)


def _blank_pax_times(out: bytearray, start: int, size: int) -> None:
    for key in (b" mtime=", b" atime=", b" ctime="):
        at = out.find(key, start, start + size)
        while at >= 0:
            value = at + len(key)
            stop = out.find(b"\n", value, start + size)
            if stop < 0:
                break
            out[value:stop] = b"0" * (stop - value)
            at = out.find(key, stop, start + size)


def _blank_gzip_time(data: bytes) -> bytes:
    if len(data) < 10 or data[:2] != b"\x1f\x8b":
        return data
    return data[:4] + bytes(4) + data[8:]


_NOTE_SECTIONS: Final = (b".note.gnu.build-id", b".gnu_debuglink")


def _blank_elf_build_id(data: bytes) -> bytes:
    """Zero the contents of ``.note.gnu.build-id`` and ``.gnu_debuglink``."""
    if data[:4] != b"\x7fELF" or len(data) < 64:
        return data
    wide, order = data[4] == 2, "<" if data[5] == 1 else ">"
    try:
        if wide:
            (shoff,) = struct.unpack_from(order + "Q", data, 0x28)
            entsize, count, strndx = struct.unpack_from(order + "HHH", data, 0x3A)
            field = struct.Struct(order + "IIQQQQ")  # name, type, flags, addr, offset, size
        else:
            (shoff,) = struct.unpack_from(order + "I", data, 0x20)
            entsize, count, strndx = struct.unpack_from(order + "HHH", data, 0x2E)
            field = struct.Struct(order + "IIIIII")
        if not shoff or count == 0 or strndx >= count:
            return data
        sections = [field.unpack_from(data, shoff + i * entsize) for i in range(count)]
        names_at, names_size = sections[strndx][4], sections[strndx][5]
        names = data[names_at : names_at + names_size]
    except struct.error:
        return data
    out = bytearray(data)
    for name_off, _, _, _, offset, size in sections:
        name = names[name_off : names.find(b"\0", name_off)]
        if name in _NOTE_SECTIONS and offset + size <= len(out):
            out[offset : offset + size] = bytes(size)
    return bytes(out)


_BLANKERS: Final[tuple[Callable[[bytes], bytes], ...]] = (
    _blank_pyc,
    _blank_pyc_filename,
    _blank_zip_time,
    _blank_tar_time,
    _blank_gzip_time,
    _blank_elf_build_id,
)


def _gzip_inside(a: bytes, b: bytes) -> Explanation | None:
    """Two gzip streams whose decoded contents differ: the contents explained (a tar.gz of
    files with new mtimes), plus the header's timestamp when that differs too."""
    if a[:2] != b"\x1f\x8b" or b[:2] != b"\x1f\x8b":
        return None
    try:
        da, db = _gunzip(a), _gunzip(b)
    except (zlib.error, ValueError):
        return None
    if da == db:
        return None  # the same contents: the header (or the compression) differs
    inner = explain(da, db)
    causes = [Cause("gzip-member")] + [c for c in inner.causes]
    if a[4:8] != b[4:8]:
        causes.append(Cause("gzip-time"))
    if inner.meaningless:
        causes = [c for c in causes if c.kind != "gzip-member"]
    return Explanation(tuple(causes))


def _gunzip(data: bytes) -> bytes:
    """The decoded first member of a gzip stream, at most ``_MAX_UNZIP`` bytes."""
    d = zlib.decompressobj(wbits=31)
    out = d.decompress(data, _MAX_UNZIP + 1)
    if len(out) > _MAX_UNZIP or not d.eof:
        raise ValueError("too big to look into, or cut short")
    return out


# -- embedded paths and what remains --------------------------------------------------------
def _build_paths(a: bytes, b: bytes) -> tuple[list[tuple[bytes, bytes]], bytes] | None:
    """Roots of absolute paths that differ between the builds, and ``a`` with each replaced
    by ``b``'s (at most 4 roots); None when the first difference is not inside a path."""
    roots: list[tuple[bytes, bytes]] = []
    for _ in range(4):
        at = _first_difference(a, b)
        if at is None:
            break
        pa, pb = _printable_around(a, at), _printable_around(b, at)
        ra, rb = _differing_root(pa, pb)
        if not ra or not rb or max(len(ra), len(rb)) > _PATH_MAX or ra not in a:
            break
        replaced = a.replace(ra, rb)
        if replaced == a or len(replaced) > 2 * len(b) + _PATH_MAX:  # not a path after all
            break
        roots.append((ra, rb))
        a = replaced
    return (roots, a) if roots else None


def _printable_around(data: bytes, at: int) -> bytes:
    lo = at
    while lo > 0 and 0x20 < data[lo - 1] < 0x7F:
        lo -= 1
    hi = at
    while hi < len(data) and 0x20 < data[hi] < 0x7F:
        hi += 1
    return data[lo:hi]


_PATH_CHARS: Final = frozenset(
    b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-+~@/"
)


def _differing_root(pa: bytes, pb: bytes) -> tuple[bytes, bytes]:
    """From two printable runs that differ inside a path, the roots that differ: from the
    start of the path up to the end of the differing component (``/tmp/b-1/lib/x`` and
    ``/tmp/b-22/lib/x`` give ``/tmp/b-1`` and ``/tmp/b-22``; ``v1/pkg/m.py`` and
    ``v2/pkg/m.py`` give ``v1`` and ``v2``); empty when the common tail holds no ``/``."""
    n = min(len(pa), len(pb))
    suffix = 0
    while suffix < n and pa[-1 - suffix] == pb[-1 - suffix]:
        suffix += 1
    slash = pa[len(pa) - suffix :].find(b"/")
    if slash < 0:
        return b"", b""
    end_a, end_b = len(pa) - suffix + slash, len(pb) - suffix + slash
    prefix = 0
    while prefix < min(end_a, end_b) and pa[prefix] == pb[prefix]:
        prefix += 1
    start = prefix
    while start > 0 and pa[start - 1] in _PATH_CHARS:
        start -= 1
    slash = pa.find(b"/", start, prefix + 1)
    if slash > start:  # an absolute path: what comes before its first "/" is not part of it
        start = slash
    ra, rb = pa[start:end_a], pb[start:end_b]
    if len(ra) < 2 or len(rb) < 2 or ra == rb:
        return b"", b""
    return ra, rb


def _first_difference(a: bytes, b: bytes) -> int | None:
    n = min(len(a), len(b))
    lo = 0
    while lo < n:  # blocks compared by memcmp first
        hi = min(n, lo + _BLOCK)
        if a[lo:hi] != b[lo:hi]:
            return next(i for i in range(lo, hi) if a[i] != b[i])
        lo = hi
    return None if len(a) == len(b) else n


def _differing(a: bytes, b: bytes) -> int:
    """Bytes that differ position by position, plus the difference in length."""
    n = min(len(a), len(b))
    count = abs(len(a) - len(b))
    for lo in range(0, n, _BLOCK):
        hi = min(n, lo + _BLOCK)
        if a[lo:hi] != b[lo:hi]:  # the zero bytes of a XOR b are the equal ones
            xor = int.from_bytes(a[lo:hi], "little") ^ int.from_bytes(b[lo:hi], "little")
            count += (hi - lo) - xor.to_bytes(hi - lo, "little").count(0)
    return count


def _byte_detail(a: bytes, b: bytes) -> str:
    at = _first_difference(a, b)
    share = _differing(a, b) / max(len(a), len(b), 1)
    size = "" if len(a) == len(b) else f", {len(a)} -> {len(b)} bytes"
    return f"first at byte {at}, {share:.1%} of bytes differ{size}"
