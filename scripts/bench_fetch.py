"""The fetch path's cost per blob (issue 17 item 3): a profile's hot set fetched into an empty
host cache, and the CPU the fetcher daemon and the CAS server spend on it.

Prints figures and asserts nothing. Isolates what ``bench_prefetch`` measures inside a cold
start (its "daemon / CAS server CPU per blob" rows): no mount, no workload, no shaped link,
only ``prefetch <hot set>`` sent to a fresh daemon over loopback and timed until every blob
is in the cache. Variant "this, bundle": the same code, the hot set sent as a mount sends it
when its profile has a bundle (``prefetch_bundle``: one request a part of the bundle, which
the recording run's save built), against "this": blob by blob (``blobs:get`` groups), and
"this, bundle, parts as stored": the same bundle rewritten here in the older part form (the
blobs as the store keeps them, ``scripts/plainparts.py``) where its parts compress them
together.

Setup: the sample (``--sample``; default the torch sample of ``bench_prefetch --workload
torch``, ``build/sample-torch``) is packed into a local-dir CAS; one cold run of the workload
through a mount records its profile; ``lazycaf cas serve`` serves that directory. The hot set
is what a mount would send: ``plan_prefetch`` of the profile against the manifest.

Each run: a fresh host cache on a Btrfs loop image (``compress=zstd``), a fresh
``lazycaf fetcher serve``, the hot set sent with one ``prefetch``; timed until the daemon has
stored every blob. CPU seconds of the daemon and of the CAS server are read from
``/proc/PID/stat`` around it. The CAS directory stays in the page cache (one untimed run
first): this measures CPU, not the store's disk.

``--baseline DIR``: a checkout of another version of the code (``git worktree add DIR REV``);
its daemon and CAS server run beside this tree's, alternately, run for run.

Usage: python -m scripts.bench_fetch [--sample DIR] [--runs N] [--baseline DIR]
       [--tmpdir DIR] [--json PATH]

Writes ``results/bench_fetch/results.json`` (``--json PATH``: there instead). Needs root (the
Btrfs loop image; the mount that records the profile).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import trio

from lazycaf.cas.bundle import Bundle
from lazycaf.cas.casdir import CasDir
from lazycaf.cas.local import LocalCAS
from lazycaf.core.digest import Digest
from lazycaf.core.manifest import Manifest
from lazycaf.core.verified import verify_blob
from lazycaf.host.client import FetcherClient
from lazycaf.host.indexlock import forget_lock
from lazycaf.host.paths import CacheLayout
from lazycaf.traces.profiles import load_profile
from lazycaf.traces.trace import plan_prefetch
from scripts.harness import (
    REPO,
    BenchError,
    Figure,
    Lazycaf,
    Made,
    Record,
    btrfs_image,
    default_json,
    find_lazycaf,
    md_row,
    median,
    progress,
    run_in_tempdir,
    stop_process,
    wait_daemon_ready,
    wait_for_line,
)
from scripts.plainparts import as_stored

TITLE: Final = "Fetch path: a profile's hot set into an empty host cache, CPU per blob"
PROFILE: Final = "bench-fetch"
CODE: Final = {"torch": "import torch", "numpy": "import numpy"}
TIMEOUT_S: Final = 300.0
TICK: Final = os.sysconf("SC_CLK_TCK")

say = progress("bench_fetch")


@dataclass(frozen=True)
class Variant:
    """A version of the code: its source dir (on ``PYTHONPATH``) and its CAS server."""

    name: str
    src: Path
    cas_url: str = ""
    cas_pid: int = 0
    bundle: Bundle | None = None  # the hot set through this bundle (one request a part)


@dataclass
class Sample:
    seconds: float
    daemon_cpu: float
    cas_cpu: float
    blobs: int
    nbytes: int
    daemon_system: float = 0.0  # of ``daemon_cpu``: in the kernel
    daemon_faults: int = 0  # minor page faults (memory the kernel had to map and zero)


@dataclass
class Results:
    plan_blobs: int
    plan_bytes: int
    floor_ms: float = 0.0  # decode + verify of the hot set alone, CPU ms a blob
    runs: dict[str, list[Sample]] = field(default_factory=dict)


def usage(pid: int) -> tuple[float, float, int]:
    """CPU seconds (user + system), of them system, and minor page faults of ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    user, system = int(fields[11]) / TICK, int(fields[12]) / TICK
    return user + system, system, int(fields[7])


def cpu_seconds(pid: int) -> float:
    return usage(pid)[0]


def variant_env(v: Variant) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(v.src)}


def start_cas(made: Made, lz: Lazycaf, v: Variant) -> Variant:
    log = made.log(f"cas-{v.name}.log")
    cmd = [str(lz.python), "-m", "lazycaf", "cas", "serve", "--root", str(lz.cas)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*cmd, "--listen", "127.0.0.1:0"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=str(v.src),
            env=variant_env(v),
        )
    made.servers.append(proc)
    port = wait_for_line(proc, log, r"serving .*http://127\.0\.0\.1:(\d+)", f"cas {v.name}")
    return dataclasses.replace(v, cas_url=f"http://127.0.0.1:{port}", cas_pid=proc.pid)


