"""Manifest scale (issue 16, the manifest-size half): decode, mount, list and diff a manifest
of N entries.

Prints figures and asserts nothing: each figure is printed beside the issue's target, medians
of ``--runs`` runs in this one invocation.

The manifest is synthetic and shaped like a venv: ``lib/python3.11/site-packages/pkgNNNNN``
packages of 4 subdirectories holding 20-100 files each, tiny contents that share 9 blobs (so
the CAS stays small: only the manifest is large). B is A with 20 files changed (new content,
new mtime). Measured, per size (``--entries``, default 300k and 10^6):

1. decoding the canonical bytes (``Manifest.decode``) and opening the mount's manifest index
   (``ManifestIndex``: built once per digest, then opened): seconds and the peak RSS a fresh
   interpreter grows by, in a subprocess each;
2. ``lazycaf mount`` ready with the manifest (and its index, once built) cached and the
   daemon running; the mount process's RSS right after, and after a full walk;
3. ``find MNT -printf '%s %T@'`` (stats every entry), warm; the same tree is not written to
   local disk (10^6 empty files would take minutes), so there is no baseline;
4. ``lazycaf ls -R A`` and ``lazycaf diff A B`` (CLI start-up included) and their peak RSS.

Needs root (a Btrfs loop image for the host cache, FUSE). The host cache and mounts are set
up as ``scripts/bench_seed.py`` does, with its helpers. Everything made here is removed on
exit, also on errors, Ctrl-C and SIGTERM.

Usage: python -m scripts.bench_manifest [--entries N ...] [--runs N] [--tmpdir DIR]
       [--json PATH]

Writes ``results/bench_manifest/results.json`` (``--json PATH``: there instead).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from lazycaf.cas.casdir import CasDir
from lazycaf.core.digest import Digest
from lazycaf.core.manifest import DIR, FILE, Entry, Manifest
from scripts.bench_seed import Row, _find, _rss_mb, _timed
from scripts.harness import (
    BenchError,
    Lazycaf,
    Made,
    Record,
    btrfs_image,
    default_json,
    find_lazycaf,
    md_row,
    median,
    progress,
    run,
    run_in_tempdir,
)

TITLE: Final = "Manifest scale: decode, mount, list, diff"
IMAGE_SIZE: Final = "4G"
CHANGED: Final = 20
MTIME: Final = 1_700_000_000_000_000_000
say = progress("bench_manifest")


def venv_like(n: int) -> Manifest:
    """About ``n`` entries (a few more: whole directories) shaped like a venv."""
    contents = [b"", *(f"blob {i}\n".encode() for i in range(8))]
    blobs = [(Digest.of(c), len(c)) for c in contents]
    top = ("lib", "lib/python3.11", "lib/python3.11/site-packages")
    entries = [Entry(p, DIR, 0o755, MTIME, 0) for p in top]
    pkg = 0
    while len(entries) < n:
        base = f"{top[-1]}/pkg{pkg:05d}"
        entries.append(Entry(base, DIR, 0o755, MTIME, 0))
        for sub in range(4):
            sd = f"{base}/sub{sub}"
            entries.append(Entry(sd, DIR, 0o755, MTIME, 0))
            for j in range(20 + (pkg * 7 + sub * 13) % 81):
                d, size = blobs[(j + pkg) % len(blobs)]
                name = f"{sd}/module_{j:03d}.py"
                entries.append(Entry(name, FILE, 0o644, MTIME + j, size, d))
        pkg += 1
    return Manifest(entries)


def changed(a: Manifest, k: int = CHANGED) -> Manifest:
    """``a`` with ``k`` files spread over the tree given new contents and mtimes."""
    files = [i for i, e in enumerate(a.entries) if e.kind == FILE]
    picked = set(files[:: max(1, len(files) // k)][:k])
    new, size = Digest.of(b"changed\n"), len(b"changed\n")
    out = [
        e._replace(digest=new, size=size, mtime_ns=e.mtime_ns + 1) if i in picked else e
        for i, e in enumerate(a.entries)
    ]
    return Manifest(out, chunk_size=a.chunk_size)


def store(cas: Path, m: Manifest, ref: str) -> tuple[str, Path]:
    """Put ``m`` (and its few blobs) into the CAS directory ``cas`` under ``ref``; its digest
    and a file holding its canonical bytes."""
    cd = CasDir(cas)
    contents = [b"", b"changed\n", *(f"blob {i}\n".encode() for i in range(8))]
    cd.write_many([(Digest.of(c), c) for c in contents])
    data = m.encode()
    digest = Digest.of(data)
    cd.write(digest, data)
    cd.write_ref(ref, digest)
    raw = cas.parent / f"{ref}.manifest"
    raw.write_bytes(data)
    return digest.hex, raw


_PROBE: Final = """
import resource, sys, time
path, what = sys.argv[1], sys.argv[2]
from lazycaf.core.manifest import Manifest
data = open(path, "rb").read()
with open("/proc/self/status") as status:
    before = next(int(ln.split()[1]) for ln in status if ln.startswith("VmRSS:"))
