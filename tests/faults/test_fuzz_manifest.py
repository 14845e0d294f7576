"""A fuzz test of the manifest decoder: a fixed seed, thousands of mutations, seconds.

Faults injected, each into the canonical bytes of a valid manifest holding every kind of
entry (directories, small, empty and chunked files, symlinks, hard links, non-ASCII names):
- bit flips (1 to 8 bits anywhere);
- truncations (at any offset);
- splices (a range of the manifest, or of another manifest, inserted, overwritten or
  deleted somewhere else);
- length-field edits (a column's u64 length set to an edge value, with or without the
  column's bytes grown or cut to match, so the decoder reads on into the next columns);
- header edits (entry count, chunk size, root mode, version, flags);
- column-value edits that keep the layout (a kind letter, a mode, an mtime or a size set
  to an edge value; two paths swapped; a path byte changed).

Every mutation either decodes to a manifest whose encoding is the mutated bytes exactly
(decoding accepts only canonical bytes) and which the constructor accepts, or raises
``ManifestError``: never another exception, never a hang (a watchdog alarm bounds the run).
"""

from __future__ import annotations

import random
import signal
import struct
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

import pytest

from lazycaf.core.chunking import chunk_count
from lazycaf.core.digest import Digest
from lazycaf.core.errors import ManifestError
from lazycaf.core.manifest import DIR, FILE, HARDLINK, SYMLINK, Entry, Manifest

SEED = 13
MUTATIONS = 4000
CHUNK = 64 << 10
HEADER = 32
EDGES = (0, 1, 2, 7, 255, 256, 4095, 4096, CHUNK - 1, CHUNK, CHUNK + 1, 1 << 31, 1 << 32)
EDGES64 = (*EDGES, (1 << 63) - 1, 1 << 63, (1 << 64) - 1)


def file(path: str, size: int, mode: int = 0o644) -> Entry:
    chunks = tuple(Digest.of(f"{path}#{i}".encode()) for i in range(chunk_count(size, CHUNK)))
    digest = Digest.of(path.encode() if size else b"")  # size 0: the empty blob's digest
    return Entry(path, FILE, mode, 1_700_000_000_000_000_000 + size, size, digest, chunks)


def seed_manifests() -> list[bytes]:
    big = file("bin/python3.11", 3 * CHUNK + 17, 0o755)
    lib = file("lib/libz.so.1.2", 70_000, 0o755)
    one = Manifest(
        [
            Entry("bin", DIR, 0o755, 5, 0),
            big,
            Entry("bin/python", SYMLINK, 0o777, 6, 10, target="python3.11"),
            big._replace(path="bin/pythonz", kind=HARDLINK, target=big.path),
            Entry("lib", DIR, 0o755, 7, 0),
            lib,
            lib._replace(path="lib/libz.so.2", kind=HARDLINK, target=lib.path),
            Entry("lib/données", DIR, 0o700, -8, 0),
            file("lib/données/日本語.txt", 12),
            file("lib/empty", 0),
            file("lib/exact", CHUNK),
            Entry("lib/up", SYMLINK, 0o777, 9, 5, target="../bi"),
            Entry("share", DIR, 0o1777, 10, 0),
            Entry("share/abs", SYMLINK, 0o777, 11, 19, target="/usr/share/zoneinfo"),
        ],
        chunk_size=CHUNK,
        root_mode=0o755,
        root_mtime_ns=1_700_000_000_123_456_789,
    )
    two = Manifest(
        [Entry("a", DIR, 0o755, 1, 0), file("a/b", 2 * CHUNK), file("c", 3)], chunk_size=CHUNK
    )
    return [one.encode(), two.encode(), Manifest([], chunk_size=CHUNK).encode()]


def columns(data: bytes) -> list[tuple[int, int]]:
    """(offset of the length field, length) of each of the 8 columns of valid bytes."""
    out, pos = [], HEADER
    for _ in range(8):
        (length,) = struct.unpack_from("<Q", data, pos)
        out.append((pos, length))
        pos += 8 + length
    return out


Mutation = Callable[[random.Random, bytes, list[bytes]], bytes]


def bit_flips(rng: random.Random, data: bytes, seeds: list[bytes]) -> bytes:
    out = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 3, 8))):
        out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return bytes(out)


def truncation(rng: random.Random, data: bytes, _: list[bytes]) -> bytes:
    return data[: rng.randrange(len(data))]


def splice(rng: random.Random, data: bytes, seeds: list[bytes]) -> bytes:
    donor = rng.choice([data, *seeds])
    a = rng.randrange(len(donor))
    piece = donor[a : a + rng.choice((1, 2, 8, 32, rng.randrange(1, 200)))]
    at = rng.randrange(len(data) + 1)
    how = rng.choice(("insert", "overwrite", "delete"))
    if how == "insert":
        return data[:at] + piece + data[at:]
    if how == "overwrite":
        return data[:at] + piece + data[at + len(piece) :]
    return data[:at] + data[at + len(piece) :]