def hot_set(cas_dir: Path, manifest_hex: str) -> tuple[list[Digest], int, Bundle | None]:
    """What a mount of the manifest would send: the profile's hot set, planned; its bytes;
    the profile's bundle (the recording run's save built it)."""

    async def plan() -> tuple[list[Digest], int, Bundle | None]:
        cas = LocalCAS(cas_dir)
        manifest = Manifest.decode(await cas.get(Digest.parse(manifest_hex)))
        profile = await load_profile(cas, PROFILE)
        if profile is None:
            raise BenchError(f"no profile {PROFILE!r} was recorded")
        digests = plan_prefetch(profile.hot_set(), manifest.by_path, manifest.chunk_size)
        sizes = manifest.blobs()
        return digests, sum(sizes[d] for d in digests), profile.bundle

    return trio.run(plan)


async def prefetch_all(
    sock: Path, digests: list[Digest], bundle: Bundle | None
) -> tuple[float, int, int]:
    """Send the hot set (as a mount does: through the bundle first when there is one); wait
    until the daemon stored it all: (seconds, blobs, bytes)."""
    client = FetcherClient(sock)
    try:
        t0 = time.perf_counter()
        if bundle is not None:
            planned = set(digests)
            parts = [(p.digest, [d for d in p.blobs if d in planned]) for p in bundle.parts]
            await client.prefetch_bundle(parts)
        await client.prefetch(digests)
        deadline = t0 + TIMEOUT_S
        while True:
            stats = await client.stats()
            done = stats["fetches"] + stats["fetch_failures"]
            if stats.get("prefetch_queued", 1) == 0 and done >= len(digests):
                break
            if time.perf_counter() > deadline:
                raise BenchError(f"prefetch of {len(digests)} blobs not done in {TIMEOUT_S} s")
            await trio.sleep(0.05)
        secs = time.perf_counter() - t0
        if stats["fetch_failures"]:
            raise BenchError(f"{stats['fetch_failures']} fetches failed (see the daemon's log)")
        return secs, int(stats["fetches"]), int(stats["bytes_fetched"])
    finally:
        await client.aclose()


def verify_floor(cas_dir: Path, digests: list[Digest]) -> float:
    """CPU ms a blob to decode and verify the hot set as stored, in one thread: what any
    fetch path that verifies what it stores spends on the bytes alone."""
    store = CasDir(cas_dir)
    stored = [(d, *store.read_encoded(d)) for d in digests]
    t0 = time.process_time()
    for d, encoding, payload in stored:
        verify_blob(d, encoding, payload)
    return 1000 * (time.process_time() - t0) / len(digests)


def one_run(made: Made, lz: Lazycaf, v: Variant, digests: list[Digest], k: int) -> Sample:
    cache = made.cache(lz, f"cache-{v.name}-{k}")
    log = made.log(f"fetcher-{v.name}-{k}.log")
    cmd = [str(lz.python), "-m", "lazycaf", "fetcher", "serve", "--cache", str(cache)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*cmd, "--cas", v.cas_url],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=str(v.src),
            env=variant_env(v),
        )
    try:
        wait_daemon_ready(proc, cache, log)
        time.sleep(0.3)  # its start-up work (reconcile, zygote) out of the window
        d0, c0 = usage(proc.pid), cpu_seconds(v.cas_pid)
        sock = cache / "fetcher.sock"
        secs, blobs, nbytes = trio.run(prefetch_all, sock, digests, v.bundle)
        d1, c1 = usage(proc.pid), cpu_seconds(v.cas_pid)
    finally:
        stop_process(proc)
        made.caches.remove(cache)
        forget_lock(CacheLayout(cache).index)
        subprocess.run(["rm", "-rf", str(cache)], check=False)
    daemon = [b - a for a, b in zip(d0, d1, strict=True)]
    return Sample(secs, daemon[0], c1 - c0, blobs, nbytes, daemon[1], int(daemon[2]))


def record_profile(made: Made, lz: Lazycaf, sample: Path, code: str) -> str:
    """Pack the sample; record the workload's profile with one cold run; the manifest hex."""
    t0 = time.perf_counter()
    digest = lz.pack(sample)
    say(f"packed {sample} in {time.perf_counter() - t0:.1f} s")
    cache = made.cache(lz, "cache-record")
    cmd = ["profile", "record", "--name", PROFILE, digest, "--cas", str(lz.cas), "--"]
    lz.cli(*cmd, "{mnt}/bin/python3", "-c", code, cache=cache, what="profile record")
    lz.fetcher_stop(cache)
    return digest


