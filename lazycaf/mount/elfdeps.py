"""What the dynamic loader will read of a shared library, and which libraries it needs.

When a process loads an ELF object (an extension module, a library it links), the loader
reads its headers, its dynamic section, the dynamic symbol, string, hash, version and
relocation tables, and every page relocations write (the writable segments), then runs its
initialisers. For ``libtorch_cpu.so`` (434 MB, 415 chunks of 1 MiB) those are 22 chunks, and
all 22 are among the 117 ``import torch`` reads; the rest it reads are code and constants
its initialisers touch, which no header tells. So a library too large to prefetch whole
(``lazycaf.mount.importcrawl``) has those ranges prefetched, and each library it needs
(``DT_NEEDED``, found on its ``DT_RUNPATH``/``DT_RPATH``, ``$ORIGIN`` meaning its own
directory) is looked at in turn.

The bytes are the executable's and untrusted: every count and offset is bounded and
checked, and nothing here does more than slice bytes (``struct``). Only 64-bit
little-endian objects are read; anything else is not an ELF object here (None).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

__all__ = ["ElfDeps", "Missing", "elf_deps"]

_PT_LOAD: Final = 1
_PT_DYNAMIC: Final = 2
_PF_X: Final = 1
_PF_W: Final = 2
_MAX_PHDRS: Final = 256
_MAX_DYNAMIC: Final = 64 << 10
_MAX_STRING: Final = 4096
_MAX_NEEDED: Final = 256
_MAX_TABLES: Final = 256 << 20  # a larger span of loader tables is not believed
_TABLE_STARTS: Final = {  # tags whose value is the address of a table the loader reads
    4,  # DT_HASH
    5,  # DT_STRTAB
    6,  # DT_SYMTAB
    7,  # DT_RELA
    17,  # DT_REL
    23,  # DT_JMPREL
    0x6FFFFEF5,  # DT_GNU_HASH
    0x6FFFFFF0,  # DT_VERSYM
    0x6FFFFFFC,  # DT_VERDEF
    0x6FFFFFFE,  # DT_VERNEED
}
_TABLE_SIZES: Final = {5: 10, 7: 8, 17: 18, 23: 2}  # start tag -> its size tag
_CODE_ENTRIES: Final = {12, 13}  # DT_INIT, DT_FINI: code the loader runs
_NEEDED: Final = 1
_RPATH: Final = 15
_RUNPATH: Final = 29

Range = tuple[int, int]  # (file offset, length)


class Missing(Exception):
    """``read`` lacks bytes: ``wanted`` ranges, and the loader ranges known so far."""

    def __init__(self, wanted: list[Range], loader: list[Range]) -> None:
        super().__init__(wanted)
        self.wanted = wanted
        self.loader = loader


@dataclass(frozen=True)
class ElfDeps:
    needed: tuple[str, ...]  # DT_NEEDED names, in order
    search: tuple[str, ...]  # DT_RUNPATH (else DT_RPATH) entries, as written
    loader: tuple[Range, ...]  # file ranges the dynamic loader reads


def elf_deps(read: Callable[[int, int], bytes], size: int) -> ElfDeps | None:
    """The libraries an ELF object of ``size`` bytes needs and the ranges the loader reads
    of it. ``read(offset, n)`` returns those bytes or raises ``Missing`` (the caller fetches
    them and asks again). None: not a 64-bit little-endian ELF object, or a malformed one."""
    try:
        return _parse(read, size)
    except (struct.error, ValueError, IndexError):
        return None


def _parse(read: Callable[[int, int], bytes], size: int) -> ElfDeps | None:
    if size < 64:
        return None
    head = read(0, 64)
    if head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
        return None
    phoff, phentsize, phnum = (
        struct.unpack_from("<Q", head, 0x20)[0],
        *struct.unpack_from("<HH", head, 0x36),
    )
    if phentsize != 56 or not 0 < phnum <= _MAX_PHDRS or phoff + phnum * 56 > size:
        return None
    loads: list[tuple[int, int, int, int]] = []  # (vaddr, offset, filesz, flags)
    dynamic: Range | None = None
    table = read(phoff, phnum * 56)
    for i in range(phnum):
        ptype, flags, off, vaddr, _, filesz = struct.unpack_from("<IIQQQQ", table, i * 56)
        if off > size or filesz > size - off:
            continue
        if ptype == _PT_LOAD:
            loads.append((vaddr, off, filesz, flags))
        elif ptype == _PT_DYNAMIC and 0 < filesz <= _MAX_DYNAMIC:
            dynamic = (off, filesz)
    loader: list[Range] = [(0, min(size, 4096)), (phoff, phnum * 56)]
    for _, off, filesz, flags in loads:
        if flags & _PF_W:
            loader.append((off, filesz))  # relocations write here
        elif flags & _PF_X:
            loader.append((off, min(filesz, 4096)))
    if dynamic is None:  # static: nothing to load
        return ElfDeps((), (), tuple(loader))
    loader.append(dynamic)
    try:
        dyn = read(*dynamic)
    except Missing as missing:
        raise Missing(missing.wanted, loader) from None
    entries: list[tuple[int, int]] = []
    for k in range(len(dyn) // 16):
        tag, val = struct.unpack_from("<QQ", dyn, 16 * k)
        if tag == 0:
            break
        entries.append((tag, val))
    values = {tag: val for tag, val in entries}

    def offset_of(vaddr: int) -> int | None:
        for v, off, filesz, _ in loads:
            if v <= vaddr < v + filesz:
                return off + (vaddr - v)
        return None

    starts = [o for t in _TABLE_STARTS if t in values and (o := offset_of(values[t])) is not None]
    ends = [
        o + values[s]
        for t, s in _TABLE_SIZES.items()
        if t in values and s in values and (o := offset_of(values[t])) is not None
    ]
    if starts:
        lo, hi = min(starts), min(size, max(starts + ends) + 1)
        if hi - lo <= _MAX_TABLES:
            loader.append((lo, hi - lo))
    for t in _CODE_ENTRIES:
        if t in values and (o := offset_of(values[t])) is not None:
            loader.append((o, 1))
    strtab = offset_of(values[5]) if 5 in values else None
    strsz = values.get(10, 0)
    if strtab is None:
        return ElfDeps((), (), tuple(loader))
    names = [v for t, v in entries if t == _NEEDED][:_MAX_NEEDED]
    search = values.get(_RUNPATH, values.get(_RPATH))
    wanted = [*names, *([search] if search is not None else [])]
    texts: dict[int, str] = {}
    lacking: list[Range] = []
    for at in wanted:
        if at >= strsz:
            continue
        n = min(_MAX_STRING, strsz - at, size - (strtab + at))
        try:
            raw = read(strtab + at, n)
        except Missing as missing:
            lacking += missing.wanted
            continue
        texts[at] = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
    if lacking:
        raise Missing(lacking, loader)
    needed = tuple(texts[at] for at in names if texts.get(at))
    paths = tuple(p for p in texts.get(search, "").split(":") if p) if search is not None else ()
    return ElfDeps(needed, paths, tuple(loader))