t0 = time.perf_counter()
if what == "decode":
    m = Manifest.decode(data)
else:
    from lazycaf.core.digest import Digest
    from lazycaf.core.manifestindex import build_index
    m = build_index(data, digest=Digest.of(data))
secs = time.perf_counter() - t0
grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(f"{secs} {grew}")
"""


def probe(python: Path, raw: Path, what: str) -> tuple[float, float]:
    """Seconds and peak-RSS growth (MB: peak RSS less the RSS once the bytes are read) of
    decoding ``raw`` in a fresh interpreter."""
    out = run([str(python), "-c", _PROBE, str(raw), what], what=f"{what} probe", timeout=None)
    secs, grew = out.split()
    return float(secs), float(grew)


def peak_rss_mb(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Seconds and peak RSS (MB) of a command (GNU time's maximum resident set size)."""
    t0 = time.perf_counter()
    res = subprocess.run(
        ["/usr/bin/time", "-f", "%M", *cmd], env=env, capture_output=True, text=True, check=False
    )
    secs = time.perf_counter() - t0
    if res.returncode != 0:
        raise BenchError(f"{cmd[1:3]} failed: {res.stderr[-400:]}")
    return secs, int(res.stderr.strip().splitlines()[-1]) / 1024


@dataclass
class Bench:
    lz: Lazycaf
    made: Made
    runs: int
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, row: Row) -> None:
        self.rows.append(row)
        say(f"{row.name}: median {median(row.samples):.3f} {row.unit}")

    def size(self, n: int) -> None:
        tmp = self.made.tmp / f"n{n}"
        cas = tmp / "cas"
        t0 = time.perf_counter()
        a = venv_like(n)
        b = changed(a)
        ref_a, raw_a = store(cas, a, "a")
        ref_b, _ = store(cas, b, "b")
        entries = len(a)
        del a, b
        say(f"{entries:,} entries: manifests made in {time.perf_counter() - t0:.1f} s")
        label = f"{entries / 1e3:,.0f}k"
        self.decode(label, raw_a)
        self.mounted(label, cas, ref_a, ref_b)

    def decode(self, label: str, raw: Path) -> None:
        python = self.lz.python
        for what, name in (
            ("decode", "Manifest.decode"),
            ("index", "build_index (first mount only)"),
        ):
            try:
                samples = [probe(python, raw, what) for _ in range(self.runs)]
            except BenchError as exc:
                self.notes.append(f"{name} not measured: {str(exc)[:120]}")
                continue
            secs = tuple(s for s, _ in samples)
            grew = tuple(g for _, g in samples)
            self.add(Row(f"{label}: {name}", "s", secs, "-"))
            self.add(Row(f"{label}: {name}, peak RSS growth", "MB", grew, "-"))

    def mounted(self, label: str, cas: Path, ref_a: str, ref_b: str) -> None:
        lz = Lazycaf(
            self.lz.exe,
            cas,
            clean_env=False,
            mount_args=("--cas", str(cas)),
            wait_after_umount=True,
        )
        cache = self.made.cache(lz, f"cache-{label}")
        mnt = self.made.mountpoint(f"mnt-{label}")
        t0 = time.perf_counter()
        lz.mount(ref_a, mnt, cache)  # the manifest into the cache, the daemon up
        first = time.perf_counter() - t0
        lz.umount(mnt)
        self.notes.append(f"{label}: first mount (manifest fetched, index built) {first:.2f} s")
        ready: list[float] = []
        rss: list[float] = []
        rss_walked: list[float] = []
        walk: list[float] = []
        for _ in range(self.runs):
            ready.append(lz.mount(ref_a, mnt, cache))
            rss.append(_rss_mb(str(mnt)))
            _find(mnt)  # warm: the kernel caches entries and attributes
            rss_walked.append(_rss_mb(str(mnt)))
            walk.append(_timed(lambda: _find(mnt)))
            lz.umount(mnt)
        self.add(
            Row(f"{label}: mount ready, manifest cached", "s", tuple(ready), "<= 0.5 s at 300k")
        )
        self.add(Row(f"{label}: mount process RSS, ready", "MB", tuple(rss), "<= 150 MB at 300k"))
        self.add(Row(f"{label}: mount process RSS, after a walk", "MB", tuple(rss_walked), "-"))
        self.add(Row(f"{label}: find MNT + stat of every entry, warm", "s", tuple(walk), "-"))
        env = lz.env(cache)
        cas_args = ["--cas", str(cas)]
        for name, args in (
            ("lazycaf ls -R A", ["ls", "-R", ref_a, *cas_args]),
            ("lazycaf diff A B", ["diff", ref_a, ref_b, *cas_args]),
        ):
            cmd = [str(lz.exe), *args]
            samples = [peak_rss_mb(cmd, env) for _ in range(self.runs)]
            secs = tuple(s for s, _ in samples)
            self.add(Row(f"{label}: {name}", "s", secs, "<= 1 s at 300k"))
            self.add(Row(f"{label}: {name}, peak RSS", "MB", tuple(m for _, m in samples), "-"))
        lz.fetcher_stop(cache)