def report(res: Results, variants: list[Variant]) -> tuple[list[str], list[Figure]]:
    lines = [
        "",
        f"hot set: {res.plan_blobs} blobs, {res.plan_bytes / 1e6:.1f} MB decoded; decoding "
        f"and verifying them alone (one thread, in process): {res.floor_ms:.2f} ms CPU a blob",
        "",
        md_row(
            "variant",
            "wall s",
            "MB/s",
            "daemon CPU ms/blob",
            "of it system",
            "daemon page faults/blob",
            "CAS CPU ms/blob",
            "runs",
        ),
        md_row("---", "---:", "---:", "---:", "---:", "---:", "---:", "---:"),
    ]
    figures: list[Figure] = []
    for v in variants:
        rs = res.runs[v.name]
        wall = [r.seconds for r in rs]
        dms = [1000 * r.daemon_cpu / r.blobs for r in rs]
        cms = [1000 * r.cas_cpu / r.blobs for r in rs]
        lines.append(
            md_row(
                v.name,
                f"{median(wall):.2f}",
                f"{res.plan_bytes / 1e6 / median(wall):.0f}",
                f"{median(dms):.2f}",
                f"{median([1000 * r.daemon_system / r.blobs for r in rs]):.2f}",
                f"{median([r.daemon_faults / r.blobs for r in rs]):.0f}",
                f"{median(cms):.2f}",
                str(len(rs)),
            )
        )
        figures += [
            Figure(f"{v.name}: hot set fetched", "s", tuple(wall)),
            Figure(f"{v.name}: daemon CPU per blob", "ms", tuple(dms)),
            Figure(f"{v.name}: CAS server CPU per blob", "ms", tuple(cms)),
        ]
    lines += [
        "",
        "Targets (issue 17): daemon <= 0.5 ms, CAS server <= 0.3 ms CPU a blob. Medians; "
        "variants alternate run for run. The daemon's figure includes the decode-and-verify "
        "floor above and writing the blobs.",
    ]
    return lines, figures


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m scripts.bench_fetch", description=TITLE)
    ap.add_argument("--sample", type=Path, default=REPO / "build" / "sample-torch")
    ap.add_argument("--workload", choices=sorted(CODE), default="torch")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--baseline", type=Path, help="a checkout of the code to compare with")
    ap.add_argument("--tmpdir", type=Path)
    ap.add_argument("--lazycaf", type=Path, default=REPO / ".venv" / "bin" / "lazycaf")
    ap.add_argument("--json", type=Path, default=default_json("bench_fetch"))
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench_fetch: error: needs root (Btrfs loop image, FUSE)", file=sys.stderr)
        return 2
    if not (args.sample / "bin" / "python3").exists():
        print(
            f"bench_fetch: error: no sample at {args.sample} (build it: python -m "
            "scripts.bench_prefetch --workload torch builds build/sample-torch)",
            file=sys.stderr,
        )
        return 2
    if args.baseline is not None and not (args.baseline / "lazycaf").is_dir():
        print(f"bench_fetch: error: {args.baseline} is not a checkout", file=sys.stderr)
        return 2
    exe = find_lazycaf(args.lazycaf)
    if exe is None:
        print(f"bench_fetch: error: lazycaf not found at {args.lazycaf}", file=sys.stderr)
        return 2
    record = Record.begin("bench_fetch", TITLE, argv, args)

    def body(made: Made, lz: Lazycaf | None) -> None:
        assert lz is not None
        btrfs_image(made, "4G")
        manifest = record_profile(made, lz, args.sample.resolve(), CODE[args.workload])
        digests, nbytes, bundle = hot_set(lz.cas, manifest)
        variants = [Variant("this", REPO)]
        if bundle is not None:
            plain = as_stored(CasDir(lz.cas), bundle)
            variants.append(Variant("this, bundle, parts as stored", REPO, bundle=plain))
            variants.append(Variant("this, bundle", REPO, bundle=bundle))
            say(
                f"bundle: {len(bundle.parts)} parts, {bundle.size / 1e6:.1f} MB compressed "
                f"together, {plain.size / 1e6:.1f} MB as stored"
            )
        else:
            say("the profile has no bundle: its variants are left out")
        if args.baseline is not None:
            variants.insert(0, Variant("baseline", args.baseline.resolve()))
        variants = [start_cas(made, lz, v) for v in variants]
        res = Results(len(digests), nbytes, verify_floor(lz.cas, digests))
        res.runs = {v.name: [] for v in variants}
        one_run(made, lz, variants[-1], digests, 0)  # untimed: the store into memory
        for k in range(1, args.runs + 1):
            for v in variants:
                s = one_run(made, lz, v, digests, k)
                say(
                    f"{v.name} run {k}: {s.seconds:.2f} s, daemon {s.daemon_cpu:.2f} CPU-s, "
                    f"CAS {s.cas_cpu:.2f} CPU-s, {s.blobs} blobs"
                )
                res.runs[v.name].append(s)
        record.report, record.figures = report(res, variants)
        record.facts = [
            f"sample {args.sample} packed into a local-dir CAS, served by `lazycaf cas serve` "
            "on loopback; host caches on a Btrfs loop image",
            f"workload recorded once through a mount: python -c {CODE[args.workload]!r}",
        ]
        record.finish(args.json)

    return run_in_tempdir("bench_fetch", args.tmpdir, body, lazycaf=exe)


if __name__ == "__main__":
    sys.exit(main())