def length_edit(rng: random.Random, data: bytes, _: list[bytes]) -> bytes:
    pos, length = rng.choice(columns(data))
    new = rng.choice((*EDGES64, length + 1, length - 1, length + 32, max(0, length - 32)))
    new = max(0, min(new, (1 << 64) - 1))
    head = data[:pos] + struct.pack("<Q", new)
    body = data[pos + 8 :]
    if rng.random() < 0.5 and new < length + 4096:  # make the column really that long
        start, rest = body[:length], body[length:]
        grown = start[:new] + bytes(rng.randrange(256) for _ in range(max(0, new - length)))
        return head + grown + rest
    return head + body


def header_edit(rng: random.Random, data: bytes, _: list[bytes]) -> bytes:
    """The version, flags, chunk size, root mode or entry count set to an edge value."""
    at, fmt = rng.choice(((8, "<H"), (10, "<H"), (12, "<I"), (16, "<I"), (28, "<I")))
    limit = (1 << (8 * struct.calcsize(fmt))) - 1
    (value,) = struct.unpack_from(fmt, data, at)
    new = rng.choice((*EDGES, value + 1, value - 1, 0o4755, 0o40755, 4 << 20, limit))
    return _put(data, at, fmt, max(0, min(new, limit)))


def _put(data: bytes, at: int, fmt: str, value: int) -> bytes:
    return data[:at] + struct.pack(fmt, value) + data[at + struct.calcsize(fmt) :]


def value_edit(rng: random.Random, data: bytes, _: list[bytes]) -> bytes:
    cols = columns(data)
    (n,) = struct.unpack_from("<I", data, 28)
    if n == 0:
        return bit_flips(rng, data, _)
    i = rng.randrange(n)
    which = rng.choice(("kind", "mode", "mtime", "size", "paths", "path byte"))
    if which == "kind":
        return _put(data, cols[0][0] + 8 + i, "<B", ord(rng.choice("dflhcbp\0")))
    if which == "mode":
        return _put(
            data,
            cols[1][0] + 8 + 2 * i,
            "<H",
            rng.choice((0, 0o777, 0o4755, 0o7777, 0o10000, 0xFFFF)),
        )
    if which == "mtime":
        return _put(
            data, cols[2][0] + 8 + 8 * i, "<q", rng.choice((0, -1, -(1 << 63), (1 << 63) - 1))
        )
    if which == "size":
        return _put(data, cols[3][0] + 8 + 8 * i, "<Q", rng.choice(EDGES64))
    pos, length = cols[4]
    paths = data[pos + 8 : pos + 8 + length].split(b"\0")
    if which == "paths" and len(paths) > 1:
        a, b = rng.sample(range(len(paths)), 2)
        paths[a], paths[b] = paths[b], paths[a]
    else:
        p = bytearray(paths[i])
        if p:
            p[rng.randrange(len(p))] = rng.choice(b"/.\0\xff\xc3a")
        paths[i] = bytes(p)
    joined = b"\0".join(paths)
    return data[:pos] + struct.pack("<Q", len(joined)) + joined + data[pos + 8 + length :]


MUTATORS: dict[str, Mutation] = {
    "bit flips": bit_flips,
    "truncation": truncation,
    "splice": splice,
    "length edit": length_edit,
    "header edit": header_edit,
    "value edit": value_edit,
}


class Hang(Exception):
    pass


@contextmanager
def watchdog(seconds: int) -> Iterator[None]:
    """Fail the test instead of hanging it: SIGALRM after ``seconds`` (generous)."""

    def fire(signum: int, frame: FrameType | None) -> None:
        raise Hang(f"the fuzz run did not finish within {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_every_mutation_decodes_canonically_or_raises_manifest_error() -> None:
    rng = random.Random(SEED)
    seeds = seed_manifests()
    outcomes: Counter[tuple[str, str]] = Counter()
    with watchdog(120):
        for trial in range(MUTATIONS):
            kind = rng.choice(list(MUTATORS))
            base = seeds[0] if rng.random() < 0.8 else rng.choice(seeds)
            mutated = MUTATORS[kind](rng, base, seeds)
            if mutated == base:
                continue
            try:
                m = Manifest.decode(mutated)
            except ManifestError:
                outcomes[kind, "rejected"] += 1
                continue
            except Exception as exc:  # the failure this test exists for
                pytest.fail(f"trial {trial} ({kind}): {type(exc).__name__}: {exc}")
            outcomes[kind, "accepted"] += 1
            assert m.encode() == mutated, f"trial {trial} ({kind}): not canonical"
            again = Manifest(
                m.entries,
                chunk_size=m.chunk_size,
                root_mode=m.root_mode,
                root_mtime_ns=m.root_mtime_ns,
            )
            assert again.encode() == mutated
    # every kind of mutation ran and was refused at least sometimes; some decoded (a flip
    # in a digest, an mtime edit): both paths of the decoder were exercised
    for kind in MUTATORS:
        assert outcomes[kind, "rejected"] > 0, (kind, outcomes)
    assert sum(n for (_, outcome), n in outcomes.items() if outcome == "accepted") > 0
    assert sum(outcomes.values()) > MUTATIONS * 0.9
