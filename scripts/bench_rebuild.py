"""Build non-determinism (issue 18): the sample built twice from the same inputs into fresh
directories, as a build system would, and what LazyCAF makes of the second build.

Prints figures and asserts nothing. Measured:

1. the second build's pack into a CAS holding the first: blobs and bytes uploaded, plain and
   with ``--normalize`` (its target: nothing uploaded, the same manifest digest);
2. what ``lazycaf diff A B --explain --json`` says about the two plain packs: changed entries,
   how many only for causes without meaning, the count of each cause, an example path each;
3. what a normalized ``.pyc`` costs an import: ``python -c "import numpy"`` from mounts of
   the first build packed plain and normalized (warm, and cold from the full host cache after
   ``drop_caches``), and from local copies of it whose ``.pyc`` files are the original
   timestamp-based ones, unchecked hash-based (what ``--normalize`` writes) and checked
   hash-based (what it does not), warm. Runs of the variants are interleaved; medians.

The samples are built by ``scripts/build_sample.py`` (``--sample-a``/``--sample-b``: use two
builds made earlier). Needs root (Btrfs loop image, FUSE, drop_caches). Everything made here
is removed on exit.

Usage: python -m scripts.bench_rebuild [--sample-a DIR --sample-b DIR] [--runs N]
       [--tmpdir DIR] [--json PATH]

Writes ``results/bench_rebuild/results.json`` (``--json PATH``: there instead).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from lazycaf.builds.pyc import hash_based, source_path
from scripts.harness import (
    Figure,
    Lazycaf,
    Made,
    Record,
    btrfs_image,
    build_sample,
    default_json,
    drop_caches,
    find_lazycaf,
    md_row,
    median,
    progress,
    run_in_tempdir,
    time_python,
)

TITLE: Final = "Build non-determinism: the sample built twice from the same inputs"
MB: Final = 1e6
say = progress("bench_rebuild")


def pack(lz: Lazycaf, tree: Path, cas: Path, *extra: str) -> dict[str, Any]:
    out = lz.cli("pack", str(tree), "--cas", str(cas), "--json", "--rehash", *extra, what="pack")
    return dict(json.loads(out.strip().splitlines()[-1]))


def explain(lz: Lazycaf, a: str, b: str, cas: Path) -> dict[str, Any]:
    out = lz.cli("diff", a, b, "--cas", str(cas), "--explain", "--json", what="diff --explain")
    return dict(json.loads(out))


def rewrite_pycs(tree: Path, *, checked: bool) -> int:
    """Rewrite each timestamp-based ``.pyc`` of ``tree`` valid for its source as hash-based
    (``lazycaf.builds.pyc.hash_based``), in place; how many."""
    done = 0
    for pyc in tree.rglob("__pycache__/*.pyc"):
        src_rel = source_path(str(pyc.relative_to(tree)))
        src = tree / src_rel if src_rel else None
        if src is None or not src.is_file():
            continue
        new = hash_based(
            pyc.read_bytes(), src.read_bytes(), src.stat().st_mtime_ns, checked=checked
        )
        if new is not None:
            pyc.write_bytes(new)
            done += 1
    return done


def interleaved(
    runs: int, variants: dict[str, Path], *, cold: bool = False
) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(runs):
        for name, tree in variants.items():
            if cold:
                drop_caches()
            out[name].append(time_python(tree))
    return out


def body(args: argparse.Namespace, record: Record, made: Made, lz: Lazycaf) -> None:
    if args.sample_a is not None:
        a, b = args.sample_a.resolve(), args.sample_b.resolve()
    else:
        a, b = made.tmp / "build-1", made.tmp / "build-2"
        for out in (a, b):
            say(f"building {out} ...")
            build_sample(out)
    facts = [f"builds: {a} and {b} (scripts/build_sample.py, the same inputs)"]

    say("packing plain and --normalize ...")
    plain_cas, norm_cas = made.tmp / "cas-plain", made.tmp / "cas-norm"
    pa, pb = pack(lz, a, plain_cas), pack(lz, b, plain_cas)
    na, nb = pack(lz, a, norm_cas, "--normalize"), pack(lz, b, norm_cas, "--normalize")
    doc = explain(lz, pa["digest"], pb["digest"], plain_cas)
    summary = doc["summary"]["explained"]
    examples: dict[str, str] = {}
    for c in doc["changed"]:
        for cause in c.get("causes", []):
            examples.setdefault(cause["kind"], f"`{c['path']}`: {cause['text']}")

    say("import numpy: mounts of the first build, plain and normalized ...")
    btrfs_image(made, "4G")
    cache = made.cache(lz, "cache")
    mount_cas = norm_cas  # holds the normalized packs; the plain one of build 1 added
    pack(lz, a, mount_cas)
    mounts = {
        "original .pyc": made.mountpoint("mnt-plain"),
        "unchecked hash": made.mountpoint("mnt-norm"),  # what --normalize writes
    }
    for mnt, digest in zip(mounts.values(), (pa["digest"], na["digest"]), strict=True):
        lz.mount(digest, mnt, cache, "--cas", str(mount_cas), "--no-record")
        time_python(mnt)  # fetch every blob it reads into the host cache
    warm_mount = interleaved(args.runs, mounts)
    cold_mount = interleaved(max(3, args.runs // 3), mounts, cold=True)
    for mnt in mounts.values():
        lz.umount(mnt)

    say("import numpy: local copies with timestamp, unchecked and checked .pyc ...")
    local = {"original .pyc": made.tmp / "local-ts"}
    for name in ("unchecked hash", "checked hash"):
        local[name] = made.tmp / f"local-{name.split()[0]}"
    for tree in local.values():
        shutil.copytree(a, tree, symlinks=True)
    rewritten = rewrite_pycs(local["unchecked hash"], checked=False)
    rewrite_pycs(local["checked hash"], checked=True)
    warm_local = interleaved(args.runs, local)

    same = "equal" if na["digest"] == nb["digest"] else "differ"
    record.facts = [
        *facts,
        f"second build, plain: {pb['blobs_uploaded']} blobs ({pb['bytes_uploaded'] / MB:.1f} MB)"
        f" uploaded of {pb['blobs']}; --normalize: {nb['blobs_uploaded']} blobs "
        f"({nb['bytes_uploaded'] / MB:.2f} MB), digests {same}",
        f"--normalize rewrote {na['pyc_rewritten']} .pyc, left {na['pyc_kept']}; "
        f"the local copies rewrote {rewritten}",
    ]
    lines = [
        "",
        md_row("second build's pack", "blobs uploaded", "MB uploaded", "same digest as the first"),
        md_row("---", "---:", "---:", "---"),
        md_row(
            "plain",
            str(pb["blobs_uploaded"]),
            f"{pb['bytes_uploaded'] / MB:.1f}",
            "no" if pa["digest"] != pb["digest"] else "yes",
        ),
        md_row(
            "--normalize",
            str(nb["blobs_uploaded"]),
            f"{nb['bytes_uploaded'] / MB:.2f}",
            "yes" if na["digest"] == nb["digest"] else "no",
        ),
        "",
        f"`diff --explain` of the plain packs: {summary['changed']} changed entries "
        f"({summary['content_changed']} in content), {summary['meaningless']} only for causes "
        "that carry no meaning.",
        "",
        md_row("cause", "entries", "example"),
        md_row("---", "---:", "---"),
    ]
    for kind, n in sorted(summary["by_cause"].items(), key=lambda kv: -kv[1]):
        lines.append(
            md_row(kind, str(n), examples.get(kind, "(entries whose only change is their mtime)"))
        )
    lines += [
        "",
        md_row("`import numpy`", *local),
        md_row("---", *["---:"] * len(local)),
        md_row("warm, local disk", *(f"{median(v):.3f} s" for v in warm_local.values())),
        md_row(
            "warm, mount",
            *(f"{median(warm_mount[k]):.3f} s" if k in warm_mount else "-" for k in local),
        ),
        md_row(
            "cold from the host cache",
            *(f"{median(cold_mount[k]):.3f} s" if k in cold_mount else "-" for k in local),
        ),
        "",
        f"Medians of {args.runs} warm runs and {max(3, args.runs // 3)} cold runs, variants "
        "interleaved.",
    ]
    record.report = lines
    record.figures = [
        Figure("second build plain: blobs uploaded", "blobs", (float(pb["blobs_uploaded"]),)),
        Figure("second build --normalize: blobs uploaded", "blobs", (float(nb["blobs_uploaded"]),)),
        *(Figure(f"import numpy warm, local, {k}", "s", tuple(v)) for k, v in warm_local.items()),
        *(Figure(f"import numpy warm, mount, {k}", "s", tuple(v)) for k, v in warm_mount.items()),
        *(
            Figure(f"import numpy cold from cache, {k}", "s", tuple(v))
            for k, v in cold_mount.items()
        ),
    ]
    record.data = {"plain": [pa, pb], "normalize": [na, nb], "explained": summary}
    record.finish(args.json)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m scripts.bench_rebuild", description=TITLE)
    ap.add_argument("--sample-a", type=Path, help="a first build (with --sample-b)")
    ap.add_argument("--sample-b", type=Path, help="a second build of the same inputs")
    ap.add_argument("--runs", type=int, default=9, help="warm runs per variant (default 9)")
    ap.add_argument("--tmpdir", type=Path)
    ap.add_argument("--lazycaf", type=Path, default=Path(sys.executable).parent / "lazycaf")
    ap.add_argument("--json", type=Path, default=default_json("bench_rebuild"))
    args = ap.parse_args(argv)
    if (args.sample_a is None) != (args.sample_b is None):
        ap.error("--sample-a and --sample-b go together")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench_rebuild: error: needs root (Btrfs loop image, FUSE)", file=sys.stderr)
        return 2
    exe = find_lazycaf(args.lazycaf)
    if exe is None:
        print(f"bench_rebuild: error: lazycaf not found at {args.lazycaf}", file=sys.stderr)
        return 2
    record = Record.begin("bench_rebuild", TITLE, argv, args)

    def run(made: Made, lz: Lazycaf | None) -> None:
        assert lz is not None
        body(args, record, made, lz)

    return run_in_tempdir("bench_rebuild", args.tmpdir, run, lazycaf=exe)


if __name__ == "__main__":
    sys.exit(main())
