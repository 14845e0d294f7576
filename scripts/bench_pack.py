"""Benchmark ``lazycaf pack`` against ``mksquashfs`` (the XAR-like full rebuild), side by side.

Prints figures and asserts nothing: speed targets are read off the printed table, never checked
by timed test assertions. Every figure is a median (with min and max) over ``--runs`` runs taken
in this one invocation on this one machine, so ratios compare like with like.

Measured, on the sample tree (``scripts/build_sample.py``, default numpy+pandas+scipy):

1. ``lazycaf pack`` into an empty local CAS directory (cold CAS, a fresh one per run);
2. the same pack into the now-warm CAS (nothing to upload);
3. ``mksquashfs SAMPLE out.sqsh -comp zstd -noappend -quiet`` (the full rebuild);
4. incremental: 10 ``.py`` files of a copy of the tree get a comment appended (new content in
   every run), then ``lazycaf pack`` into the warm CAS and ``mksquashfs`` of the modified tree;
5. cold, warm and incremental packs against the HTTP CAS (``lazycaf cas serve`` subprocess);
6. size and decode time of a synthetic 100k-entry manifest (in-process).

Commands run as subprocesses, so pack times include interpreter start-up and imports (the
``lazycaf --version`` row shows that floor). The page cache is warm (the tree was just built or
read); no cache is dropped. Every temp dir and subprocess made here is removed or stopped on
exit, also on errors, Ctrl-C and SIGTERM.

Usage: python -m scripts.bench_pack [--sample DIR] [--runs N] [--packages numpy ...] [--json PATH]

Writes ``results/bench_pack/results.json`` (``--json PATH``: there instead).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Final

from lazycaf.core import framing
from lazycaf.core.digest import Digest
from lazycaf.core.manifest import DIR, FILE, Entry, Manifest
from scripts import harness
from scripts.harness import (
    BenchError,
    Figure,
    Made,
    Record,
    build_sample,
    cleanup,
    default_json,
    find_lazycaf,
    fs_of,
    guarded_run,
    md_row,
    median,
    progress,
)

DEFAULT_PACKAGES: Final = ("numpy", "pandas", "scipy")
EDITED_FILES: Final = 10
INCREMENTAL_TARGET: Final = 20.0
DECODE_TARGET_S: Final = 0.3
MANIFEST_RUNS: Final = 5
SERVER_START_TIMEOUT_S: Final = 30.0
SERVER_STOP_TIMEOUT_S: Final = 10.0
_DIGEST_RE: Final = re.compile(r"[0-9a-f]{64}")
_SERVING_RE: Final = re.compile(r"lazycaf cas: serving .* on (http://\S+)")


say = progress("bench_pack")


# -- results -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tree:
    """A tree on disk and what a walk of it counts (regular files and their bytes)."""

    path: Path
    files: int
    nbytes: int
    dirs: int
    symlinks: int


@dataclass(frozen=True)
class Row:
    """One line of the result table; ``baseline`` is the mksquashfs median it is compared to."""

    name: str
    samples: tuple[float, ...]
    items: int = 0
    nbytes: int = 0
    item_name: str = "files"
    baseline: float | None = None

    @property
    def median(self) -> float:
        return median(self.samples)

    def figure(self) -> Figure:
        if self.baseline is None:
            return Figure(self.name, "s", self.samples)
        ratio = self.baseline / self.median if self.median > 0 else None
        base = "mksquashfs (edited tree)" if "incremental" in self.name else "mksquashfs, full"
        return Figure(
            self.name, "s", self.samples, base, (self.baseline,), ratio, "mksquashfs / this"
        )

    def cells(self) -> list[str]:
        med = self.median
        rate = "-"
        if self.items and med > 0:
            rate = f"{self.items / med:,.0f} {self.item_name}/s"
            if self.nbytes:
                rate += f", {self.nbytes / 1e6 / med:,.1f} MB/s"
        ratio = f"{self.baseline / med:.1f}x" if self.baseline is not None and med > 0 else "-"
        return [
            self.name,
            _secs(med),
            _secs(min(self.samples)),
            _secs(max(self.samples)),
            rate,
            ratio,
        ]


def _secs(s: float) -> str:
    return f"{s:.3f} s" if s >= 0.01 else f"{s * 1000:.2f} ms"


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        say(f"{row.name}: median {_secs(row.median)} over {len(row.samples)} runs")
        return row


# -- processes -----------------------------------------------------------------------------
def run(cmd: list[str], *, what: str) -> str:
    """Run ``cmd`` to completion, however long it takes (mksquashfs of a big tree)."""
    return harness.run(cmd, what=what, timeout=None)


def timed(cmd: list[str], *, what: str) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = run(cmd, what=what)
    return time.perf_counter() - t0, out


@dataclass(frozen=True)
class Tools:
    lazycaf: Path
    mksquashfs: str

    def pack(self, tree: Path, cas: str, *, what: str) -> tuple[float, str]:
        """Time one ``lazycaf pack``; returns (seconds, manifest digest hex)."""
        secs, out = timed([str(self.lazycaf), "pack", str(tree), "--cas", cas], what=what)
        digest = out.strip().splitlines()[-1] if out.strip() else ""
        if not _DIGEST_RE.fullmatch(digest):
            raise BenchError(f"{what}: expected a manifest digest on stdout, got {out!r:.200}")
        return secs, digest

    def squash(self, tree: Path, image: Path, *, what: str) -> float:
        cmd = [self.mksquashfs, str(tree), str(image), "-comp", "zstd", "-noappend", "-quiet"]
        secs, _ = timed(cmd, what=what)
        return secs


@contextlib.contextmanager
def cas_server(lazycaf: Path, root: Path, log: Path) -> Iterator[str]:
    """Run ``lazycaf cas serve`` on an ephemeral port; yields its URL, always stops it."""
    cmd = [str(lazycaf), "cas", "serve", "--root", str(root), "--listen", "127.0.0.1:0"]
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
    drain: threading.Thread | None = None
    try:
        assert proc.stdout is not None
        url = _wait_for_url(proc, proc.stdout, log)
        # Anything the server prints later must not fill the pipe and stall it.
        drain = threading.Thread(target=_drain, args=(proc.stdout,), daemon=True)
        drain.start()
        yield url
    finally:
        _stop(proc)
        if proc.returncode not in (0, -signal.SIGTERM, 128 + signal.SIGTERM):
            last = (_tail(log).splitlines() or ["(empty log)"])[-1]
            say(f"cas serve (pid {proc.pid}) exited {proc.returncode} on SIGTERM: {last}")
        if drain is not None:
            drain.join(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()


def _wait_for_url(proc: subprocess.Popen[str], stdout: IO[str], log: Path) -> str:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    with selectors.DefaultSelector() as sel:
        sel.register(stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if sel.select(timeout=0.5):
                line = stdout.readline()
                m = _SERVING_RE.search(line)
                if m is None:
                    raise BenchError(
                        f"cas serve: unexpected first line {line!r}; stderr:\n{_tail(log)}"
                    )
                return m.group(1)
            if proc.poll() is not None:
                raise BenchError(f"cas serve exited ({proc.returncode}); stderr:\n{_tail(log)}")
    raise BenchError(f"cas serve printed no URL within {SERVER_START_TIMEOUT_S:.0f} s")


def _drain(stream: IO[str]) -> None:
    with contextlib.suppress(OSError, ValueError):
        for _ in stream:
            pass


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=SERVER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            say(f"cas serve (pid {proc.pid}) ignored SIGTERM; killing it")
            proc.kill()
            proc.wait()


def _tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-2000:].strip()
    except OSError:
        return "(no log)"


# -- trees ---------------------------------------------------------------------------------
def walk_tree(root: Path) -> Tree:
    """Count what ``lazycaf pack`` sees: regular files (per path) and their bytes."""
    files = nbytes = dirs = symlinks = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISLNK(st.st_mode):
                symlinks += 1
            elif stat.S_ISDIR(st.st_mode):
                dirs += 1
            elif stat.S_ISREG(st.st_mode):
                files += 1
                nbytes += st.st_size
    return Tree(root, files, nbytes, dirs, symlinks)


def build_with_fallback(out: Path, packages: list[str], notes: list[str]) -> list[str]:
    """Build the sample with ``packages``; fall back to numpy alone if that build fails.
    The packages built."""
    for attempt in (packages, ["numpy"]):
        say(f"building the sample ({' '.join(attempt)}) in {out} ...")
        try:
            say(build_sample(out, attempt) or "built")
            return attempt
        except BenchError as exc:
            last = (str(exc).strip().splitlines() or ["(no output)"])[-1]
            say(f"build with {' '.join(attempt)} failed: {last}")
            if attempt == ["numpy"]:
                break
            notes.append(f"the {'+'.join(packages)} build failed ({last}); FELL BACK to numpy only")
    raise BenchError("build_sample.py failed, also with numpy alone")


def pick_py_files(root: Path, n: int) -> list[Path]:
    """``n`` non-empty .py files spread evenly over the tree (deterministic)."""
    found = sorted(
        p for p in root.rglob("*.py") if p.is_file() and not p.is_symlink() and p.stat().st_size
    )
    if len(found) < n:
        raise BenchError(f"{root} has only {len(found)} .py files, need {n}")
    step = len(found) / n
    return [found[int(i * step)] for i in range(n)]


def edit_files(paths: list[Path], tag: str) -> None:
    """Append a comment unique to ``tag`` (new content, new blobs, every time)."""
    for p in paths:
        with p.open("a") as f:
            f.write(f"\n# bench_pack edit {tag}\n")


def count_blobs(cas_root: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(cas_root / "blobs"))


# -- phases --------------------------------------------------------------------------------
@dataclass
class Bench:
    tools: Tools
    tmp: Path
    runs: int
    sample: Tree
    report: Report
    digests: set[str] = field(default_factory=set)

    def startup(self) -> None:
        cmd = [str(self.tools.lazycaf), "--version"]
        samples = tuple(timed(cmd, what="lazycaf --version")[0] for _ in range(self.runs))
        self.report.add(Row("`lazycaf --version` (start-up floor)", samples))

    def local_packs(self) -> Path:
        """Cold packs (fresh CAS each run) then warm packs; returns the warm CAS root."""
        cold: list[float] = []
        cas = self.tmp / "cas-local-0"
        for i in range(self.runs):
            if i:
                shutil.rmtree(cas)
                cas = self.tmp / f"cas-local-{i}"
            secs, digest = self.tools.pack(self.sample.path, str(cas), what="cold pack")
            cold.append(secs)
            self.digests.add(digest)
        self.report.add(self._pack_row("pack, local CAS, cold", cold))
        warm = [self._pack(str(cas), "warm pack") for _ in range(self.runs)]
        self.report.add(self._pack_row("pack, local CAS, warm (nothing new)", warm))
        return cas

    def squash_full(self) -> Row:
        image = self.tmp / "full.sqsh"
        samples = tuple(
            self.tools.squash(self.sample.path, image, what="mksquashfs") for _ in range(self.runs)
        )
        self.report.notes.append(f"mksquashfs image: {image.stat().st_size / 1e6:.1f} MB")
        image.unlink()
        return self.report.add(self._tree_row("mksquashfs, full (zstd)", samples, None))

    def incremental(self, copy: Path, edited: list[Path], cas_root: Path) -> tuple[Row, Row]:
        """Edit, pack into the warm local CAS, mksquashfs the edited tree; per run."""
        packs: list[float] = []
        squashes: list[float] = []
        new_blobs: list[int] = []
        image = self.tmp / "incr.sqsh"
        for i in range(self.runs):
            edit_files(edited, f"local-{i}")
            before = count_blobs(cas_root)
            packs.append(self.tools.pack(copy, str(cas_root), what="incremental pack")[0])
            new_blobs.append(count_blobs(cas_root) - before)
            squashes.append(self.tools.squash(copy, image, what="mksquashfs (edited tree)"))
        image.unlink()
        self.report.notes.append(
            f"new blobs stored per local incremental pack: {new_blobs} "
            f"(expected {EDITED_FILES} files + 1 manifest)"
        )
        sq = self.report.add(self._tree_row("mksquashfs, edited tree", tuple(squashes), None))
        name = f"pack, local CAS, incremental ({EDITED_FILES} .py edited)"
        inc = self.report.add(self._tree_row(name, tuple(packs), sq.median))
        return inc, sq

    def http_packs(self, copy: Path, edited: list[Path], squash_inc: float) -> Row:
        """Cold packs (fresh server and root each run), then warm and incremental packs."""
        cold: list[float] = []
        root = self.tmp / "cas-http-0"
        for i in range(self.runs):
            if i:
                shutil.rmtree(root)
                root = self.tmp / f"cas-http-{i}"
            with cas_server(self.tools.lazycaf, root, self.tmp / f"serve-{i}.log") as url:
                secs, digest = self.tools.pack(self.sample.path, url, what="HTTP cold pack")
            cold.append(secs)
            self.digests.add(digest)
        self.report.add(self._pack_row("pack, HTTP CAS, cold", cold))
        with cas_server(self.tools.lazycaf, root, self.tmp / "serve-warm.log") as url:
            warm = [self._pack(url, "HTTP warm pack") for _ in range(self.runs)]
            self.report.add(self._pack_row("pack, HTTP CAS, warm (nothing new)", warm))
            incr: list[float] = []
            new_blobs: list[int] = []
            for i in range(self.runs):
                edit_files(edited, f"http-{i}")
                before = count_blobs(root)
                incr.append(self.tools.pack(copy, url, what="HTTP incremental pack")[0])
                new_blobs.append(count_blobs(root) - before)
        self.report.notes.append(f"new blobs stored per HTTP incremental pack: {new_blobs}")
        name = f"pack, HTTP CAS, incremental ({EDITED_FILES} .py edited)"
        return self.report.add(self._tree_row(name, tuple(incr), squash_inc))

    def _pack(self, cas: str, what: str) -> float:
        secs, digest = self.tools.pack(self.sample.path, cas, what=what)
        self.digests.add(digest)
        return secs

    def _pack_row(self, name: str, samples: list[float]) -> Row:
        return self._tree_row(name, tuple(samples), None)

    def _tree_row(self, name: str, samples: tuple[float, ...], baseline: float | None) -> Row:
        return Row(name, samples, self.sample.files, self.sample.nbytes, baseline=baseline)


def set_baselines(rows: list[Row], squash_full: float) -> list[Row]:
    """Compare every row without a baseline of its own (except the floor) to the full rebuild."""
    out = []
    for r in rows:
        if r.baseline is None and r.items and r.item_name == "files":
            r = Row(r.name, r.samples, r.items, r.nbytes, r.item_name, squash_full)
        out.append(r)
    return out


# -- manifest ------------------------------------------------------------------------------
def synthetic_manifest(*, seed: int = 0) -> Manifest:
    """1000 package dirs x 99 modules (plus the 3 parent dirs), random digests and sizes."""
    rng = random.Random(seed)
    base = "lib/python3.11/site-packages"
    t0 = 1_700_000_000 * 10**9
    entries = [Entry(p, DIR, 0o755, t0, 0) for p in ("lib", "lib/python3.11", base)]
    for p in range(1000):
        pkg = f"{base}/pkg{p:04d}"
        entries.append(Entry(pkg, DIR, 0o755, t0 + rng.randrange(10**15), 0))
        for m in range(99):
            digest = Digest.from_bytes(rng.randbytes(32))
            size = rng.randrange(100, 200_000)
            mtime = t0 + rng.randrange(10**15)
            entries.append(Entry(f"{pkg}/module_{m:03d}.py", FILE, 0o644, mtime, size, digest))
    return Manifest(entries)


def repeat(fn: Callable[[], object], n: int) -> tuple[float, ...]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return tuple(out)


def bench_manifest(report: Report) -> Row:
    say("building the synthetic 100k-entry manifest ...")
    m = synthetic_manifest()
    raw = m.encode()
    encoding, payload = framing.encode(raw)
    n = len(m)
    report.add(
        Row(f"manifest encode ({n:,} entries)", repeat(m.encode, MANIFEST_RUNS), n, 0, "entries")
    )
    decode = report.add(
        Row(
            f"manifest decode ({n:,} entries)",
            repeat(lambda: Manifest.decode(raw), MANIFEST_RUNS),
            n,
            len(raw),
            "entries",
        )
    )
    unzstd = report.add(
        Row(
            "manifest zstd decompress (framing.decode)",
            repeat(lambda: framing.decode(encoding, payload), MANIFEST_RUNS),
            n,
            len(raw),
            "entries",
        )
    )
    if Manifest.decode(framing.decode(encoding, payload)).encode() != raw:
        raise BenchError("synthetic manifest does not survive encode/compress/decode")
    verdict = "meets" if decode.median < DECODE_TARGET_S else "MISSES"
    report.notes.append(
        f"synthetic manifest: {n:,} entries, {len(raw):,} bytes encoded "
        f"({len(raw) / n:.1f} B/entry), {len(payload):,} bytes as {encoding} frames "
        f"({len(payload) / len(raw):.0%}); decode median {_secs(decode.median)} {verdict} the "
        f"< {DECODE_TARGET_S} s target (+ {_secs(unzstd.median)} to decompress)"
    )
    return decode


# -- report --------------------------------------------------------------------------------
TITLE: Final = "lazycaf pack vs mksquashfs"


def report_lines(
    facts: list[str], sample: Tree, origin: str, runs: int, report: Report, incr: list[Row]
) -> list[str]:
    out = [f"- {fact}" for fact in facts]
    out.append(
        f"- sample: {sample.path} ({origin}): {sample.files:,} files, {sample.nbytes:,} bytes "
        f"({sample.nbytes / 2**20:.1f} MiB), {sample.dirs:,} dirs, {sample.symlinks} symlinks"
    )
    out.append(
        f"- {runs} runs per measurement (manifest rows: {MANIFEST_RUNS}); warm page cache "
        "(no cache dropped: the tree was just built or read). Pack times include interpreter "
        "start-up; the local CAS fsyncs every blob it writes; mksquashfs output went to a pipe."
    )
    out += ["", "| measurement | median | min | max | throughput (median) | mksquashfs / this |"]
    out.append("|---|---:|---:|---:|---:|---:|")
    out += [md_row(*row.cells()) for row in report.rows]
    out.append("")
    for row in incr:
        assert row.baseline is not None
        ratio = row.baseline / row.median
        verdict = "meets" if ratio >= INCREMENTAL_TARGET else "MISSES"
        out.append(
            f"- {row.name}: mksquashfs of the edited tree / incremental pack = {ratio:.1f}x "
            f"({verdict} the >= {INCREMENTAL_TARGET:.0f}x target)"
        )
    out.append(
        "- 'mksquashfs / this' compares incremental rows with mksquashfs of the edited tree, "
        "the other pack rows with the full mksquashfs of the sample (> 1 means pack is faster)"
    )
    out += [f"- {note}" for note in report.notes]
    return out


# -- main ----------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m scripts.bench_pack", description=(__doc__ or "").splitlines()[0]
    )
    ap.add_argument("--sample", type=Path, help="pack this tree instead of building one")
    ap.add_argument("--runs", type=int, default=3, help="runs per measurement (default 3)")
    ap.add_argument("--packages", nargs="+", default=list(DEFAULT_PACKAGES), metavar="PKG")
    ap.add_argument("--tmpdir", type=Path, help="parent of the temp dir (default: system temp)")
    ap.add_argument("--lazycaf", type=Path, default=Path(sys.executable).parent / "lazycaf")
    ap.add_argument(
        "--json",
        type=Path,
        default=default_json("bench_pack"),
        help="where to write the results (default results/bench_pack/results.json)",
    )
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    if args.sample is not None and not args.sample.is_dir():
        ap.error(f"--sample {args.sample} is not a directory")
    return args


def find_tools(args: argparse.Namespace) -> Tools:
    lazycaf = find_lazycaf(args.lazycaf)
    squash = shutil.which("mksquashfs")
    if lazycaf is None:
        raise BenchError(f"lazycaf not found at {args.lazycaf} nor on PATH")
    if squash is None:
        raise BenchError("mksquashfs not found (apt-get install squashfs-tools)")
    return Tools(lazycaf, squash)


def bench(args: argparse.Namespace, record: Record, tmp: Path) -> None:
    tools = find_tools(args)
    report = Report()
    if args.sample is not None:
        root, origin = args.sample.resolve(), "given with --sample"
    else:
        root = tmp / "sample"
        origin = "built: " + "+".join(build_with_fallback(root, args.packages, report.notes))
    sample = walk_tree(root)
    say(f"sample: {sample.files} files, {sample.nbytes / 1e6:.1f} MB")
    b = Bench(tools, tmp, args.runs, sample, report)
    b.startup()
    cas = b.local_packs()
    full = b.squash_full()
    copy = tmp / "edited"
    run(["cp", "-a", str(root), str(copy)], what="cp -a of the sample")
    edited = pick_py_files(copy, EDITED_FILES)
    incr, squash_incr = b.incremental(copy, edited, cas)
    http_incr = b.http_packs(copy, edited, squash_incr.median)
    bench_manifest(report)
    if len(b.digests) != 1:
        report.notes.append(f"ODD: unedited packs gave {len(b.digests)} manifest digests")
    else:
        report.notes.append(
            f"every unedited pack (local and HTTP) gave manifest {next(iter(b.digests))}"
        )
    report.rows = set_baselines(report.rows, full.median)
    squash_version = run([tools.mksquashfs, "-version"], what="mksquashfs -version")
    record.facts = [
        f"mksquashfs: {squash_version.strip().splitlines()[0]}",
        f"temp dir (sample copy, CAS dirs, images): {tmp} on {fs_of(tmp)}",
    ]
    record.report = report_lines(record.facts, sample, origin, args.runs, report, [incr, http_incr])
    record.figures = [row.figure() for row in report.rows]
    record.finish(args.json)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    record = Record.begin("bench_pack", TITLE, argv, args)
    made = Made(Path(tempfile.mkdtemp(prefix="bench_pack-", dir=args.tmpdir)))

    def clean() -> list[str]:  # the CAS servers stop when their blocks exit
        say(f"removing {made.tmp}")
        return cleanup(made, None)

    def body() -> None:
        bench(args, record, made.tmp)

    return guarded_run("bench_pack", body, clean)


if __name__ == "__main__":
    sys.exit(main())
