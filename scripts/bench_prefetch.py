"""Benchmark cold starts from a lazycaf mount over a network-shaped link, side by side.

Prints figures and asserts nothing: the targets are read off the printed tables. Every figure
is a median over ``--runs`` runs taken in this one invocation; within a run the variants are
interleaved (their order rotates from run to run) so drift hits all of them.

Per network profile of ``scripts/netsim.py`` (default ``1gbit`` = 1 Gbit/s, ~1 ms RTT and
``100mbit`` = 100 Mbit/s, ~10 ms RTT), the client side is a network namespace behind a tbf
rate limit; the CAS server and the squashfs HTTP server run in the root namespace on
127.0.0.1 and are reached through netsim's delay-line proxy. Measured, for the workload
(``--workload``): ``python -c "import numpy"`` from the sample tree (python + numpy,
``build_sample.py``, built in the temp dir), or ``python -c "import torch"`` from
``build/sample-torch`` (python + torch 2.13.0 CPU + numpy, built there once when missing):

1. lazycaf cold, no profile: a fresh host cache and a fresh fetcher daemon started inside
   the namespace, ``sync`` + ``drop_caches``, then ``lazycaf mount --profile <unused name>
   --no-crowd`` (timed until it returns) and the python run (timed). The mount records into a
   throw-away profile name, so the benchmark's profile is not touched; it prefetches by the
   import graph (the modules the ``.pyc`` files it reads import) and by directory;
1a. lazycaf cold, no profile, no import graph: the same with ``--no-import-graph`` (directory
   prefetch alone: the code before the import graph, side by side);
1b. lazycaf cold, no own profile, crowd hot set: the same for ``sample-b:v1``, another
   executable (the sample's files plus one of its own) that never ran; the CAS holds the
   sample's profiles, whose hot set the mount borrows by file digest. Not recorded;
2. lazycaf cold, with profile: the same, without ``--no-prefetch``. The profile is recorded
   once beforehand (``lazycaf profile record`` on its own cold cache, over the first link);
   its ref is reset to that recording before every run, so each run sees the same profile
   (mounts merge their run into the profile on umount);
2b. lazycaf cold, with profile, cache compressed as written: the same as 2 with the daemon's
   cache compressing each blob as it is written (``LAZYCAF_DEFER_COMPRESSION=0``: Btrfs at
   writeback, in the window), where by default it writes them plain and compresses them once
   fetching has gone quiet;
2a. lazycaf cold, with profile, bundle parts as stored: the same profile with its hot-set
   bundle rewritten here in the older part form (the blobs as the store keeps them, one batch
   record each: ``lazycaf.cas.bundlepart``), against 2's parts compressed together;
3. lazycaf warm: the python run again in the same mounts (page cache warm), once the
   daemon's background fetching has settled. Diagnostics after each with-profile run: the
   same cache (every blob now local) is mounted again with the profile after ``drop_caches``
   and timed (mount, run: the local floor, no network; the daemon warms the cached hot set
   into the page cache), and mounted once more with the page cache warm;
4. native local disk: the sample tree itself, cold (``drop_caches``) and warm;
5. baseline: the whole tree as a squashfs image (``mksquashfs -comp zstd``, made once, not
   timed) served by a Python HTTP server: download it from inside the namespace with curl,
   ``squashfuse`` it, run python from it, all cold and timed together;
6. baseline: the whole tree as a tarball (``tar | zstd -T0 -3``, made once, not timed) served
   by the same server: ``curl | zstd -d | tar -x`` into a fresh directory on the same disk
   (inside the namespace), then run python from it, cold (``drop_caches`` first) and timed
   together.

Where the CPU goes, per lazycaf cold start (mount + run, the timed window): utime + stime of
the fetcher daemon (its mount zygote apart), the mount process (plus the zygote's share and
the ``lazycaf mount`` client), the CAS server, the delay-line relay in front of it, and the
workload's python, each process with its live descendants and reaped children, read from
``/proc`` before and after the window; the daemon's and the CAS server's are also given per
blob the daemon fetched in the window; and the whole machine's busy time in the window
(``/proc/stat``: kernel threads too, such as the writeback that compresses what the daemon
wrote into the Btrfs cache). Per-opcode FUSE request counts come from the mount's
log (the mount logs them on its way out): over the first mount's life (the cold run and the
warm runs) and, with a profile, of the remount from the full cache (one cold run alone).
With ``--workload torch`` a table also sets the figures against issue 17's ratio targets
(cold with profile <= 0.5x / 0.25x the image at 1 / 100 Mbit/s, no profile <= 1.0x, crowd
<= 0.7x, full cache <= 1.2x native cold, warm <= 1.1x native warm, CPU per blob <= 0.5 /
0.3 ms for daemon / CAS server).

A reference section repeats 1-3 with the daemon in the root namespace and the CAS on
127.0.0.1 without proxy (no shaping, no delay: what fetching costs without the network).
Per-run notes give the daemon's statistics (fetches, misses, wait) and what the mount's saved
trace says (time blocked on fetches; first reads served from cache, prefetch or fetch).

"Bytes over the link" for lazycaf is what the CAS server sent during the timed window
(``GET /v1/stats`` bytes_sent: zstd frames as stored), with the daemon's decoded
``bytes_fetched`` in parentheses; for the baseline, the image size.

The host caches live on a fresh Btrfs loop image (``mount -o loop,compress=zstd``). Needs
root. Everything made here -- mounts, daemons, servers, namespaces, the loop image, temp
dirs -- is removed in ``finally`` blocks, also on Ctrl-C and SIGTERM.

Usage: python -m scripts.bench_prefetch [--quick] [--runs N] [--profiles 1gbit,100mbit]
       [--no-loopback] [--workload numpy|torch] [--sample DIR] [--tmpdir DIR] [--json PATH]

``--quick`` is the short run for before/after checks: 3 runs, the ``1gbit`` link only, no
loopback reference (explicit options still win). Writes
``results/bench_prefetch/results.json`` (``--json PATH``: there instead), from which
``python -m scripts.render_benchmarks`` writes ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from lazycaf.cas.casdir import CasDir
from lazycaf.core.digest import Digest
from lazycaf.host.indexlock import forget_lock
from lazycaf.host.paths import CacheLayout
from lazycaf.mount.root import mount_pid
from scripts import netsim
from scripts.harness import (
    REPO,
    BenchError,
    Figure,
    Lazycaf,
    Made,
    Record,
    btrfs_image,
    build_sample,
    busy_seconds,
    cleanup,
    cleanup_mounts,
    default_json,
    drop_caches,
    du,
    find_lazycaf,
    fs_of,
    guarded_run,
    http_get,
    http_put,
    is_mounted,
    md_row,
    median,
    packages,
    progress,
    run,
    sample_tree,
    stop_process,
    time_python,
    timed,
    wait_daemon_ready,
    wait_for_line,
)
from scripts.plainparts import profile_as_stored

REF: Final = "sample:v1"
#: Another executable: the sample plus one file of its own, never run before (crowd variant).
REF_B: Final = "sample-b:v1"
PROFILE: Final = "sample"
SCRATCH_PROFILE: Final = "bench-no-profile"  # prefix of the unused profile names of those runs
IMAGE_SIZE: Final = "4G"
PROFILE_TARGET_S: Final = {"1gbit": 0.35, "100mbit": 2.0}
NO_PROFILE_FACTOR: Final = 2.0
SQUASHFS_QUOTED_S: Final = {"1gbit": 1.1, "100mbit": 9.0}
NATIVE_COLD_QUOTED_S: Final = 0.15
WARM_PER_MOUNT: Final = 2
CMD_TIMEOUT_S: Final = 300.0
SETTLE_TIMEOUT_S: Final = 120.0
IMPORT_CODE: Final = "import numpy"
TAR_ZSTD_LEVEL: Final = 3  # zstd's default: what `tar --zstd` and image layers use
FUSE_LOG_PREFIX: Final = "FUSE requests by opcode: "
MB: Final = 1e6
NAN: Final = float("nan")
# the steps of a run (``--variants`` picks some): lazycaf's variants, then the references
STEPS: Final = ("noprof", "noimp", "crowd", "prof", "plain", "atwrite", "native", "squash", "tar")
QUICK: Final[dict[str, Any]] = {"runs": 3, "profiles": "1gbit", "no_loopback": True}
TITLE: Final = "Cold start over a shaped link"


@dataclass(frozen=True)
class Workload:
    """What runs cold: the import code, and the sample tree it runs from."""

    name: str
    code: str
    packages: tuple[str, ...]  # build_sample.py --packages (empty: its default, numpy)
    sample: Path | None  # kept built here (None: built in the run's temp dir)
    image_size: str  # the Btrfs loop image of the host caches


WORKLOADS: Final = {
    "numpy": Workload("numpy", IMPORT_CODE, (), None, IMAGE_SIZE),
    # torch==2.13.0 exactly: the CPU build on local disk (any other spec may pull CUDA)
    "torch": Workload(
        "torch", "import torch", ("torch==2.13.0", "numpy"), REPO / "build" / "sample-torch", "8G"
    ),
}
# Issue 17 item 1, the big workload: lazycaf's medians against the whole-image download's
# (squashfs), the full host cache against native cold, warm against native warm.
RATIO_TARGETS: Final = {
    "profile": {"1gbit": 0.5, "100mbit": 0.25},
    "noprof": 1.0,
    "crowd": 0.7,
    "cached": 1.2,
    "warm": 1.1,
}
CPU_PER_BLOB_TARGET_MS: Final = {"daemon": 0.5, "cas": 0.3}

_HTTP_SERVER: Final = r"""
import functools, http.server, sys
class Handler(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    def log_message(self, *args):
        pass
    def copyfile(self, source, outputfile):
        self.wfile.flush()
        self.connection.sendfile(source)
handler = functools.partial(Handler, directory=sys.argv[1])
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
print(f"serving on http://127.0.0.1:{server.server_address[1]}", flush=True)
server.serve_forever()
"""


say = progress("bench_prefetch")


# -- the pieces of one measurement ---------------------------------------------------------
@dataclass
class Env:
    """What every measurement needs: tools, servers, the tree."""

    lz: Lazycaf
    made: Made
    sample: Path
    cas_port: int
    http_port: int
    image: Path  # the squashfs image, served by the HTTP server as /<name>
    profile_digest: str = ""
    plain_profile_digest: str = ""  # the same profile, its bundle's parts as stored (2a)
    code: str = IMPORT_CODE  # the workload: python -c CODE
    workload: str = "numpy"
    tarball: Path | None = None  # the tar.zst of the tree, served beside the image
    cas_pid: int = 0  # the CAS server's process (its CPU time is measured)

    def cas_bytes_sent(self) -> int:
        stats = json.loads(http_get(f"http://127.0.0.1:{self.cas_port}/v1/stats"))
        return int(stats["bytes_sent"])

    def new_cache(self, name: str) -> Path:
        assert self.made.btrfs_mnt is not None
        cache = self.made.btrfs_mnt / name
        self.made.caches.append(cache)
        out = self.lz.cli("cache", "init", str(cache), what="cache init")
        if "compression on" not in out:
            raise BenchError(f"cache init {cache} did not turn compression on: {out.strip()}")
        return cache

    def drop_cache_dir(self, cache: Path) -> None:
        forget_lock(CacheLayout(cache).index)
        shutil.rmtree(cache, ignore_errors=True)
        self.made.caches.remove(cache)


@dataclass
class Net:
    """Where the fetcher daemon runs and how it reaches the CAS: a shaped link or loopback."""

    name: str
    cas_url: str
    link: netsim.Link | None = None  # None: root namespace, CAS on 127.0.0.1 directly
    rate_mbit: float = 0.0
    rtt_s: float = 0.0  # measured: a tiny GET on a kept-alive connection
    relay_pid: int = 0  # the delay-line proxy in front of the CAS (0: none)

    def popen(self, cmd: list[str], **kw: Any) -> subprocess.Popen[Any]:
        if self.link is None:
            return subprocess.Popen(cmd, **kw)
        return self.link.popen(cmd, share_mounts=True, **kw)  # its FUSE mounts stay visible


@contextlib.contextmanager
def daemon_in(
    net: Net, env: Env, cache: Path, extra_env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[Any]]:
    """A fresh fetcher daemon for ``cache`` on ``net`` (yielded: its process, the daemon
    itself since ``nsenter`` execs), ``extra_env`` in its environment; stopped and its cache
    removed after."""
    log = env.made.log(f"fetcher-{cache.name}.log")
    cmd = [str(env.lz.python), "-m", "lazycaf", "fetcher", "serve", "--cache", str(cache)]
    with open(log, "ab") as out:
        proc = net.popen(
            [*cmd, "--cas", net.cas_url],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            cwd=str(REPO),
            env={**os.environ, **(extra_env or {})},
        )
    try:
        wait_daemon_ready(proc, cache, log)
        yield proc
    finally:
        try:
            cleanup_mounts(env.made, env.lz)  # a mount must not outlive its daemon
            env.lz.fetcher_stop(cache)
        finally:
            stop_process(proc)
            env.drop_cache_dir(cache)


# -- CPU time and FUSE requests -------------------------------------------------------------
ProcTable = dict[int, tuple[int, int, int]]  # pid -> (ppid, own ticks, reaped children's ticks)


def parse_stat(text: str) -> tuple[int, int, int]:
    """(ppid, utime + stime, cutime + cstime) in clock ticks, from ``/proc/PID/stat``
    (fields 4, 14-17; the command name, field 2, may hold spaces and parentheses)."""
    fields = text.rpartition(")")[2].split()
    return int(fields[1]), int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14])


def proc_table() -> ProcTable:
    """Every live process's ``parse_stat``."""
    table: ProcTable = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                table[int(entry.name)] = parse_stat(Path(entry.path, "stat").read_text())
    return table


def tree_ticks(table: ProcTable, root: int, skip: frozenset[int] = frozenset()) -> int:
    """CPU ticks of ``root`` and its live descendants, each with its reaped children's,
    leaving out the subtrees of ``skip``; 0 when ``root`` is gone."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        if pid in skip or pid not in table:
            continue
        total += table[pid][1] + table[pid][2]
        todo += children.get(pid, [])
    return total


def children_matching(parent: int, needle: str) -> list[int]:
    """Live children of ``parent`` whose command line (NULs as spaces) holds ``needle``."""
    found = []
    for pid, (ppid, _, _) in proc_table().items():
        if ppid != parent:
            continue
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            if needle in cmdline:
                found.append(pid)
    return found


def children_cpu_s() -> float:
    """CPU seconds of this process's reaped children so far (the commands it ran)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


@dataclass(frozen=True)
class CpuProbe:
    """The processes a cold start's CPU time is read from: the daemon (its zygote apart),
    the zygote, the CAS server, the relay in front of it (0: none)."""

    daemon: int
    zygote: frozenset[int]
    cas: int
    relay: int

    def ticks(self) -> dict[str, int]:
        table = proc_table()
        out = {
            "daemon": tree_ticks(table, self.daemon, self.zygote),
            "zygote": sum(tree_ticks(table, z) for z in self.zygote),
            "cas": tree_ticks(table, self.cas),
        }
        if self.relay:
            out["relay"] = tree_ticks(table, self.relay)
        return out


def cpu_seconds(before: dict[str, int], after: dict[str, int]) -> dict[str, float]:
    """Seconds of CPU each role used between two ``CpuProbe.ticks``."""
    hz = os.sysconf("SC_CLK_TCK")
    return {k: (after[k] - before.get(k, 0)) / hz for k in after}


def fuse_requests(log_text: str) -> dict[str, int] | None:
    """The last ``FUSE requests by opcode: {json}`` line of a mount's log, or None."""
    found = None
    for line in log_text.splitlines():
        _, sep, rest = line.partition(FUSE_LOG_PREFIX)
        if sep:
            with contextlib.suppress(ValueError):
                counts = json.loads(rest)
                if isinstance(counts, dict):
                    found = {str(k): int(v) for k, v in counts.items()}
    return found


def mount_log(cache: Path, mnt: Path) -> Path:
    """The log a background ``lazycaf mount`` of ``mnt`` appends to under ``cache``."""
    return cache / "logs" / f"mount{os.path.abspath(mnt).replace('/', '_')}.log"


def log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def read_fuse_requests(log: Path, offset: int, timeout: float = 10.0) -> dict[str, int]:
    """The FUSE request counts a mount logged on its way out, in ``log`` past ``offset``
    (its size before that mount); waits for the line up to ``timeout`` (the process may
    still be exiting); {} when none came."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), open(log, "rb") as f:
            f.seek(offset)
            counts = fuse_requests(f.read().decode(errors="replace"))
            if counts is not None:
                return counts
        if time.monotonic() > deadline:
            say(f"WARNING: no FUSE request counts in {log}")
            return {}
        time.sleep(0.1)


def wait_settled(lz: Lazycaf, cache: Path) -> dict[str, float]:
    """Daemon stats once background fetching (prefetch, eager mode) has stopped."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    last: dict[str, float] = {}
    while time.monotonic() < deadline:
        now = lz.stats(cache)
        quiet = now.get("prefetch_queued", 0) == 0
        if quiet and last and now.get("fetches") == last.get("fetches"):
            return now
        last = now
        time.sleep(0.5)
    say(f"background fetching into {cache} did not settle within {SETTLE_TIMEOUT_S:.0f} s")
    return last


def trace_summary(lz: Lazycaf, name: str) -> str:
    """What the run just saved says: time blocked on fetches, where first reads came from."""
    out = lz.cli("profile", "show", name, "--cas", str(lz.cas), what=f"profile show {name}")
    blocked = served = ""
    for line in out.splitlines():
        if line.startswith("blocked on fetches:"):
            blocked = line.partition(":")[2].split(",")[-1].split("(")[0].strip()
        elif line.startswith("newest run, first reads served from:"):
            served = line.partition(":")[2].strip()
    return f"trace: blocked {blocked or '?'}, first reads from {served or '?'}"


@dataclass
class LazyRun:
    mount: float
    run: float
    wire: int  # bytes the CAS sent during mount + run
    stats: dict[str, float]  # daemon stats right after the run
    settled: dict[str, float]  # ... once background fetching stopped
    warm: list[float]
    warm_wire: int  # bytes the CAS sent during the warm runs
    trace: str
    # Diagnostic, blobs all in the host cache: (mount, run) after drop_caches, then a remount
    # with the page cache warm (mount only).
    cached: tuple[float, float, float] | None = None
    # CPU seconds in the timed window (mount + run): daemon, zygote, mount_process,
    # mount_cli, cas, relay, workload
    cpu: dict[str, float] = field(default_factory=dict)
    fuse: dict[str, int] = field(default_factory=dict)  # FUSE requests: the first mount's life
    cached_fuse: dict[str, int] = field(default_factory=dict)  # ... of the full-cache remount

    @property
    def total(self) -> float:
        return self.mount + self.run

    @property
    def blobs(self) -> float:
        """Blobs the daemon fetched in the timed window."""
        return self.stats.get("fetches", 0.0)

    @property
    def mount_cpu(self) -> float:
        """The mount side's CPU: the mount process, the zygote's share, the CLI client."""
        return sum(self.cpu.get(k, 0.0) for k in ("mount_process", "zygote", "mount_cli"))

    def cpu_per_blob_ms(self, role: str) -> float:
        return 1000 * self.cpu[role] / self.blobs if self.blobs and role in self.cpu else NAN


def lazycaf_cold(
    net: Net,
    env: Env,
    *,
    profile: bool,
    tag: str,
    again: bool,
    crowd: bool = False,
    import_graph: bool = True,
    plain_parts: bool = False,
    compress_at_write: bool = False,
) -> LazyRun:
    """One cold start from a fresh cache and daemon, then warm runs in the same mount;
    ``again``: unmount, drop caches, and time a cold start from the now full host cache.
    ``crowd`` (with ``profile`` False): mount ``REF_B``, an executable with no profile of its
    own, so only the crowd hot set (the sample's profiles, by digest) prefetches; its runs are
    not recorded (a second crowd run must not learn from the first). ``import_graph``
    False: without the import-graph prefetch (the code before it, for comparison).
    ``plain_parts`` (with ``profile``): the profile whose bundle's parts are as stored.
    ``compress_at_write``: the daemon's cache compresses blobs as it writes them (Btrfs at
    writeback), not once fetching is quiet (``LAZYCAF_DEFER_COMPRESSION=0``)."""
    cache = env.new_cache(f"cache-{tag}")
    mnt = env.made.mountpoint("mnt-lazycaf")
    # no profile: a profile name no run has recorded, so the mount fetches on demand plus
    # directory prefetch (its only parallelism without a profile, the crowd's hot set off);
    # it records into that name
    scratch_name = f"{SCRATCH_PROFILE}-{tag}-{time.monotonic_ns()}"
    scratch = ["--profile", scratch_name] + (["--no-record"] if crowd else ["--no-crowd"])
    scratch += [] if import_graph else ["--no-import-graph"]
    ref = REF_B if crowd else REF
    log = mount_log(cache, mnt)
    extra = {"LAZYCAF_DEFER_COMPRESSION": "0"} if compress_at_write else None
    with daemon_in(net, env, cache, extra) as daemon:
        if profile:  # every run starts from the profile recorded beforehand
            url = f"http://127.0.0.1:{env.cas_port}/v1/refs/profiles/{PROFILE}"
            digest = env.plain_profile_digest if plain_parts else env.profile_digest
            http_put(url, digest.encode())
        zygote = frozenset(children_matching(daemon.pid, "zygote"))  # "lazycaf zygote SOCK"
        if not zygote:
            say("WARNING: the daemon's mount zygote not found: its CPU counts as the daemon's")
        probe = CpuProbe(daemon.pid, zygote, env.cas_pid, net.relay_pid)
        drop_caches()
        offset = log_size(log)
        wire0 = env.cas_bytes_sent()
        ticks0, cli0, busy0 = probe.ticks(), children_cpu_s(), busy_seconds()
        t_mount = env.lz.mount(ref, mnt, cache, *([] if profile else scratch))
        cli1 = children_cpu_s()
        t_run = time_python(mnt, env.code)
        cpu = cpu_seconds(ticks0, probe.ticks())
        cpu["machine"] = busy_seconds() - busy0  # every process and kernel thread
        cpu["workload"] = children_cpu_s() - cli1
        cpu["mount_cli"] = cli1 - cli0
        pid = mount_pid(mnt)
        table = proc_table()
        # forked in the window: all its CPU time is the window's
        cpu["mount_process"] = tree_ticks(table, pid) / os.sysconf("SC_CLK_TCK") if pid else NAN
        wire = env.cas_bytes_sent() - wire0
        stats = env.lz.stats(cache)
        settled = wait_settled(env.lz, cache)
        wire0 = env.cas_bytes_sent()
        warm = [time_python(mnt, env.code) for _ in range(WARM_PER_MOUNT)]
        warm_wire = env.cas_bytes_sent() - wire0
        env.lz.umount(mnt)  # saves the run's trace
        fuse = read_fuse_requests(log, offset)
        trace = (
            "not recorded" if crowd else trace_summary(env.lz, PROFILE if profile else scratch_name)
        )
        cached, cached_fuse = None, {}
        if again:  # the host runs the job again later: the profile warms the page cache
            drop_caches()
            offset = log_size(log)
            t_cached_mount = env.lz.mount(REF, mnt, cache, *([] if profile else scratch))
            t_cached_run = time_python(mnt, env.code)
            env.lz.umount(mnt)
            cached_fuse = read_fuse_requests(log, offset)
            cached = (t_cached_mount, t_cached_run, env.lz.mount(REF, mnt, cache, *scratch))
            env.lz.umount(mnt)
    return LazyRun(
        t_mount,
        t_run,
        wire,
        stats,
        settled,
        warm,
        warm_wire,
        trace,
        cached,
        cpu=cpu,
        fuse=fuse,
        cached_fuse=cached_fuse,
    )


@dataclass
class SquashRun:
    download: float
    mount: float
    run: float

    @property
    def total(self) -> float:
        return self.download + self.mount + self.run


def squashfs_cold(link: netsim.Link, env: Env, url: str) -> SquashRun:
    dst = env.made.tmp / "download" / env.image.name
    dst.parent.mkdir(exist_ok=True)
    dst.unlink(missing_ok=True)
    mnt = env.made.mountpoint("mnt-squashfs")
    drop_caches()
    t0 = time.perf_counter()
    link.run(
        ["curl", "-sS", "--fail", "-o", str(dst), url],
        share_mounts=True,
        check=True,
        capture_output=True,
        timeout=CMD_TIMEOUT_S,
    )
    t1 = time.perf_counter()
    try:
        run(["squashfuse", str(dst), str(mnt)], what="squashfuse")
        t2 = time.perf_counter()
        t_run = time_python(mnt, env.code)
    finally:
        if is_mounted(mnt):
            run(["umount", str(mnt)], what=f"umount {mnt}")
    if dst.stat().st_size != env.image.stat().st_size:
        raise BenchError(f"downloaded {dst.stat().st_size} bytes of {env.image}")
    return SquashRun(t1 - t0, t2 - t1, t_run)


@dataclass
class TarRun:
    fetch: float  # download, decompress and extract, streamed
    run: float

    @property
    def total(self) -> float:
        return self.fetch + self.run


def tar_pack_cmd(tree: Path, out: Path, level: int = TAR_ZSTD_LEVEL) -> list[str]:
    """The whole of ``tree`` as a zstd-compressed tarball at ``out`` (both cores)."""
    tar = shlex.join(["tar", "-C", str(tree), "-cf", "-", "."])
    zstd = shlex.join(["zstd", "-q", "-T0", f"-{level}", "-f", "-o", str(out)])
    return ["bash", "-o", "pipefail", "-c", f"{tar} | {zstd}"]


def tar_fetch_cmd(url: str, dst: Path) -> list[str]:
    """Download ``url`` (a tar.zst) streamed into ``zstd -d | tar -x`` into ``dst``; fails
    if any of the three does."""
    curl = shlex.join(["curl", "-sS", "--fail", url])
    untar = shlex.join(["tar", "-x", "-C", str(dst), "-f", "-"])
    return ["bash", "-o", "pipefail", "-c", f"{curl} | zstd -d -q | {untar}"]


def tarball_cold(link: netsim.Link, env: Env, url: str) -> TarRun:
    """The tarball baseline: drop caches, then download + extract into a fresh directory
    on the same disk as the squashfs download, then the workload from it; removed after."""
    dst = env.made.tmp / "download" / "untar"
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    try:
        drop_caches()
        t0 = time.perf_counter()
        link.run(
            tar_fetch_cmd(url, dst),
            share_mounts=True,
            check=True,
            capture_output=True,
            timeout=CMD_TIMEOUT_S,
        )
        t1 = time.perf_counter()
        if not (dst / "bin" / "python3").exists():
            raise BenchError(f"the tarball from {url} has no bin/python3")
        t_run = time_python(dst, env.code)
    finally:
        shutil.rmtree(dst, ignore_errors=True)
    return TarRun(t1 - t0, t_run)


def measure_rtt(link: netsim.Link, url: str, n: int = 20) -> float:
    """Median time of a tiny GET on a kept-alive connection through the proxy (seconds)."""
    args = [a for _ in range(n) for a in (url, "-o", "/dev/null")]
    out = link.run(
        ["curl", "-sS", "--fail", "-w", "%{time_total}\n", *args],
        share_mounts=True,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    return median([float(x) for x in out[1:]])  # the first one also connects


def record_profile(net: Net, env: Env) -> list[str]:
    """Record the profile once on its own cold cache; keep its digest; describe it."""
    cache = env.new_cache("cache-record")
    with daemon_in(net, env, cache):
        drop_caches()
        t0 = time.perf_counter()
        cmd = ["profile", "record", "--name", PROFILE, REF, "--"]
        env.lz.cli(*cmd, "{mnt}/bin/python3", "-c", env.code, cache=cache, what="profile record")
        secs = time.perf_counter() - t0
    url = f"http://127.0.0.1:{env.cas_port}/v1/refs/profiles/{PROFILE}"
    env.profile_digest = http_get(url).decode().strip()
    show = env.lz.cli("profile", "show", PROFILE, "--cas", str(env.lz.cas), what="profile show")
    wanted = ("profile ", "hot set", "hot-set bundle", "blocked")
    lines = [ln for ln in show.splitlines() if ln.startswith(wanted)]
    first = f"profile recorded over the {net.name} link in {secs:.2f} s (cold, mount to umount)"
    env.plain_profile_digest, plain = plain_parts_profile(env.lz.cas, env.profile_digest)
    return [first, *lines, plain]


def plain_parts_profile(cas_dir: Path, profile_hex: str) -> tuple[str, str]:
    """Store a copy of the profile whose bundle's parts are in the older form (a plain batch
    of the blobs as the store keeps them); its digest, and a line saying both sizes."""
    try:
        digest, before, after = profile_as_stored(CasDir(cas_dir), Digest.parse(profile_hex))
    except ValueError as exc:
        raise BenchError(str(exc)) from None
    line = (
        f"bundle parts: {fmt_mb(before.size)} compressed together, "
        f"{fmt_mb(after.size)} as stored (variant 2a)"
    )
    return digest.hex, line


# -- one network profile -------------------------------------------------------------------
@dataclass
class ProfileResult:
    net: Net
    rtt_ms: float = 0.0  # nominal
    noprof: list[LazyRun] = field(default_factory=list)
    noimp: list[LazyRun] = field(default_factory=list)  # no profile, no import graph
    crowd: list[LazyRun] = field(default_factory=list)
    prof: list[LazyRun] = field(default_factory=list)
    plain: list[LazyRun] = field(default_factory=list)  # profile, bundle parts as stored
    atwrite: list[LazyRun] = field(default_factory=list)  # profile, compressed as written
    native_cold: list[float] = field(default_factory=list)
    native_warm: list[float] = field(default_factory=list)
    squash: list[SquashRun] = field(default_factory=list)
    tar: list[TarRun] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    workload: str = "numpy"

    @property
    def name(self) -> str:
        return self.net.name


def bench_shaped(
    env: Env, name: str, runs: int, *, record: bool, variants: frozenset[str] = frozenset()
) -> ProfileResult:
    rate, rtt = netsim.PROFILES[name]
    with netsim.shaped_link(f"bp{os.getpid() % 100000}", rate_mbit=rate, rtt_ms=rtt) as link:
        try:
            cas_ip, cas_pport = link.proxy("127.0.0.1", env.cas_port)
            relays = children_matching(os.getpid(), f"--target-port {env.cas_port} ")
            http_ip, http_pport = link.proxy("127.0.0.1", env.http_port)
            net = Net(name, f"http://{cas_ip}:{cas_pport}", link, rate)
            net.relay_pid = relays[0] if len(relays) == 1 else 0
            if not net.relay_pid:
                say(f"WARNING: the CAS relay process not found ({relays}): its CPU not measured")
            res = ProfileResult(net, rtt, workload=env.workload)
            net.rtt_s = measure_rtt(link, f"http://{http_ip}:{http_pport}/tiny")
            say(f"{name}: tiny GET through the proxy {net.rtt_s * 1000:.2f} ms")
            if record:
                res.notes += record_profile(net, env)
            base = f"http://{http_ip}:{http_pport}"
            image_url = f"{base}/{env.image.name}"
            tar_url = f"{base}/{env.tarball.name}" if env.tarball else None
            for i in range(runs):
                run_once(env, res, i, squash_url=image_url, tar_url=tar_url, only=variants)
        finally:
            for warning in cleanup_mounts(env.made, env.lz):
                say(f"WARNING: {warning}")
    return res


def bench_loopback(env: Env, runs: int, variants: frozenset[str] = frozenset()) -> ProfileResult:
    """The same lazycaf cold starts with the daemon on the CAS's host: no shaping, no delay."""
    res = ProfileResult(Net("loopback", f"http://127.0.0.1:{env.cas_port}"), workload=env.workload)
    for i in range(runs):
        run_once(env, res, i, squash_url=None, only=variants)
    return res


def run_once(
    env: Env,
    res: ProfileResult,
    i: int,
    *,
    squash_url: str | None,
    tar_url: str | None = None,
    only: frozenset[str] = frozenset(),
) -> None:
    """One run of every variant (of ``only``'s, if any: ``STEPS``' names), in an order that
    rotates with ``i``."""
    name, net = res.name, res.net

    def lazy(kind: str, what: str, **options: Any) -> Callable[[], None]:
        """The step of one lazycaf variant: its runs go to ``res.<kind>``."""

        def step() -> None:
            r = lazycaf_cold(net, env, tag=f"{name}-{kind}-{i}", **options)
            getattr(res, kind).append(r)
            say(f"{name} run {i}: {what}: mount {r.mount:.3f} s, run {r.run:.3f} s")

        return step

    noprof = lazy("noprof", "no profile", profile=False, again=False)
    noimp = lazy(
        "noimp", "no profile, no import graph", profile=False, again=False, import_graph=False
    )
    crowd = lazy("crowd", "no own profile, crowd", profile=False, again=False, crowd=True)
    prof = lazy("prof", "profile", profile=True, again=True)
    plain = lazy(
        "plain", "profile, bundle parts as stored", profile=True, again=False, plain_parts=True
    )
    atwrite = lazy(
        "atwrite",
        "profile, cache compressed as written",
        profile=True,
        again=False,
        compress_at_write=True,
    )

    def native() -> None:
        drop_caches()
        res.native_cold.append(time_python(env.sample, env.code))
        res.native_warm += [time_python(env.sample, env.code) for _ in range(WARM_PER_MOUNT)]
        say(f"{name} run {i}: native cold {res.native_cold[-1]:.3f} s")

    def squash() -> None:
        assert net.link is not None and squash_url is not None
        r = squashfs_cold(net.link, env, squash_url)
        res.squash.append(r)
        say(f"{name} run {i}: squashfs download {r.download:.3f} s, total {r.total:.3f} s")

    def tar() -> None:
        assert net.link is not None and tar_url is not None
        r = tarball_cold(net.link, env, tar_url)
        res.tar.append(r)
        say(f"{name} run {i}: tarball download+extract {r.fetch:.3f} s, total {r.total:.3f} s")

    named = {"noprof": noprof, "noimp": noimp, "crowd": crowd, "prof": prof, "plain": plain}
    named["atwrite"] = atwrite
    named |= {"native": native, "squash": squash} if squash_url else {}
    named |= {"tar": tar} if tar_url else {}
    assert set(named) <= set(STEPS)
    steps = [step for key, step in named.items() if not only or key in only]
    k = i % len(steps)
    for step in steps[k:] + steps[:k]:
        step()


# -- report --------------------------------------------------------------------------------
def fmt_s(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def fmt_mb(x: float) -> str:
    return f"{x / MB:.1f} MB"


def table(res: ProfileResult, image_bytes: int, tar_bytes: int = 0) -> list[str]:
    numpy = res.workload == "numpy"  # the absolute targets and quoted figures are numpy's
    target = PROFILE_TARGET_S.get(res.name) if numpy else None

    def lazy_row(name: str, rs: list[LazyRun], limit: float | None, what: str) -> str:
        wire = median([r.wire for r in rs])
        decoded = median([r.stats.get("bytes_fetched", 0) for r in rs])
        totals = [r.total for r in rs]
        ok = "-" if limit is None else "yes" if median(totals) <= limit else "**NO**"
        return md_row(
            name,
            fmt_s(median([r.mount for r in rs])),
            fmt_s(median([r.run for r in rs])),
            fmt_s(median(totals)),
            f"{fmt_mb(wire)} ({fmt_mb(decoded)} decoded)",
            "-" if limit is None else f"<= {limit:g} s{what}",
            ok,
        )

    loose = None if target is None else target * NO_PROFILE_FACTOR
    warm = [w for r in res.noprof + res.crowd + res.prof for w in r.warm]
    warm_wire = fmt_mb(median([r.warm_wire for r in res.noprof + res.crowd + res.prof]))
    cached = [r.cached for r in res.prof if r.cached is not None]
    rows = [
        "| variant | mount s | run s | total s | bytes over the link | target | meets? |",
        "|---|---:|---:|---:|---:|---|---|",
        lazy_row("lazycaf cold, no profile", res.noprof, loose, " (2x the profile target)"),
        lazy_row("lazycaf cold, no profile, no import graph", res.noimp, None, ""),
        lazy_row("lazycaf cold, no own profile, crowd hot set", res.crowd, None, ""),
        lazy_row("lazycaf cold, with profile", res.prof, target, ""),
        lazy_row("lazycaf cold, with profile, bundle parts as stored", res.plain, None, ""),
        lazy_row("lazycaf cold, with profile, cache compressed as written", res.atwrite, None, ""),
        md_row("lazycaf warm (same mounts)", "-", *[fmt_s(median(warm))] * 2, warm_wire, "-", "-"),
    ]
    if cached:
        c_mount, c_run = median([c[0] for c in cached]), median([c[1] for c in cached])
        c_total = median([c[0] + c[1] for c in cached])
        name = "(diagnostic) lazycaf cold, blobs in host cache, caches dropped, profile"
        rows.append(md_row(name, fmt_s(c_mount), fmt_s(c_run), fmt_s(c_total), "0", "-", "-"))
        c_warm = fmt_s(median([c[2] for c in cached]))
        name = "(diagnostic) lazycaf mount alone, page cache warm, blobs cached"
        rows.append(md_row(name, c_warm, "-", c_warm, "0", "-", "-"))
    if res.native_cold:
        nc, nw = fmt_s(median(res.native_cold)), fmt_s(median(res.native_warm))
        quoted = f"~{NATIVE_COLD_QUOTED_S:g} s (issue)" if numpy else "-"
        rows.append(md_row("native disk, cold", "-", nc, nc, "-", quoted, "-"))
        rows.append(md_row("native disk, warm", "-", nw, nw, "-", "-", "-"))
    if res.squash:
        sq = res.squash
        quoted = f"~{SQUASHFS_QUOTED_S[res.name]:g} s (issue, reference)" if numpy else "-"
        rows.append(
            md_row(
                "squashfs download+mount+run",
                fmt_s(median([r.download + r.mount for r in sq])),
                fmt_s(median([r.run for r in sq])),
                fmt_s(median([r.total for r in sq])),
                fmt_mb(image_bytes),
                quoted,
                "-",
            )
        )
    if res.tar:
        rows.append(
            md_row(
                "tarball download+extract+run",
                fmt_s(median([r.fetch for r in res.tar])),
                fmt_s(median([r.run for r in res.tar])),
                fmt_s(median([r.total for r in res.tar])),
                fmt_mb(tar_bytes),
                "-",
                "-",
            )
        )
    return rows


def lazy_variants(res: ProfileResult) -> list[tuple[str, list[LazyRun]]]:
    return [
        ("no profile", res.noprof),
        ("no profile, no import graph", res.noimp),
        ("no own profile, crowd", res.crowd),
        ("with profile", res.prof),
        ("with profile, bundle parts as stored", res.plain),
        ("with profile, cache compressed as written", res.atwrite),
    ]


def cpu_table(res: ProfileResult) -> list[str]:
    """Where the CPU went in the cold starts' timed window (mount + run), medians; "machine":
    the whole machine's busy time in the window (kernel threads too: writeback, the loop
    device), of two cores."""
    rows = [
        "| cold start | blobs fetched | daemon s | mount s | CAS server s | relay s "
        "| python s | machine s | daemon ms/blob | CAS ms/blob |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, rs in lazy_variants(res):
        if not rs:
            continue

        def m(role: str, rs: list[LazyRun] = rs) -> str:
            xs = [r.cpu[role] for r in rs if role in r.cpu]
            return fmt_s(median(xs)) if xs else "-"

        rows.append(
            md_row(
                label,
                f"{median([r.blobs for r in rs]):.0f}",
                m("daemon"),
                fmt_s(median([r.mount_cpu for r in rs])),
                m("cas"),
                m("relay"),
                m("workload"),
                m("machine"),
                f"{median([r.cpu_per_blob_ms('daemon') for r in rs]):.3f}",
                f"{median([r.cpu_per_blob_ms('cas') for r in rs]):.3f}",
            )
        )
    return rows


def median_counts(counts: Sequence[dict[str, int]]) -> dict[str, float]:
    """Per opcode, the median over ``counts`` (a run without that opcode counts 0)."""
    ops = sorted({op for c in counts for op in c})
    return {op: median([c.get(op, 0) for c in counts]) for op in ops}


def fuse_table(res: ProfileResult) -> list[str]:
    """FUSE requests by opcode, medians: each first mount's life (the cold run, then the warm
    runs), and the remount from the full cache (one cold run alone)."""
    rows_in: list[tuple[str, dict[str, float]]] = []
    for label, rs in lazy_variants(res):
        if any(r.fuse for r in rs):
            life = f"{label}: cold run + {WARM_PER_MOUNT} warm runs"
            rows_in.append((life, median_counts([r.fuse for r in rs if r.fuse])))
    cached = [r.cached_fuse for r in res.prof if r.cached_fuse]
    if cached:
        rows_in.append(("with profile, full cache, one cold run", median_counts(cached)))
    if not rows_in:
        return []
    ops = sorted({op for _, c in rows_in for op in c})
    rows = [md_row("mount", *ops, "all"), "|---|" + "---:|" * (len(ops) + 1)]
    for label, c in rows_in:
        cells = [f"{c.get(op, 0):.0f}" for op in ops]
        rows.append(md_row(label, *cells, f"{sum(c.values()):.0f}"))
    return rows


def ratio_rows(res: ProfileResult) -> list[tuple[str, float, float, float | None, str]]:
    """Issue 17's big-workload targets: (figure, this median, baseline median, target,
    how the target reads); ratios are this / baseline, CPU in ms per blob."""
    squash = median([r.total for r in res.squash])
    out: list[tuple[str, float, float, float | None, str]] = []
    prof_target = RATIO_TARGETS["profile"]
    assert isinstance(prof_target, dict)
    lazy = [
        ("cold, with profile / squashfs image", res.prof, prof_target.get(res.name)),
        ("cold, no profile / squashfs image", res.noprof, RATIO_TARGETS["noprof"]),
        ("cold, no profile, no import graph / squashfs image", res.noimp, None),
        ("cold, crowd hot set / squashfs image", res.crowd, RATIO_TARGETS["crowd"]),
        ("cold, with profile, bundle parts as stored / squashfs image", res.plain, None),
        ("cold, with profile, cache compressed as written / squashfs image", res.atwrite, None),
    ]
    for what, rs, target in lazy:
        t = target if isinstance(target, float) else None
        out.append((what, median([r.total for r in rs]), squash, t, "x"))
    cached = [c[0] + c[1] for r in res.prof if (c := r.cached) is not None]
    full = RATIO_TARGETS["cached"]
    assert isinstance(full, float)
    out.append(
        (
            "full host cache, page cache dropped / native cold",
            median(cached),
            median(res.native_cold),
            full,
            "x",
        )
    )
    warm = [w for r in res.noprof + res.crowd + res.prof for w in r.warm]
    warm_target = RATIO_TARGETS["warm"]
    assert isinstance(warm_target, float)
    out.append(("warm / native warm", median(warm), median(res.native_warm), warm_target, "x"))
    for label, rs in lazy_variants(res):
        for role, who in (("daemon", "daemon"), ("cas", "CAS server")):
            per_blob = median([r.cpu_per_blob_ms(role) for r in rs])
            target_ms = CPU_PER_BLOB_TARGET_MS[role]
            out.append((f"{who} CPU per blob, cold {label}", per_blob, NAN, target_ms, "ms"))
    return out


def ratio_table(res: ProfileResult) -> list[str]:
    """The big workload's figures against issue 17's targets (and the tarball beside)."""
    if not res.squash:
        return []
    tar = median([r.total for r in res.tar])
    rows = [
        "| figure | this s (or ms/blob) | baseline s | ratio | target | meets? | vs tarball |",
        "|---|---:|---:|---:|---|---|---:|",
    ]
    for what, this, base, target, unit in ratio_rows(res):
        if unit == "ms":
            ok = "-" if target is None or this != this else "yes" if this <= target else "**NO**"
            limit = "-" if target is None else f"<= {target:g} ms"
            rows.append(md_row(what, f"{this:.3f} ms", "-", "-", limit, ok, "-"))
            continue
        ratio = this / base if base else NAN
        ok = "-" if target is None or ratio != ratio else "yes" if ratio <= target else "**NO**"
        limit = "-" if target is None else f"<= {target:g}x"
        vs_tar = f"{this / tar:.2f}x" if "image" in what and tar == tar else "-"
        rows.append(md_row(what, fmt_s(this), fmt_s(base), f"{ratio:.2f}x", limit, ok, vs_tar))
    return rows


def run_notes(res: ProfileResult) -> list[str]:
    rate_bps = res.net.rate_mbit * 1e6 / 8
    rtt = res.net.rtt_s
    notes = []
    labelled = (
        ("no profile", res.noprof),
        ("no import graph", res.noimp),
        ("crowd", res.crowd),
        ("profile", res.prof),
        ("profile, parts as stored", res.plain),
        ("profile, compressed as written", res.atwrite),
    )
    for label, rs in labelled:
        for i, r in enumerate(rs):
            s, e = r.stats, r.settled
            misses = s.get("misses", 0)
            wire = f"{fmt_mb(r.wire)} on the wire"
            if rate_bps:
                wire += f" = {r.wire / rate_bps:.3f} s at {res.net.rate_mbit:g} Mbit/s"
            serial = f" (misses x RTT = {misses * rtt:.3f} s if serial)" if rtt else ""
            cached = ""
            if r.cached is not None:
                cached = (
                    f"; remount from the full cache: {r.cached[0]:.3f} + {r.cached[1]:.3f} s "
                    f"cold, mount {r.cached[2]:.3f} s warm"
                )
            cpu = ", ".join(f"{k} {v:.3f}" for k, v in sorted(r.cpu.items()))
            fuse = json.dumps(r.fuse, separators=(",", ":")) if r.fuse else "?"
            if r.cached_fuse:
                fuse += f"; full-cache remount {json.dumps(r.cached_fuse, separators=(',', ':'))}"
            bundled = ""
            if s.get("blobs_from_bundles"):
                bundled = (
                    f", {s['blobs_from_bundles']:.0f} blobs from the bundle's "
                    f"{s.get('bundle_parts_fetched', 0):.0f} parts, "
                    f"{fmt_mb(s.get('bundle_bytes_unused', 0))} of its records unused"
                )
            notes.append(
                f"{label} run {i}: mount {r.mount:.3f} + run {r.run:.3f} = {r.total:.3f} s; "
                f"{wire}; daemon: {s.get('fetches', 0):.0f} fetches "
                f"({fmt_mb(s.get('bytes_fetched', 0))}), {s.get('prefetched', 0):.0f} "
                f"prefetched ({fmt_mb(s.get('bytes_prefetched', 0))}), {misses:.0f} misses, "
                f"{s.get('hits', 0):.0f} hits, wait {s.get('wait_seconds', 0):.3f} s summed"
                f"{serial}{bundled}; {r.trace}; once settled: {e.get('fetches', 0):.0f} fetches, "
                f"{fmt_mb(e.get('bytes_fetched', 0))}{cached}; CPU s in the window: {cpu}; "
                f"FUSE requests: {fuse}"
            )
    if res.native_cold and res.prof and res.noprof and res.workload == "numpy":
        native = median(res.native_cold)
        with_profile = median([r.total for r in res.prof])
        target = PROFILE_TARGET_S[res.name]
        notes.append(
            f"this machine now: native cold {native:.3f} s against the ~"
            f"{NATIVE_COLD_QUOTED_S:g} s the issue quotes ({native / NATIVE_COLD_QUOTED_S:.1f}x); "
            f"with profile = {with_profile / native:.1f}x native cold (the target is "
            f"{target / NATIVE_COLD_QUOTED_S:.1f}x the quoted native cold); no profile = "
            f"{median([r.total for r in res.noprof]) / with_profile:.2f}x with profile. "
            "Verdicts use the absolute targets"
        )
    for i, q in enumerate(res.squash):
        notes.append(
            f"squashfs run {i}: download {q.download:.3f} s, squashfuse {q.mount:.3f} s, "
            f"run {q.run:.3f} s"
        )
    for i, t in enumerate(res.tar):
        notes.append(f"tarball run {i}: download+extract {t.fetch:.3f} s, run {t.run:.3f} s")
    return notes


def samples_line(name: str, xs: Sequence[float]) -> str:
    return f"{name}: [" + ", ".join(f"{x:.3f}" for x in xs) + "]"


def report_lines(
    facts: list[str],
    results: list[ProfileResult],
    image_bytes: int,
    runs: int,
    tar_bytes: int = 0,
) -> list[str]:
    """The report in Markdown: facts, then per link a table, per-run notes and all samples."""
    out = [f"- {fact}" for fact in facts]
    out.append(
        f"- {runs} runs per variant, medians (each column its own median, so total is not "
        f"mount + run); warm: {WARM_PER_MOUNT} runs per lazycaf mount (both kinds) and after "
        "each native cold run"
    )
    for res in results:
        if res.net.link is None:
            title = (
                "reference: no shaping (daemon in the root namespace, CAS on 127.0.0.1, no proxy)"
            )
        else:
            title = (
                f"{res.name}: tbf {res.net.rate_mbit:g} Mbit/s, {res.rtt_ms:g} ms RTT "
                f"delay line (tiny GET through the proxy: {res.net.rtt_s * 1000:.2f} ms)"
            )
        out += ["", f"### {title}", "", *table(res, image_bytes, tar_bytes), ""]
        if res.workload != "numpy" and (ratios := ratio_table(res)):
            out += ["Against issue 17's big-workload targets (medians):", "", *ratios, ""]
        out += ["CPU time in the cold starts' timed window (mount + run), medians:", ""]
        out += [*cpu_table(res), ""]
        if fuse := fuse_table(res):
            out += ["FUSE requests by opcode (the mount's count), medians:", "", *fuse, ""]
        out += [f"- {note}" for note in res.notes + run_notes(res)]
        out += ["", "All samples (s):", ""]
        warm = [w for r in res.noprof + res.prof for w in r.warm]
        out.append(f"- {samples_line('no profile total', [r.total for r in res.noprof])}")
        out.append(f"- {samples_line('profile total', [r.total for r in res.prof])}")
        out.append(f"- {samples_line('lazycaf warm', warm)}")
        if res.native_cold:
            out.append(f"- {samples_line('native cold', res.native_cold)}")
            out.append(f"- {samples_line('native warm', res.native_warm)}")
        if res.squash:
            out.append(f"- {samples_line('squashfs total', [r.total for r in res.squash])}")
        if res.tar:
            out.append(f"- {samples_line('tarball total', [r.total for r in res.tar])}")
    return out


def figures(res: ProfileResult) -> list[Figure]:
    """Every figure of one link; lazycaf's totals compared to the squashfs path's."""
    name = res.name
    squash = tuple(r.total for r in res.squash)

    def vs_squash(what: str, xs: Sequence[float]) -> Figure:
        if not squash or not xs:
            return Figure(f"{name}: {what}", "s", tuple(xs))
        ratio = median(squash) / median(xs)
        return Figure(
            f"{name}: {what}", "s", tuple(xs), "squashfs total", squash, ratio, "squashfs / this"
        )

    out = [
        vs_squash("lazycaf cold, no profile, total", [r.total for r in res.noprof]),
        vs_squash("lazycaf cold, no profile, no import graph, total", [r.total for r in res.noimp]),
        vs_squash(
            "lazycaf cold, no own profile, crowd hot set, total", [r.total for r in res.crowd]
        ),
        vs_squash("lazycaf cold, with profile, total", [r.total for r in res.prof]),
        vs_squash(
            "lazycaf cold, with profile, bundle parts as stored, total",
            [r.total for r in res.plain],
        ),
        vs_squash(
            "lazycaf cold, with profile, cache compressed as written, total",
            [r.total for r in res.atwrite],
        ),
        Figure(f"{name}: lazycaf cold, no profile, mount", "s", tuple(r.mount for r in res.noprof)),
        Figure(f"{name}: lazycaf cold, with profile, mount", "s", tuple(r.mount for r in res.prof)),
        Figure(
            f"{name}: lazycaf cold, with profile, bytes over the link",
            "bytes",
            tuple(float(r.wire) for r in res.prof),
        ),
        Figure(
            f"{name}: lazycaf cold, with profile, bundle parts as stored, bytes over the link",
            "bytes",
            tuple(float(r.wire) for r in res.plain),
        ),
        Figure(
            f"{name}: lazycaf warm",
            "s",
            tuple(w for r in res.noprof + res.crowd + res.prof for w in r.warm),
        ),
    ]
    cached = [r.cached for r in res.prof if r.cached is not None]
    if cached:
        out.append(
            Figure(
                f"{name}: lazycaf cold, blobs in host cache, caches dropped, profile, total",
                "s",
                tuple(c[0] + c[1] for c in cached),
            )
        )
    if res.native_cold:
        out.append(Figure(f"{name}: native disk, cold", "s", tuple(res.native_cold)))
        out.append(Figure(f"{name}: native disk, warm", "s", tuple(res.native_warm)))
    if squash:
        out.append(Figure(f"{name}: squashfs download+mount+run", "s", squash))
    if res.tar:
        out.append(
            Figure(f"{name}: tarball download+extract+run", "s", tuple(r.total for r in res.tar))
        )
    for label, rs in lazy_variants(res):
        for role, who in (("daemon", "daemon"), ("cas", "CAS server")):
            per_blob = tuple(r.cpu_per_blob_ms(role) for r in rs)
            out.append(Figure(f"{name}: {who} CPU per blob, cold {label}", "ms", per_blob))
        out.append(Figure(f"{name}: mount CPU, cold {label}", "s", tuple(r.mount_cpu for r in rs)))
    cached_fuse = [r.cached_fuse for r in res.prof if r.cached_fuse]
    for op in median_counts(cached_fuse):
        what = f"{name}: FUSE {op} requests, one cold run from the full cache"
        out.append(Figure(what, "requests", tuple(float(c.get(op, 0)) for c in cached_fuse)))
    return [f for f in out if f.samples]


def cli_floor(lz: Lazycaf, n: int = 3) -> tuple[float, float]:
    cold, warm = [], []
    for _ in range(n):
        drop_caches()
        cold.append(timed([str(lz.exe), "--version"], what="lazycaf --version"))
        warm.append(timed([str(lz.exe), "--version"], what="lazycaf --version"))
    return median(cold), median(warm)


# -- setup ---------------------------------------------------------------------------------
def start_server(made: Made, cmd: list[str], name: str) -> int:
    log = made.log(f"{name}.log")
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd="/"
        )
    made.servers.append(proc)
    return int(wait_for_line(proc, log, r"serving .*http://127\.0\.0\.1:(\d+)", name))


def workload_sample(args: argparse.Namespace, made: Made) -> Path:
    """``--sample``; else the workload's kept sample (built once when missing); else one
    built in the temp dir."""
    work: Workload = WORKLOADS[args.workload]
    if args.sample is not None or work.sample is None:
        return sample_tree(args.sample, made.tmp)
    if not (work.sample / "bin" / "python3").exists():
        say(f"building {work.sample} ({' '.join(work.packages)}) ...")
        say(build_sample(work.sample, work.packages))
    return work.sample


def prepare(args: argparse.Namespace, made: Made, lz: Lazycaf) -> tuple[Env, list[str]]:
    """Sample, pack, squashfs image, tarball, servers, Btrfs image; facts about them."""
    work: Workload = WORKLOADS[args.workload]
    facts = []
    sample = workload_sample(args, made)
    facts.append(f"workload: `python -c {work.code!r}`")
    facts.append(f"sample: {sample}, {du(sample) / MB:.1f} MB (du)")
    t0 = time.perf_counter()
    lz.cli("pack", str(sample), "--cas", str(lz.cas), "--tag", REF, what="pack")
    facts.append(
        f"packed into a local-dir CAS in {time.perf_counter() - t0:.1f} s: "
        f"{du(lz.cas) / MB:.1f} MB stored; served by `lazycaf cas serve` on 127.0.0.1"
    )
    other = made.tmp / "sample-b"  # another executable: the same files (hard links) plus one
    run(["cp", "-al", str(sample), str(other)], what="cp -al")
    (other / "lazycaf-sample-b.txt").write_text("another executable sharing the sample's files\n")
    lz.cli("pack", str(other), "--cas", str(lz.cas), "--tag", REF_B, what="pack B")
    facts.append(
        f"{REF_B}: the sample plus one file, packed too (the crowd variant mounts it: no "
        "profile of its own, the sample's profiles in the CAS)"
    )
    served = made.tmp / "served"
    served.mkdir()
    (served / "tiny").write_bytes(b"x")
    image = served / "sample.sqfs"
    t0 = time.perf_counter()
    run(["mksquashfs", str(sample), str(image), "-comp", "zstd", "-noappend", "-quiet"], what="sq")
    facts.append(
        f"squashfs image (mksquashfs -comp zstd, {time.perf_counter() - t0:.1f} s, not timed): "
        f"{image.stat().st_size / MB:.1f} MB; {packages('squashfs-tools', 'squashfuse')}"
    )
    tarball = served / "sample.tar.zst"
    t0 = time.perf_counter()
    run(tar_pack_cmd(sample, tarball), what="tar | zstd")
    facts.append(
        f"tarball (tar | zstd -T0 -{TAR_ZSTD_LEVEL}, {time.perf_counter() - t0:.1f} s, not "
        f"timed): {tarball.stat().st_size / MB:.1f} MB; fetched as curl | zstd -d | tar -x "
        f"into a fresh dir on {fs_of(made.tmp)}; {packages('tar', 'zstd')}"
    )
    cas_cmd = [str(lz.exe), "cas", "serve", "--root", str(lz.cas), "--listen", "127.0.0.1:0"]
    cas_port = start_server(made, cas_cmd, "cas-server")
    cas_pid = made.servers[-1].pid
    http_port = start_server(made, [sys.executable, "-c", _HTTP_SERVER, str(served)], "http")
    btrfs_image(made, work.image_size)
    facts.append(
        f"host caches: fresh dirs on a Btrfs loop image ({work.image_size}, compress=zstd)"
    )
    env = Env(lz, made, sample, cas_port, http_port, image, code=work.code, workload=work.name)
    env.tarball, env.cas_pid = tarball, cas_pid
    return env, facts


# -- main ----------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m scripts.bench_prefetch", description=(__doc__ or "").splitlines()[0]
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="a short before/after check: 3 runs, the 1gbit link, no loopback reference "
        "(explicit options still win)",
    )
    ap.add_argument("--runs", type=int, help="runs per variant (default 3)")
    ap.add_argument(
        "--variants",
        default="",
        help=f"run only these steps, comma-separated, of: {','.join(STEPS)} (default all)",
    )
    ap.add_argument("--profiles", help="netsim profiles, in order (default 1gbit,100mbit)")
    ap.add_argument(
        "--no-loopback", action="store_true", default=None, help="skip the unshaped reference"
    )
    ap.add_argument(
        "--workload",
        choices=sorted(WORKLOADS),
        default="numpy",
        help="what runs cold: `import numpy` from a sample built in the temp dir (default), or "
        "`import torch` from build/sample-torch (python + torch 2.13.0 CPU, built when missing)",
    )
    ap.add_argument(
        "--sample", type=Path, help="use this tree instead of the workload's (it must hold it)"
    )
    ap.add_argument("--tmpdir", type=Path, help="parent of the temp dir (default: system temp)")
    ap.add_argument("--lazycaf", type=Path, default=REPO / ".venv" / "bin" / "lazycaf")
    ap.add_argument(
        "--json",
        type=Path,
        default=default_json("bench_prefetch"),
        help="where to write the results (default results/bench_prefetch/results.json)",
    )
    args = ap.parse_args(argv)
    defaults: dict[str, Any] = {"runs": 3, "profiles": "1gbit,100mbit", "no_loopback": False}
    for name, value in {**defaults, **(QUICK if args.quick else {})}.items():
        if getattr(args, name) is None:  # options given explicitly win
            setattr(args, name, value)
    args.profile_names = [p for p in args.profiles.split(",") if p]
    unknown = [p for p in args.profile_names if p not in PROFILE_TARGET_S]
    if unknown or not args.profile_names:
        ap.error(f"--profiles: choose from {sorted(PROFILE_TARGET_S)}")
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    args.variant_names = frozenset(v for v in args.variants.split(",") if v)
    if args.variant_names - set(STEPS):
        ap.error(f"--variants: choose from {','.join(STEPS)}")
    if args.sample is not None and not (args.sample / "bin" / "python3").exists():
        ap.error(f"--sample {args.sample} has no bin/python3")
    return args


def missing_tools() -> list[str]:
    tools = ["curl", "mksquashfs", "squashfuse", "mkfs.btrfs", "nsenter", "fusermount3", "zstd"]
    return [t for t in tools if shutil.which(t) is None]


def bench(args: argparse.Namespace, record: Record, made: Made, lz: Lazycaf) -> None:
    env, setup = prepare(args, made, lz)
    results = []
    for k, name in enumerate(args.profile_names):
        say(f"profile {name} ...")
        shaped = bench_shaped(env, name, args.runs, record=k == 0, variants=args.variant_names)
        results.append(shaped)
    if not args.no_loopback:
        say("reference: loopback ...")
        results.append(bench_loopback(env, args.runs, args.variant_names))
    cli_cold, cli_warm = cli_floor(env.lz)
    record.facts = [
        f"CLI start-up floor, `lazycaf --version`: cold (drop_caches) {cli_cold:.3f} s, "
        f"warm {cli_warm:.3f} s (part of every mount figure)",
        *setup,
    ]
    tar_bytes = env.tarball.stat().st_size if env.tarball else 0
    image_bytes = env.image.stat().st_size
    record.report = report_lines(record.facts, results, image_bytes, args.runs, tar_bytes)
    record.figures = [f for res in results for f in figures(res)]
    record.finish(args.json)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench_prefetch: error: needs root (netns, drop_caches, mounts)", file=sys.stderr)
        return 2
    if missing := missing_tools():
        print(f"bench_prefetch: error: missing tools: {', '.join(missing)}", file=sys.stderr)
        return 2
    exe = find_lazycaf(args.lazycaf)
    if exe is None:
        print(f"bench_prefetch: error: lazycaf not found at {args.lazycaf}", file=sys.stderr)
        return 2
    title = (
        TITLE
        if args.workload == "numpy"
        else f"{TITLE}: python -c {WORKLOADS[args.workload].code!r}"
    )
    record = Record.begin("bench_prefetch", title, argv, args)
    made = Made(Path(tempfile.mkdtemp(prefix="bench_prefetch-", dir=args.tmpdir)))
    made.netns_prefix = f"lzc-bp{os.getpid() % 100000}"
    lz = Lazycaf(exe, made.tmp / "cas")

    def clean() -> list[str]:
        say(f"cleaning up {made.tmp} ...")
        return cleanup(made, lz)

    errors = (BenchError, subprocess.CalledProcessError, subprocess.TimeoutExpired)

    def body() -> None:
        bench(args, record, made, lz)

    return guarded_run("bench_prefetch", body, clean, errors=errors)


if __name__ == "__main__":
    sys.exit(main())
