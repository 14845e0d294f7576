"""A deterministic synthetic ML-style executable at seed scale (issue 16), and its next build.

At ``scale=1.0`` the tree holds ~300,000 entries and ~20 GB, shaped like an interpreter prefix
with a large venv and CUDA-sized native libraries:

- package trees under ``lib/python3.11/site-packages``: ``.py`` modules (text from a seeded
  vocabulary of identifiers, so they compress like code) and their ``__pycache__/*.pyc`` (a
  3.11 header with a fixed source mtime, as reproducible builds write it, then real
  ``marshal`` bytes of the module's names and code-like opcode bytes); about a third of the
  ``__init__.py`` files are empty, as in real trees (they deduplicate, as real ones do);
- ~2,000 native libraries from 100 KB to 200 MB (sizes at fixed quantiles of a skewed
  distribution), a few 1-4 GB libraries like CUDA's, and one 500 MB library (the one the next
  build changes): an ELF-like header and symbol strings, then 1 MiB blocks, each a rotation
  of the library's own seeded base block (part random bytes, part a small "instruction"
  alphabet) stamped with 64 bytes unique to the library and the block, so no 1 MiB chunk
  equals another and a chunk compresses like machine code, not like zeros or noise;
- symlinks (``libX.so -> libX.so.N``, ``bin/python3 -> python3.11``) and hard links (some
  libraries vendored twice by hard link).

``scale`` multiplies the counts of modules, libraries, links and the sizes of the CUDA-like
and 500 MB libraries; library sizes keep their distribution. ``version=2`` writes the next
build: the whole tree written afresh (new inodes and mtimes), in which ``CHANGED_PY`` modules,
their ``.pyc`` and the 500 MB library have new contents (``changed_paths``). Every byte is a
function of ``(scale, seed, version)``: two runs write the same tree.

Usage: python -m scripts.seedtree OUT [--scale F] [--seed N] [--version 1|2]
"""

from __future__ import annotations

import argparse
import hashlib
import marshal
import os
import random
import struct
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

__all__ = [
    "CHANGED_PY",
    "Item",
    "Summary",
    "changed_paths",
    "main",
    "plan",
    "write_tree",
]

CHANGED_PY: Final = 10
FULL_MODULES: Final = 140_000  # .py files at scale 1 (as many .pyc)
FULL_LIBS: Final = 2_000
MODULES_PER_DIR: Final = 20
LIB_MIN: Final = 100_000
LIB_MAX: Final = 200_000_000
LIB_SKEW: Final = 5.5  # size = LIB_MIN * (LIB_MAX/LIB_MIN) ** (u ** LIB_SKEW)
CUDA_SIZES: Final = (1_200_000_000, 2_000_000_000, 3_600_000_000)
CHANGED_LIB_SIZE: Final = 500_000_000
BLOCK: Final = 1 << 20
WRITE_BUF: Final = 8 << 20
SITE: Final = "lib/python3.11/site-packages"
PYC_MAGIC: Final = (3495).to_bytes(2, "little") + b"\r\n"  # CPython 3.11
SOURCE_EPOCH: Final = 1_700_000_000
_OPCODES: Final = (
    0,
    1,
    2,
    9,
    23,
    25,
    83,
    90,
    97,
    100,
    101,
    106,
    107,
    108,
    116,
    124,
    125,
    131,
    151,
    160,
    171,
)

PY, PYC, LIB, SYMLINK, HARDLINK, DIR = "py", "pyc", "lib", "symlink", "hardlink", "dir"


@dataclass(frozen=True)
class Item:
    """One entry to write: ``path`` relative to the root; ``size`` for libraries; ``target``
    for links (relative link text for a symlink, the root-relative path for a hard link);
    ``lines`` for modules (0: an empty file)."""

    path: str
    kind: str
    size: int = 0
    lines: int = 0
    target: str = ""


@dataclass
class Summary:
    """What ``write_tree`` wrote."""

    root: Path
    counts: dict[str, int] = field(default_factory=dict)
    nbytes: int = 0
    seconds: float = 0.0

    @property
    def entries(self) -> int:
        return sum(self.counts.values())


def _seed_of(*parts: object) -> int:
    """A stable 64-bit seed (Python's ``hash`` is salted per process)."""
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little")