# -- main ----------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m scripts.bench_manifest", description=(__doc__ or "").splitlines()[0]
    )
    ap.add_argument("--entries", type=int, nargs="+", default=[300_000, 1_000_000])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tmpdir", type=Path, help="parent of the temp dir (default: system temp)")
    ap.add_argument("--lazycaf", type=Path, default=Path(sys.executable).parent / "lazycaf")
    ap.add_argument("--json", type=Path, default=default_json("bench_manifest"))
    args = ap.parse_args(argv)
    if args.runs < 1 or min(args.entries) < 100:
        ap.error("--runs must be >= 1 and --entries at least 100")
    return args


def bench(args: argparse.Namespace, record: Record, made: Made, lz: Lazycaf) -> None:
    btrfs_image(made, IMAGE_SIZE)
    b = Bench(lz, made, args.runs)
    for n in args.entries:
        b.size(n)
    record.facts = [
        "synthetic venv-like manifests: packages of 4 directories of 20-100 files, 9 shared "
        f"tiny blobs; B = A with {CHANGED} files changed",
        f"host cache on a Btrfs loop image ({IMAGE_SIZE}, compress=zstd); local CAS directory",
        f"{args.runs} runs per figure, medians; page cache warm; CLI start-up included",
    ]
    head = ["| figure | median | target (issue 16) |", "|---|---:|---|"]
    record.report = [f"- {f}" for f in record.facts] + ["", *head]
    record.report += [md_row(r.name, f"{median(r.samples):.3f} {r.unit}", r.target) for r in b.rows]
    record.report += ["", *(f"- {n}" for n in b.notes)]
    record.figures = [row.figure() for row in b.rows]
    record.data = {"load": os.getloadavg()}
    record.finish(args.json)
    print(json.dumps({r.name: round(median(r.samples), 3) for r in b.rows}, indent=1))


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    exe = find_lazycaf(args.lazycaf)
    if os.geteuid() != 0 or exe is None or not Path("/usr/bin/time").exists():
        print("bench_manifest: error: needs root, lazycaf and /usr/bin/time", file=sys.stderr)
        return 2
    record = Record.begin("bench_manifest", TITLE, argv, args)

    def body(made: Made, lz: Lazycaf | None) -> None:
        assert lz is not None
        bench(args, record, made, lz)

    return run_in_tempdir("bench_manifest", args.tmpdir, body, lazycaf=exe)


if __name__ == "__main__":
    sys.exit(main())
