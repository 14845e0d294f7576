"""Benchmark ``lazycaf mount`` against the same tree on local disk, side by side.

Prints figures and asserts nothing: speed targets are read off the printed table, never checked
by timed test assertions. Every figure is a median over ``--runs`` runs taken in this one
invocation on this one machine; mount and local runs are interleaved so drift hits both.

Needs root (drop_caches, a Btrfs loop image, FUSE ``allow_other``). Measured:

1. mount-ready: wall time of ``lazycaf mount REF MNT`` (the command returns once the tree is
   visible) with the manifest already in the host cache and the fetcher daemon running,
   for the sample and for a synthetic tree of 100k small files (1000 dirs x 100 files);
2. ``python -c "import numpy"`` run from the mount: cold (a fresh, empty host cache per run,
   the previous daemon stopped, the mount made ready first, then ``sync`` + ``drop_caches``;
   only the python run is timed) and warm (later runs in the same mount); the same tree on
   local disk, cold (after ``drop_caches``) and warm. Cold runs record the daemon's fetch
   statistics (``lazycaf stats --json``, before and after the run);
3. sequential read of a 1 GiB file of random bytes with 1 MiB ``readinto`` calls: through
   the mount once its blobs are cached (read once fully to fetch them), after
   ``drop_caches`` ("first read") and again ("warm re-read"); local disk cold and warm.

The host caches live on a fresh Btrfs loop image (``mount -o loop,compress=zstd``), prepared
with ``lazycaf cache init``; the CAS is a local directory. Everything made here -- mounts,
daemons, the loop image, temp dirs -- is removed in a ``finally`` (also on Ctrl-C and
SIGTERM), and the script warns about any FUSE mount, loop device or process of its own that
is left.

Usage: python -m scripts.bench_mount [--sample DIR] [--runs N] [--tmpdir DIR] [--json PATH]

Writes ``results/bench_mount/results.json`` (``--json PATH``: there instead).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from scripts.harness import (
    BenchError,
    Figure,
    Lazycaf,
    Made,
    Record,
    btrfs_image,
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
    sample_tree,
    time_python,
    timed,
)

MIB: Final = 1 << 20
BIG_FILE_MIB: Final = 1024
SMALL_DIRS: Final = 1000
SMALL_FILES_PER_DIR: Final = 100
IMAGE_SIZE: Final = "4G"
MOUNT_READY_TARGET_S: Final = 0.5
IMPORT_WARM_TARGET: Final = 1.2
IMPORT_COLD_TARGET: Final = 1.4
READ_TARGET_GBPS: Final = 2.0
CMD_TIMEOUT_S: Final = 600.0
STAT_KEYS: Final = ("fetches", "bytes_fetched", "misses", "hits", "wait_seconds")
TITLE: Final = "lazycaf mount vs local disk"


say = progress("bench_mount")


# -- trees ---------------------------------------------------------------------------------
def make_small_tree(root: Path) -> None:
    """1000 dirs x 100 files of a few bytes; 100 distinct contents keep the pack quick."""
    for d in range(SMALL_DIRS):
        sub = root / f"pkg{d:04d}"
        sub.mkdir(parents=True)
        for f in range(SMALL_FILES_PER_DIR):
            (sub / f"mod{f:03d}.py").write_bytes(f"x = {f}\n".encode())


def make_big_file(path: Path) -> None:
    """1 GiB of random bytes: every MiB (chunk) distinct, incompressible."""
    path.parent.mkdir(parents=True)
    with path.open("wb") as f:
        for _ in range(BIG_FILE_MIB):
            f.write(os.urandom(MIB))


def read_file(path: Path) -> float:
    """Sequential read of the whole file with 1 MiB reads; returns seconds."""
    buf = bytearray(MIB)
    view = memoryview(buf)
    expected = path.stat().st_size
    total = 0
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(view):
            total += n
    secs = time.perf_counter() - t0
    if total != expected:
        raise BenchError(f"read {total} bytes of {path}, expected {expected}")
    return secs


def read_files(paths: Sequence[Path]) -> float:
    """Read each file whole, in order, with 1 MiB reads; total seconds."""
    return sum(read_file(p) for p in paths)


def cached_chunks(big: Path, cache: Path) -> list[Path]:
    """The host cache's blob files of ``big``'s 1 MiB chunks, in order; [] if any is absent."""
    from lazycaf.core.digest import Digest

    paths = []
    with big.open("rb") as f:
        while data := f.read(MIB):
            h = Digest.of(data).hex
            p = cache / "blobs" / h[:2] / h
            if not p.is_file():
                return []
            paths.append(p)
    return paths


# -- results -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    """One table row: lazycaf and local samples (seconds, or GB/s when ``rate``)."""

    metric: str
    ours: tuple[float, ...]
    local: tuple[float, ...] = ()
    target: str = "-"
    rate: bool = False
    verdict: str = ""

    def cells(self) -> list[str]:
        ours = median(self.ours)
        local = median(self.local) if self.local else None
        ratio = "-" if local is None or local == 0 else f"{ours / local:.2f}x"
        target = f"{self.target} ({self.verdict})" if self.verdict else self.target
        return [self.metric, _fmt(ours, self.rate), _fmt(local, self.rate), ratio, target]

    def spread(self) -> str:
        def one(xs: tuple[float, ...]) -> str:
            return ", ".join(_fmt(x, self.rate) for x in xs)

        text = f"{self.metric}: lazycaf [{one(self.ours)}]"
        return text + (f"; local [{one(self.local)}]" if self.local else "")

    def figure(self) -> Figure:
        unit = "GB/s" if self.rate else "s"
        if not self.local:
            return Figure(self.metric, unit, self.ours)
        ratio = median(self.ours) / median(self.local)
        return Figure(self.metric, unit, self.ours, "local disk", self.local, ratio, "this / local")


def _fmt(x: float | None, rate: bool) -> str:
    if x is None:
        return "-"
    if rate:
        return f"{x:.2f} GB/s"
    return f"{x:.3f} s" if x >= 0.1 else f"{x * 1000:.1f} ms"


def _gbps(secs: Sequence[float]) -> tuple[float, ...]:
    return tuple(BIG_FILE_MIB * MIB / 1e9 / s for s in secs)


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, row: Row) -> None:
        self.rows.append(row)
        say(" | ".join(row.cells()))


def _verdict(ok: bool) -> str:
    return "meets" if ok else "MISSES"


# -- phases --------------------------------------------------------------------------------
@dataclass
class Bench:
    lz: Lazycaf
    made: Made
    runs: int
    report: Report

    def startup_floor(self) -> None:
        cmd = [str(self.lz.exe), "--version"]
        samples = tuple(timed(cmd, what="lazycaf --version") for _ in range(self.runs))
        self.report.add(Row("`lazycaf --version` (interpreter start-up floor)", samples))

    def mount_ready(self, name: str, ref: str, cache: Path, entries: int) -> None:
        """Untimed first mount (daemon up, manifest fetched), then ``runs`` timed mounts."""
        mnt = self.made.mountpoint("mnt-" + re.sub(r"\W+", "-", name))
        self.lz.mount(ref, mnt, cache)
        self.lz.umount(mnt)
        samples = []
        for _ in range(self.runs):
            samples.append(self.lz.mount(ref, mnt, cache))
            if not os.listdir(mnt):
                raise BenchError(f"{mnt} is mounted but empty")
            self.lz.umount(mnt)
        med = median(samples)
        self.report.add(
            Row(
                f"mount ready, {name} ({entries:,} entries, manifest cached)",
                tuple(samples),
                target=f"< {MOUNT_READY_TARGET_S} s",
                verdict=_verdict(med < MOUNT_READY_TARGET_S),
            )
        )

    def imports(self, ref: str, sample: Path) -> None:
        """``import numpy``: cold with an empty cache (on-demand fetches only: no profile
        prefetch), cold from the host cache (blobs cached, page cache dropped), warm, and warm
        with open/opendir round trips (stock pyfuse3 behaviour); mount and local interleaved."""
        mnt = self.made.mountpoint("mnt-import")
        cold: list[float] = []
        cached_cold: list[float] = []
        warm: list[float] = []
        warm_rt: list[float] = []
        local_cold: list[float] = []
        local_warm: list[float] = []
        for i in range(self.runs):
            cache = self.made.cache(self.lz, f"cache-cold-{i}")
            self.lz.mount(ref, mnt, cache, "--no-prefetch")  # starts a daemon on the empty cache
            before = self.lz.stats(cache)
            drop_caches()
            cold.append(time_python(mnt))
            after = self.lz.stats(cache)
            warm += [time_python(mnt) for _ in range(self.runs)]
            after_warm = self.lz.stats(cache)
            self._note_cold(i, cold[-1], before, after, after_warm)
            self.lz.umount(mnt)
            self.lz.mount(ref, mnt, cache, "--no-prefetch")
            drop_caches()
            cached_cold.append(time_python(mnt))
            self.lz.umount(mnt)
            self.lz.mount(ref, mnt, cache, "--no-prefetch", "--open-roundtrips")
            time_python(mnt)
            warm_rt += [time_python(mnt) for _ in range(self.runs)]
            self.lz.umount(mnt)
            self.lz.fetcher_stop(cache)
            shutil.rmtree(cache)
            drop_caches()
            local_cold.append(time_python(sample))
            local_warm += [time_python(sample) for _ in range(self.runs)]
            say(f"import run {i}: cold {cold[-1]:.3f} s (local {local_cold[-1]:.3f} s)")
        cached_ratio = median(cached_cold) / median(local_cold)
        warm_ratio = median(warm) / median(local_warm)
        self.report.add(
            Row(
                "`import numpy`, cold, empty cache (on-demand fetches from the local CAS)",
                tuple(cold),
                tuple(local_cold),
                "-",
                verdict="",
            )
        )
        self.report.add(
            Row(
                "`import numpy`, cold from the host cache (page cache dropped)",
                tuple(cached_cold),
                tuple(local_cold),
                f"<= {IMPORT_COLD_TARGET}x local",
                verdict=_verdict(cached_ratio <= IMPORT_COLD_TARGET),
            )
        )
        self.report.add(
            Row(
                "`import numpy`, warm (kernel skips open/opendir: patched pyfuse3)",
                tuple(warm),
                tuple(local_warm),
                f"<= {IMPORT_WARM_TARGET}x local",
                verdict=_verdict(warm_ratio <= IMPORT_WARM_TARGET),
            )
        )
        self.report.add(
            Row(
                "`import numpy`, warm, `--open-roundtrips` (stock pyfuse3 behaviour)",
                tuple(warm_rt),
                tuple(local_warm),
                "-",
                verdict="",
            )
        )

    def _note_cold(
        self,
        i: int,
        secs: float,
        before: dict[str, float],
        after: dict[str, float],
        after_warm: dict[str, float],
    ) -> None:
        d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in STAT_KEYS}
        warm_fetches = after_warm.get("fetches", 0.0) - after.get("fetches", 0.0)
        misses = d["misses"] or d["fetches"]
        per = d["wait_seconds"] / misses * 1000 if misses else 0.0
        self.report.notes.append(
            f"cold import run {i}: {secs:.3f} s; daemon: {d['fetches']:.0f} fetches, "
            f"{d['bytes_fetched'] / 1e6:.1f} MB fetched, {d['misses']:.0f} misses, "
            f"{d['hits']:.0f} hits, wait {d['wait_seconds']:.3f} s summed over requests "
            f"({per:.2f} ms per miss); fetches during the {self.runs} warm runs after it: "
            f"{warm_fetches:.0f}"
        )

    def big_read(self, ref: str, local_file: Path, cache: Path) -> None:
        """1 GiB sequential reads: mount (blobs cached) and local, cold and warm, interleaved."""
        mnt = self.made.mountpoint("mnt-big")
        self.lz.mount(ref, mnt, cache)
        path = mnt / local_file.name
        before = self.lz.stats(cache)
        fetch = read_file(path)  # fetches every chunk into the host cache
        after = self.lz.stats(cache)
        fetches = after.get("fetches", 0) - before.get("fetches", 0)
        fetched = after.get("bytes_fetched", 0) - before.get("bytes_fetched", 0)
        self.report.notes.append(
            f"1 GiB read that fetched it (local-dir CAS, page cache warm): {fetch:.2f} s = "
            f"{_gbps([fetch])[0]:.2f} GB/s, {fetches:.0f} fetches, {fetched / 1e9:.2f} GB fetched"
        )
        blobs = cached_chunks(local_file, cache)
        first: list[float] = []
        again: list[float] = []
        direct: list[float] = []
        local_cold: list[float] = []
        local_warm: list[float] = []
        for i in range(self.runs):
            if blobs:
                drop_caches()
                direct.append(read_files(blobs))
            drop_caches()
            first.append(read_file(path))
            again.append(read_file(path))
            drop_caches()
            local_cold.append(read_file(local_file))
            local_warm.append(read_file(local_file))
            say(f"read run {i}: mount first {first[-1]:.3f} s, local cold {local_cold[-1]:.3f} s")
        self.lz.umount(mnt)
        gb_first = _gbps(first)
        self.report.add(
            Row(
                "1 GiB read, first read (blobs cached, caches dropped) vs local cold",
                gb_first,
                _gbps(local_cold),
                f">= {READ_TARGET_GBPS} GB/s",
                rate=True,
                verdict=_verdict(median(gb_first) >= READ_TARGET_GBPS),
            )
        )
        self.report.add(Row("1 GiB read, warm re-read", _gbps(again), _gbps(local_warm), rate=True))
        if direct:
            name = "(diagnostic) 1 GiB of the host cache's blob files read directly, cold"
            self.report.add(Row(name, _gbps(direct), _gbps(local_cold), rate=True))
        else:
            self.report.notes.append(
                "the 1 GiB file's chunks were not found as 1 MiB blobs in the host cache: "
                "the direct cache-read diagnostic was skipped"
            )


# -- report --------------------------------------------------------------------------------
def report_lines(facts: list[str], runs: int, report: Report) -> list[str]:
    out = [f"- {fact}" for fact in facts]
    out.append(
        f"- {runs} runs per measurement (warm import: {runs} per cold mount); medians; "
        "ratio = lazycaf / local (times for import, GB/s for reads)"
    )
    out += ["", "| metric | lazycaf (median) | local (median) | ratio | target |"]
    out.append("|---|---:|---:|---:|---|")
    out += [md_row(*row.cells()) for row in report.rows]
    out += ["", *(f"- {note}" for note in report.notes), "", "All samples:", ""]
    out += [f"- {row.spread()}" for row in report.rows]
    return out


# -- main ----------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m scripts.bench_mount", description=(__doc__ or "").splitlines()[0]
    )
    ap.add_argument("--sample", type=Path, help="use this tree instead of building one")
    ap.add_argument("--runs", type=int, default=5, help="runs per measurement (default 5)")
    ap.add_argument("--tmpdir", type=Path, help="parent of the temp dir (default: system temp)")
    ap.add_argument("--lazycaf", type=Path, default=Path(sys.executable).parent / "lazycaf")
    ap.add_argument(
        "--json",
        type=Path,
        default=default_json("bench_mount"),
        help="where to write the results (default results/bench_mount/results.json)",
    )
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    if args.sample is not None and not (args.sample / "bin" / "python3").exists():
        ap.error(f"--sample {args.sample} has no bin/python3")
    return args


def bench(args: argparse.Namespace, record: Record, made: Made, lz: Lazycaf) -> None:
    report = Report()
    tmp = made.tmp
    sample = sample_tree(args.sample, tmp)
    origin = "given with --sample" if args.sample is not None else "built by build_sample.py"
    entries, nbytes = count_entries(sample)
    sample_desc = f"{sample} ({origin}): {entries:,} entries, {nbytes / 1e6:.1f} MB"
    say(f"sample: {sample_desc}")
    say("making the 100k-file tree and the 1 GiB file ...")
    small = tmp / "small"
    t0 = time.perf_counter()
    make_small_tree(small)
    say(f"100k files made in {time.perf_counter() - t0:.1f} s")
    big_file = tmp / "big" / "random-1GiB.bin"
    make_big_file(big_file)
    say("packing ...")
    t0 = time.perf_counter()
    refs = {name: lz.pack(tree) for name, tree in (("sample", sample), ("small", small))}
    refs["big"] = lz.pack(big_file.parent)
    say(f"packed 3 trees in {time.perf_counter() - t0:.1f} s")
    small_entries = SMALL_DIRS * (SMALL_FILES_PER_DIR + 1)
    btrfs_image(made, IMAGE_SIZE)
    host = made.cache(lz, "cache-host")
    b = Bench(lz, made, args.runs, report)
    b.startup_floor()
    b.mount_ready("sample", refs["sample"], host, entries)
    b.mount_ready("100k files", refs["small"], host, small_entries)
    b.imports(refs["sample"], sample)
    b.big_read(refs["big"], big_file, host)
    lz.fetcher_stop(host)
    record.facts = [
        f"local disk (sample, CAS dir, 1 GiB file): {fs_of(tmp)}",
        f"host caches: Btrfs loop image ({IMAGE_SIZE}, compress=zstd) on that disk",
        f"sample: {sample_desc}",
    ]
    record.report = report_lines(record.facts, args.runs, report)
    record.figures = [row.figure() for row in report.rows]
    record.finish(args.json)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench_mount: error: needs root (drop_caches, loop mounts)", file=sys.stderr)
        return 2
    exe = find_lazycaf(args.lazycaf)
    if exe is None:
        print(f"bench_mount: error: lazycaf not found at {args.lazycaf}", file=sys.stderr)
        return 2
    record = Record.begin("bench_mount", TITLE, argv, args)
    made = Made(Path(tempfile.mkdtemp(prefix="bench_mount-", dir=args.tmpdir)))
    cas = made.tmp / "cas"
    lz = Lazycaf(exe, cas, clean_env=False, mount_args=("--cas", str(cas)), wait_after_umount=True)

    def clean() -> list[str]:
        say(f"cleaning up {made.tmp} ...")
        return cleanup(made, lz)

    def body() -> None:
        bench(args, record, made, lz)

    return guarded_run("bench_mount", body, clean)


if __name__ == "__main__":
    sys.exit(main())