# -- the plan ------------------------------------------------------------------------------
def _vocabulary(rng: random.Random, n: int) -> list[str]:
    syll = [
        "ar",
        "be",
        "co",
        "de",
        "en",
        "fi",
        "ga",
        "ho",
        "in",
        "ju",
        "ka",
        "lo",
        "ma",
        "ne",
        "or",
        "pa",
        "qu",
        "ri",
        "st",
        "tu",
        "ul",
        "ve",
        "wa",
        "xe",
        "yo",
        "za",
    ]
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(rng.choices(syll, k=rng.randint(2, 4))))
    return sorted(words)


def _lib_sizes(n: int) -> list[int]:
    ratio = LIB_MAX / LIB_MIN
    return [int(LIB_MIN * ratio ** (((i + 0.5) / n) ** LIB_SKEW)) for i in range(n)]


def _module_dirs(rng: random.Random, words: list[str], n_dirs: int) -> list[str]:
    tops = [f"{words[i]}{i}" for i in range(max(1, n_dirs // 12))]
    dirs = list(tops)
    while len(dirs) < n_dirs:
        parent = rng.choice(dirs)
        if parent.count("/") < 3:
            dirs.append(f"{parent}/{rng.choice(words)}_{len(dirs)}")
    return dirs


def _modules(rng: random.Random, words: list[str], dirs: list[str], n: int) -> Iterator[Item]:
    per_dir, extra = divmod(n, len(dirs))
    for d, pkg in enumerate(dirs):
        for m in range(per_dir + (d < extra)):
            name = "__init__" if m == 0 else f"{rng.choice(words)}_{m}"
            empty = m == 0 and rng.random() < 0.35
            lines = 0 if empty else max(3, min(6000, int(rng.lognormvariate(4.2, 1.0))))
            yield Item(f"{SITE}/{pkg}/{name}.py", PY, lines=lines)
            yield Item(f"{SITE}/{pkg}/__pycache__/{name}.cpython-311.pyc", PYC, lines=lines)


def _libraries(rng: random.Random, words: list[str], dirs: list[str], scale: float) -> list[Item]:
    n = max(2, round(FULL_LIBS * scale))
    items: list[Item] = []
    tops = sorted({d.split("/")[0] for d in dirs})
    for i, size in enumerate(_lib_sizes(n)):
        top = tops[i % len(tops)]
        soname = f"lib{rng.choice(words)}{i}.so.{1 + i % 12}"
        path = f"{SITE}/{top}/.libs/{soname}"
        items.append(Item(path, LIB, size=size))
        if i % 3 == 0:  # the unversioned name, as the dynamic linker's symlink
            items.append(Item(path.rsplit(".so.", 1)[0] + ".so", SYMLINK, target=soname))
        if i % 11 == 5:  # vendored again by another package, as a hard link
            other = tops[(i + 1) % len(tops)]
            items.append(Item(f"{SITE}/{other}/.libs/{soname}", HARDLINK, target=path))
    for j, size in enumerate(CUDA_SIZES):
        name = f"lib{words[j]}cu.so.12"
        items.append(Item(f"{SITE}/nvidia/{words[j]}/lib/{name}", LIB, size=_scaled(size, scale)))
    items.append(Item(f"{SITE}/{tops[0]}/lib/libcore_big.so", LIB, size=changed_lib_size(scale)))
    return items


def _scaled(size: float, scale: float) -> int:
    return max(LIB_MIN, int(size * scale))


def changed_lib_size(scale: float) -> int:
    return _scaled(CHANGED_LIB_SIZE, scale)


def plan(scale: float = 1.0, seed: int = 16) -> list[Item]:
    """Every entry of the tree (directories implied by paths), in writing order."""
    rng = random.Random(_seed_of("plan", seed))
    words = _vocabulary(rng, 3000)
    n_mod = max(MODULES_PER_DIR, round(FULL_MODULES * scale))
    dirs = _module_dirs(rng, words, -(-n_mod // MODULES_PER_DIR))
    items = [
        Item("bin/python3.11", LIB, size=_scaled(6_000_000, max(scale, 0.02))),
        Item("bin/python3", SYMLINK, target="python3.11"),
        Item("bin/python", SYMLINK, target="python3"),
    ]
    items += _modules(rng, words, dirs, n_mod)
    items += _libraries(rng, words, dirs, scale)
    return items


def changed_paths(scale: float = 1.0, seed: int = 16) -> list[str]:
    """The paths whose contents version 2 changes: ``CHANGED_PY`` non-empty modules spread
    over the tree, their ``.pyc``, and the 500 MB library (scaled)."""
    items = plan(scale, seed)
    mods = [it for it in items if it.kind == PY and it.lines]
    step = len(mods) / CHANGED_PY
    out: list[str] = []
    for k in range(CHANGED_PY):
        py = mods[int(k * step)].path
        pkg, name = py.rsplit("/", 1)
        out += [py, f"{pkg}/__pycache__/{name[:-3]}.cpython-311.pyc"]
    out.append(next(it.path for it in items if it.path.endswith("/libcore_big.so")))
    return out


# -- contents ------------------------------------------------------------------------------
_TEMPLATES: Final = (
    "def {a}_{b}(self, {c}, {d}=None):",
    "    {a} = self.{b}({c}, {d})",
    "    return {a}.{b}({c})",
    "import {a}",
    "from {a}.{b} import {c}, {d}",
    "    if {a} is not None and {b} > {n}:",
    '    """{A} the {b} of {c} with {d}."""',
    "class {A}{B}({C}):",
    "    # {a} {b} {c}: {d} {e}",
    '        raise {A}Error(f"{b} {{{c}!r}}")',
    "    for {a} in range({n}):",
    "        {a}[{b}] = {c}.{d}({n})",
    "",
)


class Contents:
    """Bytes of modules and libraries, from the tree's seed and each path."""

    def __init__(self, seed: int) -> None:
        rng = random.Random(_seed_of("contents", seed))
        self.seed = seed
        self.words = _vocabulary(rng, 2000)
        self.pool = [self._line(rng) for _ in range(4_000)]

    def _line(self, rng: random.Random) -> str:
        w = rng.choices(self.words, k=5)
        caps = [x.capitalize() for x in w[:3]]
        n = rng.randint(0, 4096)
        fields = dict(zip("abcde", w, strict=True))
        return rng.choice(_TEMPLATES).format(**fields, A=caps[0], B=caps[1], C=caps[2], n=n)

    def py(self, item: Item, version: int) -> bytes:
        if not item.lines:
            return b""
        rng = random.Random(_seed_of("py", self.seed, item.path, version))
        stem = item.path.rsplit("/", 1)[1][:-3]
        out = [f'"""{item.path} (seed tree, build {version})."""', ""]
        for k in range(0, item.lines, 16):  # a definition unique to this module every 16 lines
            out.append(f"def {stem}_{k}({rng.choice(self.words)}, {rng.choice(self.words)}):")
            out += rng.choices(self.pool, k=min(15, item.lines - k))
        return ("\n".join(out) + "\n").encode()

    def pyc(self, item: Item, source: bytes) -> bytes:
        head = PYC_MAGIC + struct.pack("<III", 0, SOURCE_EPOCH, len(source) & 0xFFFFFFFF)
        if not source:
            return head + marshal.dumps(((), (), b"d\x00S\x00"))
        rng = random.Random(_seed_of("pyc", source))
        names = tuple(sorted(set(source.decode().split())))[:400]
        code = bytes(rng.choices(_OPCODES, k=len(source) // 4))
        return head + marshal.dumps((code, names, tuple(source.splitlines()[::4])))

    def lib_chunks(self, path: str, size: int, version: int) -> Iterator[bytes]:
        """The library's bytes, in pieces of up to ``WRITE_BUF``."""
        rng = random.Random(_seed_of("lib", self.seed, path, version))
        syms = "\0".join(f"_ZN{len(w)}{w}{rng.choice(self.words)}Ev" for w in self.pool[:400])
        head = b"\x7fELF\x02\x01\x01\x00" + bytes(8) + struct.pack("<HHI", 3, 62, 1)
        head += b".text\0.data\0.rodata\0.dynsym\0.dynstr\0" + syms.encode()[: size // 8]
        base = self._base(rng, min(BLOCK, size))
        buf, left, i = bytearray(head[:size]), size - min(len(head), size), 0
        while left > 0:
            stamp = hashlib.blake2b(f"{path}:{version}:{i}".encode(), digest_size=64).digest()
            rot = (i * 7919 * 4096) % len(base)
            block = stamp + base[rot:] + base[:rot]
            buf += block[: min(left, BLOCK)]
            left -= min(left, BLOCK)
            i += 1
            if len(buf) >= WRITE_BUF:
                yield bytes(buf)
                buf.clear()
        if buf:
            yield bytes(buf)

    @staticmethod
    def _base(rng: random.Random, n: int) -> bytes:
        """Part random (data, compressed sections), part a small alphabet of 16-byte
        "instructions" (code, tables): compresses like a native library, about 1.5-2x."""
        insns = [rng.randbytes(16) for _ in range(48)]
        parts: list[bytes] = []
        for _ in range(-(-n // 4096)):
            parts.append(
                rng.randbytes(4096) if rng.random() < 0.4 else b"".join(rng.choices(insns, k=256))
            )
        return b"".join(parts)[:n]


# -- writing -------------------------------------------------------------------------------
def write_tree(root: Path, *, scale: float = 1.0, seed: int = 16, version: int = 1) -> Summary:
    """Write the tree (``version`` 1, or 2: the next build) at ``root``, which must not exist
    or be empty. Files are written as a build writes them: fresh, with the current mtime."""
    if version not in (1, 2):
        raise ValueError(f"version must be 1 or 2, not {version}")
    t0 = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    if any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty")
    contents = Contents(seed)
    changed = set(changed_paths(scale, seed)) if version == 2 else set()
    summary = Summary(root)
    made: set[str] = set()
    sources: dict[str, bytes] = {}
    for item in plan(scale, seed):
        parent = item.path.rpartition("/")[0]
        if parent not in made:
            (root / parent).mkdir(parents=True, exist_ok=True)
            made.add(parent)
        v = version if item.path in changed else 1
        summary.nbytes += _write_item(root, item, contents, v, sources)
        summary.counts[item.kind] = summary.counts.get(item.kind, 0) + 1
    summary.counts[DIR] = _count_dirs(made)
    summary.seconds = time.perf_counter() - t0
    return summary


def _count_dirs(made: set[str]) -> int:
    dirs: set[str] = set()
    for d in made:
        parts = d.split("/")
        dirs.update("/".join(parts[: k + 1]) for k in range(len(parts)))
    return len(dirs)


def _write_item(
    root: Path, item: Item, contents: Contents, version: int, sources: dict[str, bytes]
) -> int:
    """Write one entry; the bytes of file contents written (0 for links)."""
    path = root / item.path
    if item.kind == SYMLINK:
        os.symlink(item.target, path)
        return 0
    if item.kind == HARDLINK:
        os.link(root / item.target, path)
        return 0
    if item.kind == PY:
        data = contents.py(item, version)
        sources[item.path.rsplit("/", 1)[1][:-3]] = data  # its .pyc comes next
        path.write_bytes(data)
        return len(data)
    if item.kind == PYC:
        stem = item.path.rsplit("/", 1)[1].removesuffix(".cpython-311.pyc")
        data = contents.pyc(item, sources.pop(stem))
        path.write_bytes(data)
        return len(data)
    with path.open("wb", buffering=0) as f:
        for piece in contents.lib_chunks(item.path, item.size, version):
            f.write(piece)
    return item.size


# -- CLI -----------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m scripts.seedtree", description=(__doc__ or "").splitlines()[0]
    )
    ap.add_argument("out", type=Path, help="where to write the tree (must not exist or be empty)")
    ap.add_argument("--scale", type=float, default=1.0, help="1.0: ~300k entries, ~20 GB")
    ap.add_argument("--seed", type=int, default=16)
    ap.add_argument("--version", type=int, choices=(1, 2), default=1)
    args = ap.parse_args(argv)
    if not 0 < args.scale <= 1.0:
        ap.error("--scale must be in (0, 1]")
    s = write_tree(args.out, scale=args.scale, seed=args.seed, version=args.version)
    kinds = ", ".join(f"{n:,} {k}" for k, n in sorted(s.counts.items()))
    print(
        f"{s.root}: {s.entries:,} entries ({kinds}), {s.nbytes / 1e9:.2f} GB in {s.seconds:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
