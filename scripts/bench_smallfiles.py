"""Many small files (issue 16): the first pack of 200,000 files of ~50 bytes into an empty CAS.

Prints figures and asserts nothing. The tree is ``--packages`` package directories of
``--files`` modules each (default 2,000 x 100 = 200,000 files, ~10 MB), every file a few
lines of Python with its own contents, so every file is its own blob: the per-file cost of a
pack (walk, hash, ask the store, stage, publish) is all there is to measure. Each run packs
into a fresh local CAS directory with a fresh stat cache (``$LAZYCAF_STATE``), CLI start-up
included; the figure is the median of ``--runs`` runs in this one invocation.

``--materialize``: also pack the tree once more, ``cache pin`` it into a host cache on a
Btrfs loop image and time ``lazycaf materialize`` of it (reflinks; a fresh directory per run):
the per-entry cost of materialize at 200,000 (or ``--packages x --files``) entries.

``--repack``: time re-packs in place instead (issue 16's "re-pack after 10 edits"): each
candidate packs the tree once into its own CAS with its own stat cache (not timed), then
each run appends a line to 10 modules spread over the tree and every candidate re-packs it
with a new tag; the edited modules get their first contents back at the end.

``--baseline LAUNCHER``: also time another ``lazycaf`` (e.g. a script running an older
checkout), runs interleaved with this one's, and print both and their ratio.

Usage: python -m scripts.bench_smallfiles [--packages N] [--files N] [--runs N] [--tree DIR]
       [--baseline LAUNCHER] [--repack] [--materialize] [--lazycaf PATH] [--tmpdir DIR]
       [--json PATH]
       (--tree DIR: reuse DIR if it holds the tree, else write it there and keep it)

Writes ``results/bench_smallfiles/results.json`` (``--json PATH``: there instead).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from scripts.harness import (
    BenchError,
    Figure,
    Lazycaf,
    Made,
    Record,
    btrfs_image,
    default_json,
    find_lazycaf,
    fs_of,
    md_row,
    median,
    progress,
    run_in_tempdir,
    temp_env,
)

TITLE: Final = "Many small files: first pack into an empty CAS"
REPACK_TITLE: Final = "Many small files: re-pack in place after 10 edits"
TARGET_S: Final = 20.0  # issue 16: 200,000 small files packed in <= 20 s
REPACK_TARGET_S: Final = 2.0  # issue 16: a re-pack in place after 10 edits, at 300k
EDITS: Final = 10
MARKER: Final = ".bench_smallfiles"  # written last: a tree with it is complete
say = progress("bench_smallfiles")


def file_bytes(package: int, module: int) -> bytes:
    """The contents of module ``module`` of package ``package``: ~50 bytes of Python,
    unique to the file (a deterministic function of the two numbers)."""
    tag = hashlib.blake2b(f"{package}/{module}".encode(), digest_size=8).hexdigest()
    return f"# pkg{package:04d}.mod{module:03d}\nVALUE = 0x{tag}\n".encode()


def write_tree(root: Path, packages: int, files: int) -> tuple[int, int]:
    """Write the tree at ``root`` (replacing an incomplete one); (files, bytes). A tree
    already complete for these counts is kept as it is."""
    marker = root / MARKER
    want = f"{packages} {files}\n"
    if marker.is_file() and marker.read_text() == want:
        return packages * files, sum(
            len(file_bytes(p, m)) for p in range(packages) for m in range(files)
        )
    if root.exists():
        shutil.rmtree(root)
    nbytes = 0
    for p in range(packages):
        pkg = root / f"pkg{p:04d}"
        pkg.mkdir(parents=True)
        for m in range(files):
            data = file_bytes(p, m)
            (pkg / f"mod{m:03d}.py").write_bytes(data)
            nbytes += len(data)
    marker.write_text(want)  # packed too: one more file, 10 bytes
    return packages * files, nbytes


def time_packs(
    tree: Path, tmp: Path, candidates: dict[str, Path], runs: int
) -> dict[str, list[float]]:
    """Seconds per first pack of ``tree`` for each candidate (name -> lazycaf), the runs
    interleaved; each pack into a fresh CAS with a fresh stat cache, both removed after."""
    out: dict[str, list[float]] = {name: [] for name in candidates}
    digests: dict[str, str] = {}
    for i in range(runs):
        for name, exe in candidates.items():
            cas, state = tmp / f"cas-{name}-{i}", tmp / f"state-{name}-{i}"
            with temp_env("LAZYCAF_STATE", str(state)):
                t0 = time.perf_counter()
                digest = Lazycaf(exe, cas, clean_env=False).pack(tree)
                out[name].append(time.perf_counter() - t0)
            say(f"{name} run {i + 1}: {out[name][-1]:.2f} s")
            digests.setdefault(name, digest)
            if digests[name] != digest:
                raise BenchError(f"{name} packed the same tree to two digests")
            shutil.rmtree(cas)
            shutil.rmtree(state, ignore_errors=True)
    if len(set(digests.values())) > 1:
        raise BenchError(f"the candidates disagree on the tree's digest: {digests}")
    return out


def edited(packages: int, files: int) -> list[tuple[int, int]]:
    """The ``EDITS`` modules a re-pack run changes: spread over the tree."""
    count = packages * files
    picks = sorted({k * count // EDITS for k in range(EDITS)})
    return [divmod(k, files) for k in picks]


def time_repacks(
    tree: Path, tmp: Path, candidates: dict[str, Path], runs: int, packages: int, files: int
) -> dict[str, list[float]]:
    """Seconds per re-pack in place after ``EDITS`` edits for each candidate, the runs
    interleaved (the same edits for all in a run); each candidate's CAS and stat cache are
    its own, filled by one untimed pack first."""
    out: dict[str, list[float]] = {name: [] for name in candidates}
    picks = edited(packages, files)

    def pack(name: str, exe: Path, tag: str) -> str:
        with temp_env("LAZYCAF_STATE", str(tmp / f"state-{name}")):
            return Lazycaf(exe, tmp / f"cas-{name}", clean_env=False).pack(tree, tag=tag)

    try:
        for name, exe in candidates.items():
            pack(name, exe, "tree:0")
        for i in range(1, runs + 1):
            for p, m in picks:
                with open(tree / f"pkg{p:04d}" / f"mod{m:03d}.py", "ab") as f:
                    f.write(b"# edit %d\n" % i)
            digests = set()
            for name, exe in candidates.items():
                t0 = time.perf_counter()
                digests.add(pack(name, exe, f"tree:{i}"))
                out[name].append(time.perf_counter() - t0)
                say(f"{name} re-pack {i}: {out[name][-1]:.2f} s")
            if len(digests) > 1:
                raise BenchError(f"the candidates disagree on the edited tree's digest: {digests}")
    finally:
        for p, m in picks:  # the tree as write_tree left it
            (tree / f"pkg{p:04d}" / f"mod{m:03d}.py").write_bytes(file_bytes(p, m))
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m scripts.bench_smallfiles", description=(__doc__ or "").splitlines()[0]
    )
    ap.add_argument("--packages", type=int, default=2000, help="package directories")
    ap.add_argument("--files", type=int, default=100, help="modules per package")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tree", type=Path, help="where the tree is (kept), default: a temp dir")
    ap.add_argument("--tmpdir", type=Path, help="parent of the temp dir (default: system temp)")
    ap.add_argument("--lazycaf", type=Path, default=Path(sys.executable).parent / "lazycaf")
    ap.add_argument("--baseline", type=Path, help="another lazycaf to time beside this one")
    ap.add_argument("--repack", action="store_true", help="time re-packs after 10 edits")
    ap.add_argument("--materialize", action="store_true", help="also time materialize")
    ap.add_argument("--json", type=Path, default=default_json("bench_smallfiles"))
    args = ap.parse_args(argv)
    if args.runs < 1 or args.packages < 1 or args.files < 1:
        ap.error("--runs, --packages and --files must be >= 1")
    return args


def bench(args: argparse.Namespace, record: Record, made: Made, exe: Path) -> None:
    tree = args.tree.resolve() if args.tree is not None else made.tmp / "tree"
    t0 = time.perf_counter()
    files, nbytes = write_tree(tree, args.packages, args.files)
    say(f"tree: {files:,} files, {nbytes / 1e6:.1f} MB ({time.perf_counter() - t0:.1f} s)")
    candidates = {"this": exe}
    if args.baseline is not None:
        candidates["baseline"] = args.baseline.absolute()
    if args.repack:
        secs = time_repacks(tree, made.tmp, candidates, args.runs, args.packages, args.files)
    else:
        secs = time_packs(tree, made.tmp, candidates, args.runs)
    this, base = secs["this"], secs.get("baseline", [])
    ratio = median(this) / median(base) if base else None
    what = f"re-pack in place after {EDITS} edits" if args.repack else "first pack, empty local CAS"
    target = (
        f"<= {REPACK_TARGET_S:.0f} s at 300,000 files"
        if args.repack
        else f"<= {TARGET_S:.0f} s at 200,000 files"
    )
    fig = Figure(
        what,
        "s",
        tuple(this),
        "baseline lazycaf" if base else None,
        tuple(base),
        ratio,
        "this / baseline" if base else "",
    )
    record.figures = [fig]
    record.facts = [
        f"tree: {args.packages:,} packages x {args.files} files = {files:,} files, "
        f"{nbytes / 1e6:.1f} MB, on {fs_of(tree)}; the CAS directories beside it",
        f"{args.runs} runs, medians, runs interleaved; page cache warm; CLI start-up included",
    ]
    if args.repack:
        record.facts.append(
            f"each run: {EDITS} modules edited (a line appended), then a re-pack with a new tag "
            "by each candidate, into its own CAS with its own stat cache (one untimed pack first)"
        )
    if base:
        record.facts.append(f"baseline: {args.baseline}")
    rows = [("this", this)] + ([("baseline", base)] if base else [])
    record.report = [f"- {f}" for f in record.facts] + [
        "",
        f"| lazycaf ({what}) | median | files/s | runs | target (issue 16) |",
        "|---|---:|---:|---|---|",
    ]
    for name, xs in rows:
        med = median(xs)
        record.report.append(
            md_row(
                name,
                f"{med:.2f} s",
                f"{files / med:,.0f}",
                ", ".join(f"{x:.2f}" for x in xs),
                target,
            )
        )
    if ratio is not None:
        record.report += ["", f"- this / baseline: {ratio:.2f}x the time"]
    if args.materialize:
        mat = time_materialize(tree, made, exe, args.runs, files)
        record.figures.append(Figure("materialize, every blob cached (reflinks)", "s", tuple(mat)))
        record.report += [
            "",
            f"- materialize of the tree ({files:,} files, {args.packages:,} directories) from a "
            f"host cache holding every blob, on a Btrfs loop image: median {median(mat):.2f} s "
            f"({', '.join(f'{x:.2f}' for x in mat)}); issue 16's target: <= 15 s at 300k entries",
        ]
    record.finish(args.json)


def time_materialize(tree: Path, made: Made, exe: Path, runs: int, files: int) -> list[float]:
    """Seconds per ``lazycaf materialize`` of ``tree`` (packed once more, pinned in a host
    cache on Btrfs first), each into a fresh directory on the same Btrfs (reflinks)."""
    cas = made.tmp / "cas-materialize"
    lz = Lazycaf(exe, cas, clean_env=False)
    with temp_env("LAZYCAF_STATE", str(made.tmp / "state-materialize")):
        ref = lz.pack(tree)
    btrfs = btrfs_image(made, "8G")
    cache = made.cache(lz, "cache")
    lz.cli("cache", "pin", ref, "--cas", str(cas), cache=cache, what="cache pin", timeout=None)
    out = []
    for i in range(runs):
        dest = btrfs / f"materialized-{i}"
        t0 = time.perf_counter()
        lz.cli("materialize", ref, str(dest), "--cas", str(cas), cache=cache, what="materialize")
        out.append(time.perf_counter() - t0)
        say(f"materialize run {i + 1}: {out[-1]:.2f} s")
        made_files = sum(len(names) for _, _, names in os.walk(dest))
        if made_files != files + 1:  # the marker file is packed too
            raise BenchError(f"materialize made {made_files} files, the tree has {files + 1}")
        shutil.rmtree(dest)
    lz.fetcher_stop(cache)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    exe = find_lazycaf(args.lazycaf)
    if exe is None:
        print("bench_smallfiles: error: lazycaf not found", file=sys.stderr)
        return 2
    if args.baseline is not None and not os.access(args.baseline, os.X_OK):
        print(f"bench_smallfiles: error: {args.baseline} is not executable", file=sys.stderr)
        return 2
    title = REPACK_TITLE if args.repack else TITLE
    record = Record.begin("bench_smallfiles", title, argv, args)

    def body(made: Made, _: Lazycaf | None) -> None:
        bench(args, record, made, exe)

    return run_in_tempdir("bench_smallfiles", args.tmpdir, body)


if __name__ == "__main__":
    sys.exit(main())
