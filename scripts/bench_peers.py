"""Benchmark many hosts starting one executable at once, with peers on and off, side by side.

Prints figures and asserts nothing. Topology, built with ``scripts/netsim.py``: one network
namespace per client host (``--hosts``, default 8) and one for the CAS server, each joined to
the root namespace by a veth shaped with ``tc tbf`` at ``--rate-mbit`` (default 1000), both
ways; the root namespace routes between them (``net.ipv4.ip_forward``, restored afterwards).
So all CAS traffic shares the CAS host's one 1 Gbit/s link, and each host's traffic (CAS and
peers) its own. No delay is added: netsim's delay line is a proxy into one namespace and
cannot sit between two of them, so the veths' RTT (~0.1 ms) stands for a rack.

Each host runs its own fetcher daemon (its own cache directory on one Btrfs loop image) in its
namespace; with peers on, daemons listen on ``<host ip>:7000`` and share one peer list. Every
run starts from fresh caches, fresh daemons, the page cache dropped and the recorded profile
(``lazycaf profile record`` once, on its own host, before the runs). Then every host at the
same moment runs ``lazycaf mount sample:v1 MNT && MNT/bin/python3 -c "import numpy"``; the
figures are the time until the last host finished (and each host's own), and what the CAS
sent (``GET /v1/stats`` on the CAS server: stored, zstd bytes; and blob count).

Variants, interleaved within each run (their order rotates from run to run):

- ``single``: one host alone, peers off: the cold start every other figure is compared to;
- ``peers off``: all hosts, each fetching from the CAS;
- ``peers on``: all hosts, each fetching a blob's bytes from the blob's home peer;
- ``native single`` / ``native``: one, then all hosts' ``import numpy`` from the sample on
  local disk at once, caches dropped: how much slower this many interpreters are than one
  on this machine's cores alone (the CPU floor of any variant).

Each round also reports the CPU time the whole machine spent (``/proc/stat``, busy jiffies),
so a slowdown can be told apart into "more work" and "the same work on too few cores".

Targets (issue 5): CAS egress with peers on <= 1.2x one host's (the executable's hot bytes,
against ~N x with peers off), and all hosts finished with peers on within 1.5x of a single
host's cold start.

Usage: python -m scripts.bench_peers [--hosts 8] [--runs 3] [--rate-mbit 1000]
       [--sample DIR] [--tmpdir DIR] [--json PATH]
Writes ``results/bench_peers/results.json`` (every round in its ``data``; ``--json PATH``:
there instead).
Needs root. Removes every mount, daemon, server, namespace and loop device it made.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

from lazycaf.host.indexlock import forget_lock
from lazycaf.host.paths import CacheLayout
from scripts import netsim
from scripts.bench_prefetch import IMPORT_CODE, PROFILE, REF
from scripts.harness import (
    REPO,
    BenchError,
    Figure,
    Lazycaf,
    Made,
    Record,
    btrfs_image,
    busy_seconds,
    cleanup,
    daemon_ready,
    default_json,
    drop_caches,
    du,
    find_lazycaf,
    guarded_run,
    http_get,
    http_put,
    is_mounted,
    md_row,
    median,
    progress,
    python_env,
    run,
    sample_tree,
    stop_process,
    tail,
)

CAS_PORT: Final = 8470
PEER_PORT: Final = 7000
HOST_TIMEOUT_S: Final = 300.0
MB: Final = 1e6
VARIANTS: Final = ("single", "peers off", "peers on", "native single", "native")


say = progress("bench_peers")


@contextlib.contextmanager
def ip_forwarding() -> Iterator[None]:
    path = Path("/proc/sys/net/ipv4/ip_forward")
    before = path.read_text().strip()
    path.write_text("1\n")
    try:
        yield
    finally:
        path.write_text(before + "\n")


@dataclass
class Cluster:
    """The CAS host and the client hosts, as netsim links."""

    cas: netsim.Link
    hosts: list[netsim.Link]
    lz: Lazycaf
    made: Made

    @property
    def cas_url(self) -> str:
        return f"http://{self.cas.client_ip}:{CAS_PORT}"

    def cas_stats(self) -> dict[str, int]:
        stats: dict[str, int] = json.loads(http_get(f"{self.cas_url}/v1/stats"))
        return stats


def build_cluster(
    stack: contextlib.ExitStack, args: argparse.Namespace, made: Made, lz: Lazycaf
) -> Cluster:
    stack.enter_context(ip_forwarding())
    links = [
        stack.enter_context(netsim.shaped_link(name, rate_mbit=args.rate_mbit, rtt_ms=0))
        for name in ["pcas", *(f"p{i}" for i in range(args.hosts))]
    ]
    for link in links:  # every namespace reaches every other through the root namespace
        link.run(["ip", "route", "add", "10.77.0.0/16", "via", link.host_ip], check=True)
    return Cluster(links[0], links[1:], lz, made)


def start_cas(cluster: Cluster) -> None:
    log = cluster.made.log("cas-server.log")
    cmd = [str(cluster.lz.exe), "cas", "serve", "--root", str(cluster.lz.cas)]
    with open(log, "wb") as out:
        proc = cluster.cas.popen(
            [*cmd, "--listen", f"{cluster.cas.client_ip}:{CAS_PORT}"],
            share_mounts=True,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 30
    while True:
        with contextlib.suppress(OSError):
            cluster.cas_stats()
            return
        if proc.poll() is not None or time.monotonic() > deadline:
            raise BenchError(f"CAS server did not start: {tail(log)}")
        time.sleep(0.1)


@dataclass
class Hosts:
    """Fresh caches and daemons on the first ``n`` hosts, peers on or off."""

    cluster: Cluster
    n: int
    peers: bool
    caches: list[Path] = field(default_factory=list)
    procs: list[subprocess.Popen[Any]] = field(default_factory=list)

    def __enter__(self) -> Hosts:
        c = self.cluster
        peer_file = c.made.tmp / "peers"
        peer_file.write_text("".join(f"{h.client_ip}:{PEER_PORT}\n" for h in c.hosts[: self.n]))
        assert c.made.btrfs_mnt is not None
        for i, link in enumerate(c.hosts[: self.n]):
            cache = c.made.btrfs_mnt / f"cache-{i}-{time.monotonic_ns()}"
            c.made.caches.append(cache)
            c.lz.cache_init(cache)
            cmd = [str(c.lz.python), "-m", "lazycaf", "fetcher", "serve", "--cache", str(cache)]
            cmd += ["--cas", c.cas_url]
            if self.peers:
                cmd += ["--peer-listen", f"{link.client_ip}:{PEER_PORT}"]
                cmd += ["--peers", str(peer_file), "--peer-timeout", "10"]
            with open(c.made.log(f"fetcher-{i}.log"), "ab") as out:
                proc = link.popen(
                    cmd, share_mounts=True, stdin=subprocess.DEVNULL, stdout=out, stderr=out
                )
            self.caches.append(cache)
            self.procs.append(proc)
        deadline = time.monotonic() + 60
        for cache, proc in zip(self.caches, self.procs, strict=True):
            while not daemon_ready(cache):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise BenchError(f"daemon for {cache} did not start")
                time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        c = self.cluster
        for mnt in list(c.made.mounts):
            if is_mounted(mnt):
                subprocess.run([str(c.lz.exe), "umount", str(mnt)], capture_output=True)
            if is_mounted(mnt):
                subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
        for proc in self.procs:
            stop_process(proc, timeout=20)
        for cache in self.caches:
            forget_lock(CacheLayout(cache).index)
            run(["rm", "-rf", str(cache)], what="remove cache")
            c.made.caches.remove(cache)

    def stats(self) -> list[dict[str, float]]:
        return [self.cluster.lz.stats(cache) for cache in self.caches]


@dataclass
class Round:
    """One variant in one run."""

    variant: str
    hosts: int
    all_done_s: float
    per_host_s: list[float]
    cas_bytes: int = 0
    cas_blobs: int = 0
    from_peers: float = 0.0  # decoded bytes the daemons got from peers
    from_cas: float = 0.0  # ... and from the CAS
    cpu_s: float = 0.0  # CPU time the machine spent during the round


def run_all_at_once(
    cmds: list[tuple[netsim.Link | None, list[str]]], env: dict[str, str]
) -> list[float]:
    """Start every command at the same moment; each one's duration (wall clock)."""
    t0 = time.perf_counter()
    procs = []
    for link, cmd in cmds:
        full = cmd if link is None else link.argv(cmd, share_mounts=True)
        procs.append(
            subprocess.Popen(full, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        )
    done: dict[int, float] = {}
    deadline = t0 + HOST_TIMEOUT_S
    while len(done) < len(procs):
        for i, proc in enumerate(procs):
            if i not in done and proc.poll() is not None:
                done[i] = time.perf_counter() - t0
        if time.perf_counter() > deadline:
            for proc in procs:
                stop_process(proc)
            raise BenchError(f"hosts did not finish within {HOST_TIMEOUT_S:.0f} s")
        time.sleep(0.002)
    for proc in procs:
        assert proc.stderr is not None
        err = proc.stderr.read().decode(errors="replace").strip()
        proc.stderr.close()
        if proc.returncode != 0:
            raise BenchError(f"a host's start failed (exit {proc.returncode}): {err[-1500:]}")
    return [done[i] for i in range(len(procs))]


def lazy_round(cluster: Cluster, variant: str, n: int, profile_digest: str) -> Round:
    peers = variant == "peers on"
    with Hosts(cluster, n, peers) as hosts:
        http_put(f"{cluster.cas_url}/v1/refs/profiles/{PROFILE}", profile_digest.encode())
        cmds: list[tuple[netsim.Link | None, list[str]]] = []
        for i, (link, cache) in enumerate(zip(cluster.hosts, hosts.caches, strict=False)):
            mnt = cluster.made.mountpoint(f"mnt-{i}")
            script = (
                f'LAZYCAF_CACHE="{cache}" "{cluster.lz.exe}" mount {REF} "{mnt}" '
                f'--cas {cluster.cas_url} && "{mnt}/bin/python3" -c "{IMPORT_CODE}"'
            )
            cmds.append((link, ["sh", "-c", script]))
        drop_caches()
        before = cluster.cas_stats()
        env = {**os.environ, **python_env()}
        cpu0 = busy_seconds()
        times = run_all_at_once(cmds, env)
        cpu = busy_seconds() - cpu0
        after = cluster.cas_stats()
        stats = hosts.stats()
    return Round(
        variant,
        n,
        max(times),
        times,
        after["bytes_sent"] - before["bytes_sent"],
        after["blob_gets"] - before["blob_gets"],
        sum(s.get("bytes_from_peers", 0) for s in stats),
        sum(s.get("bytes_from_cas", 0) for s in stats),
        cpu,
    )


def native_round(sample: Path, variant: str, n: int) -> Round:
    cmd = [str(sample / "bin" / "python3"), "-c", IMPORT_CODE]
    drop_caches()
    cpu0 = busy_seconds()
    times = run_all_at_once([(None, cmd)] * n, python_env())
    return Round(variant, n, max(times), times, cpu_s=busy_seconds() - cpu0)


def record_profile(cluster: Cluster) -> tuple[str, list[str]]:
    with Hosts(cluster, 1, peers=False) as hosts:
        drop_caches()
        cmd = ["profile", "record", "--name", PROFILE, REF, "--cas", cluster.cas_url, "--"]
        cluster.lz.cli(
            *cmd,
            "{mnt}/bin/python3",
            "-c",
            IMPORT_CODE,
            cache=hosts.caches[0],
            what="profile record",
        )
    digest = http_get(f"{cluster.cas_url}/v1/refs/profiles/{PROFILE}").decode().strip()
    show = cluster.lz.cli("profile", "show", PROFILE, "--cas", cluster.cas_url, what="profile show")
    lines = [ln for ln in show.splitlines() if ln.startswith(("profile ", "hot set"))]
    return digest, lines


# -- report --------------------------------------------------------------------------------
def report(rounds: list[Round], facts: list[str], hosts: int) -> list[str]:
    by = {v: [r for r in rounds if r.variant == v] for v in VARIANTS}

    def m(v: str, key: str) -> float:
        return median([float(getattr(r, key)) for r in by[v]])

    single_t, single_b = m("single", "all_done_s"), m("single", "cas_bytes")
    lines = [*(f"- {fact}" for fact in facts), ""]
    lines.append(
        "| variant | hosts | all finished s | per host s | CPU s used | CAS sent | "
        "CAS sent / one host's | CAS blobs | from peers | time / single |"
    )
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for v in VARIANTS:
        rs = by[v]
        if not rs:
            continue
        lazy = not v.startswith("native")
        cas = m(v, "cas_bytes")
        cells = [
            v,
            str(rs[0].hosts),
            f"{m(v, 'all_done_s'):.2f}",
            f"{median([t for r in rs for t in r.per_host_s]):.2f}",
            f"{m(v, 'cpu_s'):.1f}",
            f"{cas / MB:.1f} MB" if lazy else "-",
            f"{cas / single_b:.2f}x" if lazy else "-",
            f"{m(v, 'cas_blobs'):.0f}" if lazy else "-",
            f"{m(v, 'from_peers') / MB:.1f} MB" if lazy else "-",
            f"{m(v, 'all_done_s') / single_t:.2f}x",
        ]
        lines.append(md_row(*cells))
    lines.append("")
    if by["peers on"] and by["single"]:
        egress = m("peers on", "cas_bytes") / single_b
        slow = m("peers on", "all_done_s") / single_t
        lines += [
            f"- target CAS egress with peers <= 1.2x one host's: {egress:.2f}x "
            f"({'met' if egress <= 1.2 else 'NOT met'}; peers off: "
            f"{m('peers off', 'cas_bytes') / single_b:.2f}x)",
            f"- target all {hosts} hosts with peers <= 1.5x a single host's cold start: "
            f"{slow:.2f}x ({'met' if slow <= 1.5 else 'NOT met'})",
        ]
    if by["native"] and by["native single"]:
        floor = m("native", "all_done_s") / m("native single", "all_done_s")
        lines.append(
            f"- CPU floor: {hosts} native imports at once take {floor:.2f}x one alone here "
            f"({os.cpu_count()} cores for {hosts} hosts)"
        )
    return lines


def figures(rounds: list[Round]) -> list[Figure]:
    """Per variant: time until all hosts finished and what the CAS sent, against ``single``."""
    by = {v: [r for r in rounds if r.variant == v] for v in VARIANTS}
    single_t = tuple(r.all_done_s for r in by["single"])
    single_b = tuple(float(r.cas_bytes) for r in by["single"])
    out = []
    for v, rs in by.items():
        if not rs:
            continue
        times = tuple(r.all_done_s for r in rs)
        ratio = median(times) / median(single_t) if single_t else None
        name = f"{v}: all {rs[0].hosts} host(s) finished"
        out.append(Figure(name, "s", times, "single", single_t, ratio, "this / single"))
        out.append(Figure(f"{v}: CPU time used", "s", tuple(r.cpu_s for r in rs)))
        if not v.startswith("native"):
            sent = tuple(float(r.cas_bytes) for r in rs)
            ratio = median(sent) / median(single_b) if single_b else None
            name = f"{v}: CAS sent"
            out.append(Figure(name, "bytes", sent, "single", single_b, ratio, "this / single"))
    return out


# -- main ----------------------------------------------------------------------------------
TITLE: Final = "Many hosts at once, peers on and off"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m scripts.bench_peers", description=(__doc__ or "").splitlines()[0]
    )
    ap.add_argument("--hosts", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rate-mbit", type=float, default=1000.0)
    ap.add_argument("--sample", type=Path, help="use this tree instead of building one")
    ap.add_argument("--tmpdir", type=Path, help="parent of the temp dir (default: system temp)")
    ap.add_argument("--lazycaf", type=Path, default=REPO / ".venv" / "bin" / "lazycaf")
    ap.add_argument(
        "--json",
        type=Path,
        default=default_json("bench_peers"),
        help="where to write the results (default results/bench_peers/results.json)",
    )
    args = ap.parse_args(argv)
    if not 1 <= args.hosts <= 60 or args.runs < 1:
        ap.error("--hosts must be 1..60 and --runs at least 1")
    if args.sample is not None and not (args.sample / "bin" / "python3").exists():
        ap.error(f"--sample {args.sample} has no bin/python3")
    return args


def bench(args: argparse.Namespace, record: Record, made: Made, lz: Lazycaf) -> None:
    facts = [f"links {args.rate_mbit:g} Mbit/s; {args.hosts} client hosts"]
    sample = sample_tree(args.sample, made.tmp)
    facts.append(f"sample: {du(sample) / MB:.1f} MB on disk; workload: import numpy")
    btrfs_image(made)
    with contextlib.ExitStack() as stack:
        cluster = build_cluster(stack, args, made, lz)
        lz.pack(sample, tag=REF)
        start_cas(cluster)
        say("recording the profile ...")
        digest, lines = record_profile(cluster)
        facts += lines
        rounds: list[Round] = []
        for i in range(args.runs):
            order = VARIANTS[i % len(VARIANTS) :] + VARIANTS[: i % len(VARIANTS)]
            for variant in order:
                say(f"run {i + 1}/{args.runs}: {variant} ...")
                n = 1 if variant in ("single", "native single") else args.hosts
                if variant.startswith("native"):
                    rounds.append(native_round(sample, variant, n))
                else:
                    rounds.append(lazy_round(cluster, variant, n, digest))
                r = rounds[-1]
                say(f"  all done {r.all_done_s:.2f} s, CAS sent {r.cas_bytes / MB:.1f} MB")
    record.facts = facts
    record.report = report(rounds, facts, args.hosts)
    record.figures = figures(rounds)
    record.data = {"rounds": [asdict(r) for r in rounds]}
    record.finish(args.json)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench_peers: error: needs root (netns, drop_caches, mounts)", file=sys.stderr)
        return 2
    exe = find_lazycaf(args.lazycaf)
    if exe is None:
        print(f"bench_peers: error: lazycaf not found at {args.lazycaf}", file=sys.stderr)
        return 2
    record = Record.begin("bench_peers", TITLE, argv, args)
    made = Made(Path(tempfile.mkdtemp(prefix="bench_peers-", dir=args.tmpdir)))
    made.netns_prefix = "lzc-p"
    lz = Lazycaf(exe, made.tmp / "cas")

    def clean() -> list[str]:
        say(f"cleaning up {made.tmp} ...")
        return cleanup(made, lz)

    def body() -> None:
        bench(args, record, made, lz)

    errors = (BenchError, RuntimeError, subprocess.CalledProcessError)
    return guarded_run("bench_peers", body, clean, errors=errors)


if __name__ == "__main__":
    sys.exit(main())
