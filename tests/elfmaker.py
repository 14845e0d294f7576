"""Minimal 64-bit ELF shared objects for tests: the headers, segments and dynamic section a
dynamic loader reads, padded with random bytes (no code: nothing here is ever run)."""

from __future__ import annotations

import os
import struct

_VADDR_SHIFT = 0x1000  # the writable segment's address is its offset plus this


def make_elf(
    size: int,
    *,
    needed: tuple[str, ...] = (),
    runpath: str | None = None,
    tables_at: int = 4096,
    writable_at: int | None = None,
) -> bytes:
    """A shared object of ``size`` bytes: its string table (and a symbol table before it) at
    ``tables_at``, its writable segment (holding the dynamic section) at ``writable_at``
    (default: the last 8 KiB), DT_NEEDED ``needed`` and DT_RUNPATH ``runpath``."""
    w_at = size - 8192 if writable_at is None else writable_at
    w_len = 8192
    strings = b"\0"
    offsets = []
    for name in (*needed, *([runpath] if runpath is not None else [])):
        offsets.append(len(strings))
        strings += name.encode() + b"\0"
    symtab_len = 256
    strtab_at = tables_at + symtab_len
    dyn: list[tuple[int, int]] = [(1, off) for off in offsets[: len(needed)]]
    if runpath is not None:
        dyn.append((29, offsets[-1]))
    dyn += [(6, tables_at), (5, strtab_at), (10, len(strings)), (0, 0)]
    dynamic = b"".join(struct.pack("<QQ", t, v) for t, v in dyn)
    phdrs = [
        (1, 5, 0, 0, w_at, w_at),  # PT_LOAD R+X: headers, tables, "code"
        (1, 6, w_at, w_at + _VADDR_SHIFT, w_len, w_len),  # PT_LOAD RW
        (2, 6, w_at, w_at + _VADDR_SHIFT, len(dynamic), len(dynamic)),  # PT_DYNAMIC
    ]
    header = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header += struct.pack("<HHIQQQIHHHHHH", 3, 62, 1, 0, 64, 0, 0, 64, 56, len(phdrs), 64, 0, 0)
    table = b"".join(
        struct.pack("<IIQQQQQQ", t, fl, off, va, va, fs, ms, 0x1000)
        for t, fl, off, va, fs, ms in phdrs
    )
    data = bytearray(os.urandom(size))  # random: no two chunks share a blob
    data[0 : len(header)] = header
    data[64 : 64 + len(table)] = table
    data[strtab_at : strtab_at + len(strings)] = strings
    data[w_at : w_at + len(dynamic)] = dynamic
    return bytes(data)
