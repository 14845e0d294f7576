"""What the dynamic loader reads of a library and what it needs (``lazycaf.mount.elfdeps``),
from whole files and from files whose chunks arrive a few at a time."""

from __future__ import annotations

import glob
import os
import random

import pytest

from lazycaf.mount.elfdeps import ElfDeps, Missing, elf_deps
from tests.elfmaker import make_elf

MIB = 1 << 20


def whole(data: bytes):  # type: ignore[no-untyped-def]
    def read(off: int, n: int) -> bytes:
        if off + n > len(data):
            raise ValueError("past the end")
        return data[off : off + n]

    return read


def test_needs_search_path_and_loader_ranges() -> None:
    data = make_elf(
        17 * MIB,
        needed=("libdep.so", "libc.so.6"),
        runpath="$ORIGIN:$ORIGIN/../lib",
        tables_at=2 * MIB + 100,
    )
    deps = elf_deps(whole(data), len(data))
    assert deps is not None
    assert deps.needed == ("libdep.so", "libc.so.6")
    assert deps.search == ("$ORIGIN", "$ORIGIN/../lib")
    touched = {k for off, n in deps.loader for k in range(off // MIB, (off + n - 1) // MIB + 1)}
    assert touched == {0, 2, 16}  # headers, the tables, the writable segment (dynamic)


def test_chunk_by_chunk_it_asks_for_what_it_lacks() -> None:
    data = make_elf(17 * MIB, needed=("libdep.so",), tables_at=5 * MIB)
    have = {0}
    asked = []

    def read(off: int, n: int) -> bytes:
        lacking = [k for k in range(off // MIB, (off + n - 1) // MIB + 1) if k not in have]
        if lacking:
            raise Missing([(k * MIB, MIB) for k in lacking], [])
        return data[off : off + n]

    while True:
        try:
            deps = elf_deps(read, len(data))
            break
        except Missing as missing:
            asked.append(sorted({off // MIB for off, _ in missing.wanted}))
            have.update(off // MIB for off, _ in missing.wanted)
    assert asked == [[16], [5]]  # the dynamic section, then the string table
    assert deps == ElfDeps(("libdep.so",), (), deps.loader)


def test_real_libraries_of_this_machine() -> None:
    libs = [p for p in glob.glob("/usr/lib/x86_64-linux-gnu/lib*.so.*") if os.path.isfile(p)]
    assert libs
    for path in sorted(libs)[:40]:
        with open(path, "rb") as f:
            data = f.read()
        deps = elf_deps(whole(data), len(data))
        assert deps is not None, path
        assert all(n and "\0" not in n for n in deps.needed)
        assert all(off >= 0 and off + n <= len(data) for off, n in deps.loader)


def test_not_elf_or_damaged_is_none_never_an_error() -> None:
    assert elf_deps(whole(b"#!/bin/sh\n" * 20), 200) is None
    good = make_elf(64 << 10, needed=("libx.so",))
    rng = random.Random(7)
    for _ in range(500):  # flipped bytes in the headers and the dynamic section
        data = bytearray(good)
        for _ in range(8):
            at = rng.choice([rng.randrange(0, 300), rng.randrange(len(data) - 8192, len(data))])
            data[at] = rng.randrange(256)
        try:
            deps = elf_deps(whole(bytes(data)), len(data))
        except Missing:  # pragma: no cover - whole() never lacks bytes
            pytest.fail("asked for bytes a whole file has")
        if deps is not None:
            assert all(off >= 0 and off + n <= len(data) for off, n in deps.loader)
