"""Benchmark the host cache on Btrfs: reflink materialize, disk use, encoded writes.

Prints figures and asserts nothing. Every timing is a median over ``--runs`` runs taken in this
one invocation; the two sides of each comparison are interleaved (their order alternating
run by run) so drift hits both. Needs root (a Btrfs loop image, drop_caches, encoded writes).

1. (a) ``lazycaf materialize`` of the sample from a warm cache (every blob cached, daemon
   running): reflinks (the default) against copies (``--copy``), into
   the cache's Btrfs. Timed: the command (a Python start included), the command plus a
   ``syncfs`` (copies are compressed and written at writeback), and ``write_tree`` alone in
   this process. Disk: the change of ``btrfs filesystem df`` data and metadata used, and
   ``btrfs filesystem du`` exclusive bytes of the tree.
2. (b) Disk used by two versions of the sample cached side by side (``lazycaf cache pin`` of
   each into a fresh cache: Btrfs data and metadata used, and the blobs' compressed extents)
   against their two ``mksquashfs -comp zstd`` images. Version 2 is a copy with 10 ``.py``
   files edited and the largest ``.so`` changed in every 1 MiB chunk (a rebuild moves code
   throughout). Deterministic: measured once.
3. (c) Storing the sample's blobs (read from the CAS as stored: zstd frames) into a fresh
   cache, in this process, with ``BlobCache`` encoded writes against plain writes: decode,
   verify, write, publish, and one ``syncfs``. CPU is this process's (user + sys) and the
   whole machine's busy time (``/proc/stat``: it includes the kernel threads that compress
   plain writes, and anything else running). Then every blob read once as the store left
   the page cache ("read after store", what a mount does right after a fetch) and once cold.

The Btrfs loop image (``mount -o loop,compress=zstd``), its loop device, every daemon and the
temp dir are removed in a ``finally`` (also on Ctrl-C and SIGTERM); leftovers are reported.

Usage: python -m scripts.bench_cache [--sample DIR] [--runs N] [--parts abc] [--json PATH]

Writes ``results/bench_cache/results.json`` (``--json PATH``: there instead).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from scripts.harness import (
    BenchError,
    Figure,
    Lazycaf,
    Made,
    Record,
    btrfs_image,
    busy_seconds,
    cleanup,
    count_entries,
    default_json,
    drop_caches,
    find_lazycaf,
    fs_of,
    guarded_run,
    md_row,
    median,
    progress,
    run,
    sample_tree,
    temp_env,
    time_python,
)

if TYPE_CHECKING:
    from lazycaf.core.digest import Digest
from lazycaf.core.verified import verify_blob

MIB: Final = 1 << 20
PY_EDITS: Final = 10
REFLINK_TARGET: Final = 10.0


say = progress("bench_cache")


# -- measuring -----------------------------------------------------------------------------
def own_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def syncfs_path(path: Path) -> None:
    from lazycaf.disk.syncfs import syncfs

    syncfs(path)


def fs_used(mnt: Path) -> tuple[int, int]:
    """(data, metadata) bytes used on the Btrfs at ``mnt``, after a sync."""
    syncfs_path(mnt)
    out = run(["btrfs", "filesystem", "df", "-b", str(mnt)], what="btrfs filesystem df")
    used = {"Data": 0, "Metadata": 0}
    for line in out.splitlines():
        kind = line.split(",", 1)[0]
        if kind in used:
            used[kind] += int(line.rpartition("used=")[2])
    return used["Data"], used["Metadata"]


def exclusive_bytes(path: Path) -> int:
    out = run(["btrfs", "filesystem", "du", "-s", "--raw", str(path)], what="btrfs fi du")
    return int(out.splitlines()[-1].split()[1])  # Total, Exclusive, Set shared, Filename


def ensure_all_seconds(cache: Path, digests: list[Digest]) -> float:
    """How long the running daemon takes to confirm that every blob is cached (the check
    ``lazycaf materialize`` makes before it writes the tree)."""
    import trio

    from lazycaf.host.client import FetcherClient

    async def go() -> float:
        client = FetcherClient(cache / "fetcher.sock")
        try:
            t0 = time.perf_counter()
            await client.ensure_all(digests)
            return time.perf_counter() - t0
        finally:
            await client.aclose()

    return trio.run(go)


@dataclass
class Row:
    """One measurement on two sides (``a`` against ``b``); ``unit`` is s, MB or x."""

    part: str
    metric: str
    a: list[float]
    b: list[float] = field(default_factory=list)
    unit: str = "s"
    note: str = ""

    def med(self, xs: list[float]) -> float | None:
        return median(xs) if xs else None

    def figure(self) -> Figure:
        name = f"{self.part}: {self.metric}"
        unit = "bytes" if self.unit == "MB" else self.unit
        if not self.b:
            return Figure(name, unit, tuple(self.a))
        a, b = median(self.a), median(self.b)
        ratio = b / a if a > 0 else None
        return Figure(name, unit, tuple(self.a), "B", tuple(self.b), ratio, "B / A")

    def cells(self) -> list[str]:
        a, b = self.med(self.a), self.med(self.b)
        # no ratio against (about) nothing: reflinks add no data
        ratio = f"{b / a:.1f}x" if a and a > 0 and b is not None and b / a < 1000 else "-"
        return [self.part, self.metric, _fmt(a, self.unit), _fmt(b, self.unit), ratio, self.note]

    def to_json(self) -> dict[str, Any]:
        return {
            "part": self.part,
            "metric": self.metric,
            "unit": self.unit,
            "a": self.a,
            "b": self.b,
            "median_a": self.med(self.a),
            "median_b": self.med(self.b),
            "note": self.note,
        }


def _fmt(x: float | None, unit: str) -> str:
    if x is None:
        return "-"
    if unit == "s":
        return f"{x:.3f} s" if x >= 0.1 else f"{x * 1000:.1f} ms"
    if unit == "MB":
        return f"{x / 1e6:.1f} MB".replace("-0.0", "0.0")
    return f"{x:g}"


@dataclass
class Bench:
    lz: Lazycaf
    made: Made
    runs: int
    sample: Path
    ref: str
    mounts: bool
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def btrfs(self) -> Path:
        assert self.made.btrfs_mnt is not None
        return self.made.btrfs_mnt

    def add(self, row: Row) -> None:
        self.rows.append(row)
        say(" | ".join(row.cells()))

    def interleaved(self, sides: tuple[str, str], one: Callable[[str, int], None]) -> None:
        for i in range(self.runs):
            for side in sides if i % 2 == 0 else sides[::-1]:
                one(side, i)

    # -- (a) materialize -------------------------------------------------------------------
    def materialize(self) -> None:
        from lazycaf.core.manifest import Manifest
        from lazycaf.trees.materialize import write_tree

        cache = self.made.cache(self.lz, "cache-a")
        env = self.lz.env(cache)
        warm = self.btrfs / "warm"
        say("(a) warming the cache (materialize once, untimed) ...")
        run(
            [str(self.lz.exe), "materialize", self.ref, str(warm), "--cas", str(self.lz.cas)],
            what="warm-up materialize",
            env=env,
        )
        shutil.rmtree(warm)
        blob = cache / "blobs" / self.ref[:2] / self.ref
        manifest = Manifest.decode(blob.read_bytes())
        digests = list(manifest.blobs())
        got: dict[str, dict[str, list[float]]] = {"reflink": {}, "copy": {}}

        def one(side: str, i: int) -> None:
            rec = got[side]
            target = self.btrfs / f"mat-{side}-{i}"
            cmd = [
                str(self.lz.exe),
                "materialize",
                self.ref,
                str(target),
                "--cas",
                str(self.lz.cas),
                *(["--copy"] if side == "copy" else []),
            ]
            data0, meta0 = fs_used(self.btrfs)
            t0 = time.perf_counter()
            out = run(cmd, what=f"materialize ({side})", env=env)
            t1 = time.perf_counter()
            syncfs_path(self.btrfs)
            t2 = time.perf_counter()
            data1, meta1 = fs_used(self.btrfs)
            want = " 0 copied" if side == "reflink" else " 0 reflinked"
            if want not in out:
                raise BenchError(f"materialize ({side}) did not do what was asked: {out.strip()}")
            for key, value in (
                ("cli", t1 - t0),
                ("cli+sync", t2 - t0),
                ("data", data1 - data0),
                ("meta", meta1 - meta0),
                ("excl", exclusive_bytes(target)),
            ):
                rec.setdefault(key, []).append(float(value))
            shutil.rmtree(target)
            t0 = time.perf_counter()
            write_tree(cache, manifest, target, copy=side == "copy")
            syncfs_path(self.btrfs)
            rec.setdefault("write_tree", []).append(time.perf_counter() - t0)
            shutil.rmtree(target)
            syncfs_path(self.btrfs)
            if side == "reflink":  # what the command spends asking the daemon, this run
                rec.setdefault("ensure", []).append(ensure_all_seconds(cache, digests))

        self.interleaved(("reflink", "copy"), one)
        r, c = got["reflink"], got["copy"]
        part = "a: materialize"
        self.add(
            Row(
                part,
                "`lazycaf materialize`, warm cache",
                r["cli"],
                c["cli"],
                note=f"target >= {REFLINK_TARGET:g}x",
            )
        )
        self.add(
            Row(
                part,
                "... plus syncfs (copies are written at writeback)",
                r["cli+sync"],
                c["cli+sync"],
            )
        )
        self.add(
            Row(
                part,
                "`write_tree` alone (in-process) plus syncfs",
                r["write_tree"],
                c["write_tree"],
            )
        )
        self.add(Row(part, "Btrfs data used, added", r["data"], c["data"], unit="MB"))
        self.add(Row(part, "Btrfs metadata used, added", r["meta"], c["meta"], unit="MB"))
        self.add(
            Row(part, "`btrfs fi du` exclusive bytes of the tree", r["excl"], c["excl"], unit="MB")
        )
        self.add(
            Row(part, "(diagnostic) in the command: `ensure_all`, every blob cached", r["ensure"])
        )
        self.lz.fetcher_stop(cache)

    # -- (b) two versions ------------------------------------------------------------------
    def two_versions(self) -> None:
        from fetcher.cache.diskusage import compression

        v2 = self.made.tmp / "sample-v2"
        edits = make_version_two(self.sample, v2)
        self.notes.append(f"(b) version 2: {edits}")
        ref2 = self.lz.pack(v2)
        cache = self.made.cache(self.lz, "cache-b")
        env = self.lz.env(cache)
        data0, meta0 = fs_used(self.btrfs)
        steps: list[tuple[int, int, int]] = []
        for ref in (self.ref, ref2):
            run(
                [str(self.lz.exe), "cache", "pin", ref, "--cas", str(self.lz.cas)],
                what="cache pin",
                env=env,
            )
            data, meta = fs_used(self.btrfs)
            steps.append((data - data0, meta - meta0, compression(cache / "blobs").disk_bytes))
        self.lz.fetcher_stop(cache)
        images = []
        for tree in (self.sample, v2):
            image = self.made.tmp / f"{tree.name}.sqsh"
            say(f"(b) mksquashfs {tree.name} ...")
            run(
                [
                    "mksquashfs",
                    str(tree),
                    str(image),
                    "-comp",
                    "zstd",
                    "-noappend",
                    "-quiet",
                    "-no-progress",
                ],
                what="mksquashfs",
            )
            images.append(float(image.stat().st_size))
        part = "b: two versions"
        (d1, m1, x1), (d2, m2, x2) = steps
        self.add(
            Row(
                part,
                "v1: cache data+metadata vs squashfs image",
                [float(d1 + m1)],
                [images[0]],
                unit="MB",
            )
        )
        self.add(
            Row(
                part,
                "v1 + v2: cache data+metadata vs two squashfs images",
                [float(d2 + m2)],
                [images[0] + images[1]],
                unit="MB",
            )
        )
        self.add(
            Row(
                part,
                "v1 + v2: cache blobs' compressed extents only",
                [float(x2)],
                [images[0] + images[1]],
                unit="MB",
            )
        )
        self.add(
            Row(
                part,
                "v2 added to the cache vs its squashfs image",
                [float(d2 + m2 - d1 - m1)],
                [images[1]],
                unit="MB",
            )
        )
        self.notes.append(
            f"(b) cache after v1: data {d1 / 1e6:.1f} MB, metadata {m1 / 1e6:.1f} MB, "
            f"blob extents {x1 / 1e6:.1f} MB; after v2: data {d2 / 1e6:.1f} MB, "
            f"metadata {m2 / 1e6:.1f} MB, blob extents {x2 / 1e6:.1f} MB"
        )

    # -- (c) encoded writes ----------------------------------------------------------------
    def encoded_writes(self) -> None:
        from fetcher.cache.blobcache import BlobCache, init_cache_dir
        from fetcher.cache.diskusage import compression
        from lazycaf.cas.casdir import CasDir
        from lazycaf.core.digest import Digest
        from lazycaf.core.manifest import Manifest

        cas = CasDir(self.lz.cas, create=False)
        ref = Digest.parse(self.ref)
        digests = [ref, *Manifest.decode(cas.read(ref)).blobs()]
        blobs = [(d, *cas.read_encoded(d)) for d in digests]
        framed = sum(1 for _, enc, _ in blobs if enc == "zstd")
        self.notes.append(
            f"(c) {len(blobs)} blobs ({framed} stored as zstd frames), "
            f"{sum(len(p) for *_, p in blobs) / 1e6:.1f} MB as stored in the CAS"
        )
        got: dict[str, dict[str, list[float]]] = {"encoded": {}, "plain": {}}

        def one(side: str, i: int) -> None:
            rec = got[side]
            root = self.btrfs / f"cache-c-{side}-{i}"
            init_cache_dir(root)
            syncfs_path(self.btrfs)
            cache = BlobCache(root, encoded_writes=side == "encoded")
            try:
                busy0, cpu0, t0 = busy_seconds(), own_cpu(), time.perf_counter()
                for d, enc, payload in blobs:
                    cache.publish(cache.stage(verify_blob(d, enc, payload)), limit=None)
                cache.flush()
                t1 = time.perf_counter()
                busy1, cpu1 = busy_seconds(), own_cpu()
                t2 = time.perf_counter()
                for d, _, _ in blobs:
                    cache.path(d).read_bytes()
                t3 = time.perf_counter()
                drop_caches()
                t4 = time.perf_counter()
                for d, _, _ in blobs:
                    cache.path(d).read_bytes()
                t5 = time.perf_counter()
                stats = cache.write_statistics()
            finally:
                cache.close()
            disk = compression(root / "blobs")
            for key, value in (
                ("store", t1 - t0),
                ("cpu", cpu1 - cpu0),
                ("busy", busy1 - busy0),
                ("disk", disk.disk_bytes),
                ("read", t3 - t2),
                ("cold", t5 - t4),
            ):
                rec.setdefault(key, []).append(float(value))
            if side == "encoded" and i == 0:
                self.notes.append(
                    f"(c) encoded run: {stats.encoded_extents} extents written encoded "
                    f"({stats.encoded_bytes / 1e6:.1f} MB of data), {stats.plain_bytes / 1e6:.2f} "
                    f"MB plain; filesystem took encoded writes: {stats.encoded_supported}"
                )
            shutil.rmtree(root)
            syncfs_path(self.btrfs)

        self.interleaved(("encoded", "plain"), one)
        e, p = got["encoded"], got["plain"]
        part = "c: encoded writes"
        self.add(
            Row(
                part,
                "store all blobs (decode, verify, write, publish, syncfs)",
                e["store"],
                p["store"],
            )
        )
        self.add(Row(part, "CPU of this process", e["cpu"], p["cpu"]))
        self.add(
            Row(
                part,
                "CPU of the whole machine (incl. kernel compression)",
                e["busy"],
                p["busy"],
                note="noisy: shared machine",
            )
        )
        self.add(
            Row(part, "disk: compressed extents of the blobs", e["disk"], p["disk"], unit="MB")
        )
        self.add(
            Row(
                part,
                "read every blob right after storing",
                e["read"],
                p["read"],
                note="encoded writes bypass the page cache",
            )
        )
        self.add(Row(part, "read every blob cold (caches dropped)", e["cold"], p["cold"]))
        if self.mounts:
            self.cold_import()

    def cold_import(self) -> None:
        """The on-demand path end to end: a mount on an empty cache whose daemon writes
        encoded or plain, page cache dropped, ``import numpy`` (fetch, store, then read)."""
        from fetcher.cache.blobcache import ENCODED_WRITES_ENV
        from fetcher.cache.diskusage import compression

        mnt = self.made.mountpoint("mnt-c")
        got: dict[str, dict[str, list[float]]] = {"encoded": {}, "plain": {}}

        def one(side: str, i: int) -> None:
            cache = self.made.cache(self.lz, f"cache-c-mount-{side}-{i}")
            # the daemon the mount starts inherits the variable
            with temp_env(ENCODED_WRITES_ENV, "1" if side == "encoded" else "0"):
                self.lz.mount(self.ref, mnt, cache, "--no-prefetch")
            drop_caches()
            secs = time_python(mnt)
            self.lz.umount(mnt)
            self.lz.fetcher_stop(cache)
            got[side].setdefault("import", []).append(secs)
            got[side].setdefault("disk", []).append(compression(cache / "blobs").disk_bytes)
            shutil.rmtree(cache)
            syncfs_path(self.btrfs)

        self.interleaved(("encoded", "plain"), one)
        e, p = got["encoded"], got["plain"]
        self.add(
            Row(
                "c: encoded writes",
                "cold `import numpy` through a mount, empty cache (`--no-prefetch`)",
                e["import"],
                p["import"],
                note="on-demand: fetch, store, read",
            )
        )
        self.notes.append(
            f"(c) cold import: blobs fetched, compressed on disk: encoded "
            f"{median(e['disk']) / 1e6:.1f} MB, plain "
            f"{median(p['disk']) / 1e6:.1f} MB (tells the daemon wrote them as asked)"
        )


# -- version 2 of the sample -----------------------------------------------------------------
def make_version_two(sample: Path, out: Path) -> str:
    """A copy of ``sample`` (mtimes kept) with ``PY_EDITS`` ``.py`` files edited and the
    largest ``.so`` changed in every MiB; returns what was changed."""
    run(["cp", "-a", str(sample), str(out)], what="cp -a sample")
    pys = sorted(p for p in out.rglob("*.py") if p.is_file() and not p.is_symlink())
    step = max(1, len(pys) // PY_EDITS)
    for p in pys[::step][:PY_EDITS]:
        with p.open("a") as f:
            f.write("\n# edited for version 2 of the benchmark sample\n")
    sos = [p for p in out.rglob("*.so*") if p.is_file() and not p.is_symlink()]
    so = max(sos, key=lambda p: p.stat().st_size)
    size = so.stat().st_size
    with so.open("r+b") as f:
        for off in range(512, size, MIB):
            f.seek(off)
            byte = f.read(1)
            f.seek(off)
            f.write(bytes([byte[0] ^ 0xFF]))
    return (
        f"{PY_EDITS} .py files edited (a line appended), {so.relative_to(out)} "
        f"({size / 1e6:.1f} MB) changed in each of its {-(-size // MIB)} MiB chunks"
    )


# -- report --------------------------------------------------------------------------------
def report_lines(facts: list[str], b: Bench) -> list[str]:
    out = [f"- {fact}" for fact in facts]
    out.append(f"- timings: medians of {b.runs} runs, sides interleaved; ratio = B / A")
    out += [
        "",
        "| part | metric | A: reflink / lazycaf cache / encoded | B: copy / squashfs / plain "
        "| B / A | note |",
        "|---|---|---:|---:|---:|---|",
    ]
    out += [md_row(*row.cells()) for row in b.rows]
    out += ["", *(f"- {note}" for note in b.notes), "", "All samples:", ""]
    out += [f"- {row.part}, {row.metric}: A {row.a}; B {row.b}" for row in b.rows]
    return out


TITLE: Final = "Host cache on Btrfs"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m scripts.bench_cache", description=(__doc__ or "").splitlines()[0]
    )
    ap.add_argument("--sample", type=Path, help="use this tree instead of building one")
    ap.add_argument("--runs", type=int, default=3, help="runs per timing (default 3)")
    ap.add_argument("--parts", default="abc", help="which parts to run (default abc)")
    ap.add_argument(
        "--no-mount", action="store_true", help="(c) without the cold import through a mount"
    )
    ap.add_argument(
        "--json",
        type=Path,
        default=default_json("bench_cache"),
        help="where to write the results (default results/bench_cache/results.json)",
    )
    ap.add_argument("--tmpdir", type=Path, help="parent of the temp dir (default: system temp)")
    ap.add_argument("--lazycaf", type=Path, default=Path(sys.executable).parent / "lazycaf")
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    if not set(args.parts) <= set("abc") or not args.parts:
        ap.error("--parts takes letters of abc")
    if args.sample is not None and not (args.sample / "bin" / "python3").exists():
        ap.error(f"--sample {args.sample} has no bin/python3")
    return args


def bench(args: argparse.Namespace, record: Record, made: Made, lz: Lazycaf) -> None:
    sample = sample_tree(args.sample, made.tmp)
    entries, nbytes = count_entries(sample)
    sample_desc = f"{sample.name}: {entries:,} entries, {nbytes / 1e6:.1f} MB"
    say(f"sample: {sample_desc}; packing ...")
    ref = lz.pack(sample)
    btrfs_image(made)
    b = Bench(lz, made, args.runs, sample, ref, mounts=not args.no_mount)
    if "a" in args.parts:
        b.materialize()
    if "b" in args.parts:
        b.two_versions()
    if "c" in args.parts:
        b.encoded_writes()
    record.facts = [
        f"local disk (sample, CAS dir, squashfs images): {fs_of(made.tmp)}",
        "caches and materialized trees: a Btrfs loop image (4G, compress=zstd) on that disk",
        f"sample: {sample_desc}",
    ]
    record.report = report_lines(record.facts, b)
    record.figures = [row.figure() for row in b.rows]
    record.data = {"rows": [r.to_json() for r in b.rows], "notes": b.notes}
    record.finish(args.json)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench_cache: error: needs root (loop mounts, drop_caches)", file=sys.stderr)
        return 2
    exe = find_lazycaf(args.lazycaf)
    if exe is None:
        print(f"bench_cache: error: lazycaf not found at {args.lazycaf}", file=sys.stderr)
        return 2
    for tool in ("mkfs.btrfs", "btrfs", "mksquashfs", "losetup"):
        if shutil.which(tool) is None:
            print(f"bench_cache: error: {tool} is not installed", file=sys.stderr)
            return 2
    record = Record.begin("bench_cache", TITLE, argv, args)
    made = Made(Path(tempfile.mkdtemp(prefix="bench_cache-", dir=args.tmpdir)))
    cas = made.tmp / "cas"
    lz = Lazycaf(exe, cas, clean_env=False, mount_args=("--cas", str(cas)), wait_after_umount=True)

    def clean() -> list[str]:
        say(f"cleaning up {made.tmp} ...")
        return cleanup(made, lz)

    def body() -> None:
        bench(args, record, made, lz)

    errors = (BenchError, subprocess.CalledProcessError, OSError)
    return guarded_run("bench_cache", body, clean, errors=errors)


if __name__ == "__main__":
    sys.exit(main())
