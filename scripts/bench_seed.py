"""Seed scale (issue 16): a synthetic ML-style executable packed, published, mounted and listed.

Prints figures and asserts nothing: each figure is printed beside the issue's target (and its
baseline where the issue names one), medians of ``--runs`` runs in this one invocation.

The trees are ``scripts/seedtree.py``'s: v1, and v2 written afresh (new inodes and mtimes) with
10 modules, their ``.pyc`` and the 500 MB library (scaled) changed. Measured:

1. first pack of v1 into an empty local CAS (a fresh CAS and stat cache per run), MB/s and
   files/s, vs ``mksquashfs v1 -comp zstd``;
2. publish v2 into the store holding v1 (the CAS of run 1's pack; v2 is a fresh tree, so the
   stat cache has nothing for it): seconds, MB/s of tree, blobs and bytes stored;
3. re-pack v2 in place after 10 ``.py`` edits (the stat cache of step 2 is warm);
4. ``lazycaf mount`` ready with the manifest cached and the daemon running; the mount
   process's RSS;
5. ``find MNT -printf '%s %T@'`` (stats every entry), warm, vs the same on v1 on local disk;
6. ``lazycaf ls -R v1`` and ``lazycaf diff v1 v2``; ``lazycaf cache status``;
7. ``lazycaf materialize v1`` (reflinks) from a cache holding every blob (``cache pin``);
8. GC to a budget of a quarter of the tree: the cache holding all of v1 after the pin is
   lifted, the daemon's budget set to ``--gc-budget`` (default: a quarter of the tree's
   bytes, 5 GB at full scale), ``lazycaf cache gc`` timed, the usage after it; then a fresh
   cache with that budget filled by reading every file of v1 through a mount, its usage
   sampled every 0.2 s: the peak must stay under the budget.

Needs root (a Btrfs loop image for the host cache, FUSE). Everything made here is removed on
exit, also on errors, Ctrl-C and SIGTERM.

Usage: python -m scripts.bench_seed [--scale F] [--runs N] [--tree DIR] [--tmpdir DIR]
       [--json PATH]   (--tree DIR: reuse DIR/v1 and DIR/v2 written by scripts.seedtree)

Writes ``results/bench_seed/results.json`` (``--json PATH``: there instead).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Final

from scripts import seedtree
from scripts.harness import (
    BenchError,
    Figure,
    Lazycaf,
    Made,
    Record,
    btrfs_image,
    count_entries,
    default_json,
    find_lazycaf,
    fs_of,
    md_row,
    median,
    pids_mentioning,
    progress,
    run,
    run_in_tempdir,
    temp_env,
)

TITLE: Final = "Seed scale: pack, publish, mount, list"
IMAGE_SIZE: Final = "8G"  # at least; the image is a sparse file of 1.5x the tree when bigger
say = progress("bench_seed")


@dataclass(frozen=True)
class Row:
    """One figure: samples in ``unit``; ``rate`` turns the median into the throughput cell;
    ``baseline`` samples (same unit) where the issue names a baseline."""

    name: str
    unit: str
    samples: tuple[float, ...]
    target: str
    rate: str = "-"
    baseline: str | None = None
    baseline_samples: tuple[float, ...] = ()

    def figure(self) -> Figure:
        base = median(self.baseline_samples)
        ratio = median(self.samples) / base if self.baseline and base > 0 else None
        return Figure(
            self.name,
            self.unit,
            self.samples,
            self.baseline,
            self.baseline_samples,
            ratio,
            "this / baseline",
        )

    def cells(self) -> list[str]:
        med = median(self.samples)
        base = "-"
        if self.baseline is not None:
            bmed = median(self.baseline_samples)
            base = f"{self.baseline}: {bmed:.3f} {self.unit} ({med / bmed:.2f}x)"
        return [self.name, f"{med:.3f} {self.unit}", self.rate, base, self.target]


@dataclass
class Bench:
    lz: Lazycaf
    made: Made
    runs: int
    v1: Path
    v2: Path
    files: int
    nbytes: int
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    scale: float = 1.0
    entries: int = 0
    gc_budget: int = 0

    def add(self, row: Row) -> None:
        self.rows.append(row)
        say(f"{row.name}: median {median(row.samples):.3f} {row.unit}")

    def lz_in(self, cas: Path) -> Lazycaf:
        return Lazycaf(
            self.lz.exe,
            cas,
            clean_env=False,
            mount_args=("--cas", str(cas)),
            wait_after_umount=True,
        )

    def rates(self, secs: float, nbytes: int | None = None, files: int | None = None) -> str:
        b, f = self.nbytes if nbytes is None else nbytes, self.files if files is None else files
        return f"{b / 1e6 / secs:,.1f} MB/s, {f / secs:,.0f} files/s" if secs > 0 else "-"

    def first_packs(self) -> tuple[Path, str, str]:
        """Cold packs of v1 then a publish of v2 into each; the last CAS and the two refs."""
        tmp = self.made.tmp
        packs: list[float] = []
        squash: list[float] = []
        publish: list[float] = []
        stored: list[tuple[int, int]] = []
        refs = ("", "")
        for i in range(self.runs):
            cas = tmp / f"cas-{i}"
            with temp_env("LAZYCAF_STATE", str(tmp / f"state-{i}")):
                lz = self.lz_in(cas)
                packs.append(_timed(partial(lz.pack, self.v1)))
                before = _blobs(cas)
                t0 = time.perf_counter()
                ref2 = lz.pack(self.v2)
                publish.append(time.perf_counter() - t0)
                refs = (lz.pack(self.v1), ref2)  # the stat cache makes this a no-op pack
            stored.append(_stored_since(cas, before))
            squash.append(self.squash(tmp / "v1.sqsh"))
            if i + 1 < self.runs:
                shutil.rmtree(cas)
        med = median(packs)
        self.add(
            Row(
                "first pack of v1, empty local CAS",
                "s",
                tuple(packs),
                ">= 200 MB/s",
                self.rates(med),
                "mksquashfs -comp zstd",
                tuple(squash),
            )
        )
        self.add(
            Row(
                "publish v2 (fresh tree) into a store holding v1",
                "s",
                tuple(publish),
                ">= 1 GB/s of tree (20 GB in <= 20 s)",
                self.rates(median(publish)),
            )
        )
        self.notes.append(
            "blobs, bytes stored by each publish of v2 (manifest included): "
            + ", ".join(f"{n} blobs, {b / 1e6:.1f} MB" for n, b in stored)
            + f"; v2 changed {len(seedtree.changed_paths(self.scale))} files"
        )
        return tmp / f"cas-{self.runs - 1}", refs[0], refs[1]

    def squash(self, image: Path) -> float:
        cmd = ["mksquashfs", str(self.v1), str(image), "-comp", "zstd", "-noappend", "-quiet"]
        secs = _timed(lambda: run(cmd, what="mksquashfs", timeout=None))
        image.unlink()
        return secs

    def repack(self, cas: Path) -> None:
        """10 ``.py`` files of v2 get a line appended, then v2 is packed in place."""
        edited = [self.v2 / p for p in seedtree.changed_paths(self.scale) if p.endswith(".py")]
        lz = self.lz_in(cas)
        samples: list[float] = []
        with temp_env("LAZYCAF_STATE", str(self.made.tmp / f"state-{self.runs - 1}")):
            for i in range(self.runs):
                for p in edited:
                    with p.open("a") as f:
                        f.write(f"# bench_seed edit {i}\n")
                samples.append(_timed(lambda: lz.pack(self.v2)))
        self.add(
            Row(
                f"re-pack in place after {len(edited)} edits",
                "s",
                tuple(samples),
                "<= 2 s at 300k entries",
            )
        )

    def mounted(self, cas: Path, ref1: str, ref2: str) -> None:
        btrfs_image(self.made, f"{max(8 << 30, int(self.nbytes * 1.5)) >> 20}M")
        lz = self.lz_in(cas)
        cache = self.made.cache(lz, "cache")
        mnt = self.made.mountpoint("mnt")
        lz.mount(ref1, mnt, cache)  # the manifest into the cache, the daemon up
        lz.umount(mnt)
        ready: list[float] = []
        rss: list[float] = []
        walk: list[float] = []
        local: list[float] = []
        for _ in range(self.runs):
            ready.append(lz.mount(ref1, mnt, cache))
            rss.append(_rss_mb(str(mnt)))
            _find(mnt)  # warm
            walk.append(_timed(lambda: _find(mnt)))
            _find(self.v1)
            local.append(_timed(lambda: _find(self.v1)))
            lz.umount(mnt)
        self.add(Row("mount ready, manifest cached", "s", tuple(ready), "<= 0.5 s at 300k"))
        self.add(Row("mount process RSS", "MB", tuple(rss), "<= 150 MB at 300k"))
        self.add(
            Row(
                "find MNT + stat of every entry, warm",
                "s",
                tuple(walk),
                "<= 2x local disk",
                "-",
                "same on local disk",
                tuple(local),
            )
        )
        cli: Callable[..., str] = lz.cli
        cas_args = ("--cas", str(cas))
        for name, args, target in (
            ("lazycaf ls -R v1", ("ls", "-R", ref1, *cas_args), "<= 1 s at 300k"),
            ("lazycaf diff v1 v2", ("diff", ref1, ref2, *cas_args), "<= 1 s at 300k"),
            ("lazycaf cache status", ("cache", "status"), "<= 1 s"),
        ):
            run_it = partial(cli, *args, cache=cache, what=name)
            samples = [_timed(run_it) for _ in range(self.runs)]
            self.add(Row(name, "s", tuple(samples), target))
        self.materialize(lz, cache, ref1)
        lz.fetcher_stop(cache)
        self.gc_to_budget(lz, cache, ref1)

    def materialize(self, lz: Lazycaf, cache: Path, ref: str) -> None:
        """``materialize`` of v1 from a cache holding all of it: reflinks on the Btrfs image."""
        lz.cli(
            "cache", "pin", ref, "--cas", str(lz.cas), cache=cache, what="cache pin", timeout=None
        )
        assert self.made.btrfs_mnt is not None
        samples = []
        for i in range(self.runs):
            dest = self.made.btrfs_mnt / f"materialized-{i}"
            args = ("materialize", ref, str(dest), "--cas", str(lz.cas))
            samples.append(_timed(partial(lz.cli, *args, cache=cache, what="materialize")))
            entries, _ = count_entries(dest)
            if entries + 1 < self.entries:
                raise BenchError(f"materialize made {entries} entries of {self.entries}")
            shutil.rmtree(dest)
        self.add(
            Row(
                "materialize v1 (reflinks, every blob cached)",
                "s",
                tuple(samples),
                "<= 15 s at 300k",
                self.rates(median(samples)),
            )
        )
        lz.cli("cache", "pin", "--unpin", ref, "--cas", str(lz.cas), cache=cache, what="unpin")

    def gc_to_budget(self, lz: Lazycaf, cache: Path, ref: str) -> None:
        """The cache of all of v1 collected to the budget; then a fill under that budget."""
        budget = self.gc_budget
        mnt = self.made.mountpoint("mnt-gc")
        size = ("--cache-size", str(budget))
        lz.mount(ref, mnt, cache, *size)  # a daemon with the budget; it is kept in the cache
        lz.umount(mnt)
        lz.fetcher_stop(cache)
        before = _cache_usage(lz, cache)
        secs = _timed(partial(lz.cli, "cache", "gc", cache=cache, what="cache gc", timeout=None))
        after = _cache_usage(lz, cache)
        self.add(
            Row("cache gc: all of v1 to the budget", "s", (secs,), "usage stays under the budget")
        )
        self.notes.append(
            f"cache gc: {before / 1e9:.3f} GB to {after / 1e9:.3f} GB in {secs:.1f} s, budget "
            f"{budget / 1e9:.2f} GB (evicts to the low watermark, 80%)"
        )
        fresh = self.made.cache(lz, "cache-fill")
        lz.mount(ref, mnt, fresh, *size)
        peak, stop = [0], threading.Event()

        def sample() -> None:
            while not stop.wait(0.2):
                with contextlib.suppress(BenchError):
                    peak[0] = max(peak[0], _cache_usage(lz, fresh))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            t0 = time.perf_counter()
            _read_all(mnt)
            fill = time.perf_counter() - t0
        finally:
            stop.set()
            sampler.join()
        peak[0] = max(peak[0], _cache_usage(lz, fresh))
        lz.umount(mnt)
        lz.fetcher_stop(fresh)
        self.add(
            Row(
                "read all of v1 through a mount, cache budget a quarter of it",
                "s",
                (fill,),
                "usage never over the budget",
                self.rates(fill),
            )
        )
        verdict = "under" if peak[0] <= budget else "OVER"
        self.notes.append(
            f"fill under a budget: peak usage {peak[0] / 1e9:.3f} GB, {verdict} the budget of "
            f"{budget / 1e9:.2f} GB, while {self.nbytes / 1e9:.2f} GB were read through the mount"
        )


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _cache_usage(lz: Lazycaf, cache: Path) -> int:
    out = lz.cli("cache", "status", "--json", cache=cache, what="cache status --json")
    return int(json.loads(out)["usage"])


def _read_all(root: Path) -> None:
    """Read every regular file under ``root`` (``cat``, four at a time)."""
    script = f"find {shlex.quote(str(root))} -type f -print0 | xargs -0 -P4 -n256 cat >/dev/null"
    run(["sh", "-c", script], what="read every file", timeout=None)


def _find(root: Path) -> None:
    run(["find", str(root), "-printf", "%s %T@\n"], what=f"find {root}", timeout=None)


def _blobs(cas: Path) -> set[Path]:
    return {Path(d, n) for d, _, names in os.walk(cas / "blobs") for n in names}


def _stored_since(cas: Path, before: set[Path]) -> tuple[int, int]:
    new = _blobs(cas) - before
    return len(new), sum(p.stat().st_size for p in new)


def _rss_mb(marker: str) -> float:
    """The largest VmRSS among processes whose command line names ``marker`` (the mount)."""
    best = 0
    for pid in pids_mentioning(marker):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                best = max(best, int(line.split()[1]))
    if not best:
        raise BenchError(f"no process found for the mount at {marker}")
    return best / 1024


# -- main ----------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m scripts.bench_seed", description=(__doc__ or "").splitlines()[0]
    )
    ap.add_argument("--scale", type=float, default=0.005, help="1.0: ~300k entries, ~20 GB")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tree", type=Path, help="DIR holding v1/ and v2/ (scripts.seedtree)")
    ap.add_argument("--tmpdir", type=Path, help="parent of the temp dir (default: system temp)")
    ap.add_argument("--lazycaf", type=Path, default=Path(sys.executable).parent / "lazycaf")
    ap.add_argument("--json", type=Path, default=default_json("bench_seed"))
    ap.add_argument("--gc-budget", type=int, help="bytes (default: a quarter of the tree)")
    args = ap.parse_args(argv)
    if args.runs < 1 or not 0 < args.scale <= 1.0:
        ap.error("--runs must be >= 1 and --scale in (0, 1]")
    return args


def bench(args: argparse.Namespace, record: Record, made: Made, lz: Lazycaf) -> None:
    base = args.tree.resolve() if args.tree is not None else made.tmp / "trees"
    if args.tree is None:
        for version in (1, 2):
            s = seedtree.write_tree(base / f"v{version}", scale=args.scale, version=version)
            say(f"v{version}: {s.entries:,} entries, {s.nbytes / 1e9:.2f} GB in {s.seconds:.1f} s")
    entries, nbytes = count_entries(base / "v1")
    files = sum(1 for it in seedtree.plan(args.scale) if it.kind not in ("symlink",))
    b = Bench(lz, made, args.runs, base / "v1", base / "v2", files, nbytes, scale=args.scale)
    b.entries = entries
    b.gc_budget = args.gc_budget or nbytes // 4
    cas, ref1, ref2 = b.first_packs()
    b.repack(cas)
    b.mounted(cas, ref1, ref2)
    squash_version = run(["mksquashfs", "-version"], what="mksquashfs -version").splitlines()[0]
    record.facts = [
        f"scale {args.scale}: v1 has {entries:,} entries, {files:,} files (hard links counted "
        f"once per path), {nbytes / 1e9:.2f} GB; full scale is ~300,000 entries, ~20 GB",
        f"trees, CAS dirs: {base} on {fs_of(base)}; host cache on a Btrfs loop image "
        f"({IMAGE_SIZE}, compress=zstd); {squash_version}",
        f"{args.runs} runs per figure, medians; page cache warm; CLI start-up included",
    ]
    head = [
        "| figure | median | throughput | baseline (this / baseline) | target (issue 16) |",
        "|---|---:|---:|---|---|",
    ]
    record.report = [f"- {f}" for f in record.facts] + ["", *head]
    record.report += [md_row(*row.cells()) for row in b.rows] + [""]
    record.report += [f"- {n}" for n in b.notes]
    record.report += ["- targets are for full scale; at this scale they are read per entry"]
    record.figures = [row.figure() for row in b.rows]
    record.finish(args.json)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    exe = find_lazycaf(args.lazycaf)
    if os.geteuid() != 0 or exe is None or shutil.which("mksquashfs") is None:
        print("bench_seed: error: needs root, lazycaf and mksquashfs", file=sys.stderr)
        return 2
    record = Record.begin("bench_seed", TITLE, argv, args)

    def body(made: Made, lz: Lazycaf | None) -> None:
        assert lz is not None
        bench(args, record, made, lz)

    return run_in_tempdir("bench_seed", args.tmpdir, body, lazycaf=exe)


if __name__ == "__main__":
    sys.exit(main())
