"""The benchmark harness: what every ``scripts/bench_*.py`` (and ``compare.py``) shares.

- progress lines on stderr and Markdown rows (``progress``, ``md_row``);
- running and timing commands (``run``, ``timed``, ``time_python``), small HTTP calls, the
  page cache and the mount table (``drop_caches``, ``is_mounted``, ``fs_of``);
- facts about the machine and its load (``Machine``, ``Load``);
- what a run made and its cleanup (``Made``, ``btrfs_image``, ``cleanup``,
  ``guarded_run``): mounts, fetcher daemons, servers, the Btrfs loop image and its loop
  device, network namespaces left under the run's prefix, processes, the temp dir;
- the ``lazycaf`` CLI as a subprocess (``Lazycaf``) and the sample tree (``sample_tree``);
- medians, figures and the results JSON every benchmark writes (``Figure``, ``Record``,
  ``write_results``), from which ``scripts/render_benchmarks.py`` writes
  ``docs/benchmarks.md``.

Benchmarks run as modules: ``.venv/bin/python -m scripts.bench_prefetch --quick``.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Final

from lazycaf.cli.zygote_client import zygote_ready
from lazycaf.host.client import socket_answers
from lazycaf.host.indexlock import forget_lock
from lazycaf.host.paths import CacheLayout, fetcher_socket

__all__ = [
    "REPO",
    "BenchError",
    "Figure",
    "Lazycaf",
    "Load",
    "Machine",
    "Made",
    "Record",
    "btrfs_image",
    "build_sample",
    "busy_seconds",
    "cleanup",
    "cleanup_mounts",
    "count_entries",
    "cpu_pressure",
    "find_lazycaf",
    "leftovers",
    "load_line",
    "temp_env",
    "unwind_on_sigterm",
    "cpu_model",
    "daemon_ready",
    "default_json",
    "drop_caches",
    "du",
    "fs_of",
    "guarded_run",
    "run_in_tempdir",
    "http_get",
    "http_put",
    "is_mounted",
    "md_row",
    "median",
    "meminfo_gib",
    "mount_table",
    "packages",
    "pids_mentioning",
    "progress",
    "python_env",
    "run",
    "sample_tree",
    "stop_process",
    "tail",
    "time_python",
    "timed",
    "wait_for_exit",
    "wait_for_line",
    "write_results",
]

REPO: Final = Path(__file__).resolve().parent.parent
BUILD_SAMPLE: Final = Path(__file__).resolve().parent / "build_sample.py"
EXIT_WAIT_S: Final = 15.0


# -- progress and Markdown -----------------------------------------------------------------
def progress(name: str) -> Callable[[str], None]:
    """A ``say(msg)`` for benchmark ``name``: timestamped progress lines on stderr (the
    report goes to stdout and the results JSON)."""

    def say(msg: str) -> None:
        print(f"[{name} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    return say


def md_row(*cells: str) -> str:
    """One row of a Markdown table."""
    return "| " + " | ".join(cells) + " |"


def median(xs: Sequence[float]) -> float:
    """The median of ``xs``; NaN for no samples (a table shows it, nothing raises)."""
    return statistics.median(xs) if xs else float("nan")


# -- commands ------------------------------------------------------------------------------
class BenchError(Exception):
    """A step of the benchmark failed; the message says which and why."""


def run(
    cmd: Sequence[str],
    *,
    what: str,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    timeout: float | None = 600.0,
) -> str:
    """Run ``cmd`` to completion; its stdout, or a BenchError carrying the tail of stderr."""
    try:
        res = subprocess.run(
            list(cmd), capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{what} timed out after {timeout:.0f} s: {' '.join(cmd)}") from exc
    if res.returncode != 0:
        tail = (res.stderr or res.stdout)[-2000:].strip()
        raise BenchError(f"{what} failed (exit {res.returncode}): {' '.join(cmd)}\n{tail}")
    return res.stdout


def timed(
    cmd: Sequence[str],
    *,
    what: str,
    env: dict[str, str] | None = None,
    cwd: str | None = "/",
    timeout: float | None = 600.0,
) -> float:
    """Seconds ``cmd`` took to run to completion (wall clock, process start included)."""
    t0 = time.perf_counter()
    run(cmd, what=what, env=env, cwd=cwd, timeout=timeout)
    return time.perf_counter() - t0


def python_env() -> dict[str, str]:
    """A clean environment: nothing of this venv leaks into the sample's interpreter."""
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}


def time_python(tree: Path, code: str = "import numpy") -> float:
    """Seconds ``TREE/bin/python3 -c CODE`` takes, in a clean environment."""
    cmd = [str(tree / "bin" / "python3"), "-c", code]
    return timed(cmd, what=f"{code!r} from {tree}", env=python_env())


def stop_process(proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; returns once the process is reaped."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()


def tail(path: Path, n: int = 5) -> str:
    """The last ``n`` lines of a log, joined on one line."""
    with contextlib.suppress(OSError):
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-n:])
    return "(no log)"


def wait_for_line(proc: subprocess.Popen[Any], log: Path, pattern: str, what: str) -> str:
    """Wait until ``log`` (the process's stdout) has a line matching ``pattern``; group 1."""
    import re

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            m = re.search(pattern, log.read_text(errors="replace"))
            if m:
                return m.group(1)
        if proc.poll() is not None:
            raise BenchError(f"{what} exited {proc.returncode}: {tail(log)}")
        time.sleep(0.05)
    raise BenchError(f"{what} did not start within 30 s: {tail(log)}")


def http_get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as resp:
        data: bytes = resp.read()
        return data


def http_put(url: str, body: bytes) -> None:
    req = urllib.request.Request(url, data=body, method="PUT")
    with urllib.request.urlopen(req, timeout=30) as resp:
        resp.read()


def du(path: Path) -> int:
    """Bytes under ``path`` as ``du -sb`` counts them."""
    return int(run(["du", "-sb", str(path)], what="du").split()[0])


def count_entries(root: Path) -> tuple[int, int]:
    """(entries, bytes of regular files) below ``root``."""
    n = nbytes = 0
    for dirpath, dirnames, filenames in os.walk(root):
        n += len(dirnames) + len(filenames)
        for name in filenames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                nbytes += os.lstat(p).st_size
    return n, nbytes


def packages(*names: str) -> str:
    """``name version`` of each Debian package (for the report)."""
    fmt = "${Package} ${Version}, "
    res = subprocess.run(["dpkg-query", "-W", "-f", fmt, *names], capture_output=True, text=True)
    return res.stdout.strip().rstrip(",") or ", ".join(names)


def daemon_ready(cache: Path) -> bool:
    """The fetcher daemon of ``cache`` answers on its socket and its mount zygote listens
    (a host's daemon has been up a while: mounts go through the zygote)."""
    sock = fetcher_socket(cache)
    return socket_answers(sock) and zygote_ready(sock)


def wait_daemon_ready(
    proc: subprocess.Popen[Any], cache: Path, log: Path, timeout: float = 30.0
) -> None:
    """Wait until the daemon ``proc`` (logging to ``log``) is ``daemon_ready``; a
    ``BenchError`` with its log's tail if it exits or takes longer than ``timeout``."""
    deadline = time.monotonic() + timeout
    while not daemon_ready(cache):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise BenchError(f"fetcher daemon for {cache} did not start: {tail(log)}")
        time.sleep(0.05)


# -- page cache, mounts, processes ---------------------------------------------------------
def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def mount_table() -> list[tuple[str, str, str]]:
    """(source, target, fstype) of every mount, targets unescaped."""
    out = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        src, target, fstype = line.split()[:3]
        out.append((src, target.replace("\\040", " "), fstype))
    return out


def is_mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    return any(t == target for _, t, _ in mount_table())


def fs_of(path: Path) -> str:
    """``fstype (source at mountpoint)`` of the filesystem holding ``path``."""
    best, kind = "", "?"
    real = os.path.realpath(path)
    for src, mnt, fs in mount_table():
        if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
            best, kind = mnt, f"{fs} ({src} at {mnt})"
    return kind


def pids_mentioning(marker: str) -> list[int]:
    """Live processes whose command line contains ``marker`` (a run's unique temp dir)."""
    me = os.getpid()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        with contextlib.suppress(OSError):
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            if marker in cmdline.decode(errors="replace"):
                found.append(int(entry.name))
    return found


def wait_for_exit(marker: str, timeout: float = EXIT_WAIT_S) -> list[int]:
    """Wait until no process mentions ``marker``; the pids still alive at the deadline."""
    deadline = time.monotonic() + timeout
    while (left := pids_mentioning(marker)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


# -- the machine ---------------------------------------------------------------------------
def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.machine()


def meminfo_gib() -> float:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    return 0.0


def cpu_pressure() -> float | None:
    """PSI ``some avg60`` of the CPU, in percent; None where the kernel has no PSI."""
    with contextlib.suppress(OSError, IndexError, ValueError):
        avg60 = Path("/proc/pressure/cpu").read_text().splitlines()[0].split()[2]
        return float(avg60.removeprefix("avg60="))
    return None


def _cpu_jiffies() -> list[int]:
    return [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]


def busy_seconds() -> float:
    """CPU time the whole machine has spent busy since boot (all cores, every process and
    kernel thread: all states but idle and iowait)."""
    fields = _cpu_jiffies()
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Load:
    """The machine's load at one moment: a benchmark takes one at its start and one at its
    end (other work on a shared host adds noise; the report says how much)."""

    at: str  # UTC, ISO 8601
    load1: float  # load average, 1 min
    psi: float | None  # CPU pressure, PSI some avg60, %
    steal: tuple[int, int]  # (steal, total) jiffies of all CPUs so far

    @classmethod
    def now(cls) -> Load:
        fields = _cpu_jiffies()
        steal = (fields[7] if len(fields) > 7 else 0), sum(fields)
        at = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        return cls(at, os.getloadavg()[0], cpu_pressure(), steal)

    def steal_pct_since(self, start: Load) -> float:
        return 100 * (self.steal[0] - start.steal[0]) / max(1, self.steal[1] - start.steal[1])

    def to_json(self) -> dict[str, Any]:
        return {"at": self.at, "load1": round(self.load1, 2), "cpu_pressure_pct": self.psi}


def _pct(x: float | None) -> str:
    return "?" if x is None else f"{x:.2f}"


def load_line(start: Load, end: Load) -> str:
    return (
        f"load average (1 min) at start / end: {start.load1:.2f} / {end.load1:.2f}; "
        f"CPU pressure (PSI some avg60) at start / end: {_pct(start.psi)} / {_pct(end.psi)} %; "
        f"CPU steal during the run: {end.steal_pct_since(start):.1f} % "
        "(other work on the host adds noise)"
    )


@dataclass(frozen=True)
class Machine:
    """What the figures were measured on."""

    cores: int
    usable_cores: int
    cpu: str
    ram_gib: float
    kernel: str
    python: str
    python_exe: str
    lazycaf: str

    @classmethod
    def now(cls) -> Machine:
        from lazycaf import __version__

        return cls(
            os.cpu_count() or 0,
            len(os.sched_getaffinity(0)),
            cpu_model(),
            round(meminfo_gib(), 1),
            platform.release(),
            platform.python_version(),
            sys.executable,
            __version__,
        )

    def lines(self) -> list[str]:
        return [
            f"nproc: {self.cores} ({self.usable_cores} usable), {self.cpu}, "
            f"RAM {self.ram_gib:.1f} GiB; kernel {self.kernel}",
            f"python {self.python} ({self.python_exe}); lazycaf {self.lazycaf}",
        ]

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


# -- what a run made, and its cleanup ------------------------------------------------------
@dataclass
class Made:
    """Everything a benchmark run created, for ``cleanup`` to undo: a temp dir and what lives
    in it (mount points, host caches, a Btrfs loop image), the servers it started, and the
    prefix of the network namespaces its links use (netsim removes them; cleanup reports
    any left)."""

    tmp: Path
    mounts: list[Path] = field(default_factory=list)
    caches: list[Path] = field(default_factory=list)
    servers: list[subprocess.Popen[Any]] = field(default_factory=list)
    btrfs_mnt: Path | None = None
    image: Path | None = None
    netns_prefix: str | None = None

    def mountpoint(self, name: str) -> Path:
        mnt = self.tmp / name
        mnt.mkdir(exist_ok=True)
        if mnt not in self.mounts:
            self.mounts.append(mnt)
        return mnt

    def log(self, name: str) -> Path:
        (self.tmp / "logs").mkdir(exist_ok=True)
        return self.tmp / "logs" / name

    def cache(self, lz: Lazycaf, name: str) -> Path:
        """A new host cache ``name`` on the Btrfs image, prepared by ``lazycaf cache init``."""
        if self.btrfs_mnt is None:
            raise BenchError("no Btrfs image: call btrfs_image(made) first")
        cache = self.btrfs_mnt / name
        self.caches.append(cache)
        lz.cache_init(cache)
        return cache


def btrfs_image(made: Made, size: str = "4G") -> Path:
    """A fresh Btrfs loop image (``compress=zstd``) mounted at ``TMP/btrfs``; its mount point."""
    made.image = made.tmp / "cache.img"
    run(["truncate", "-s", size, str(made.image)], what="truncate")
    run(["mkfs.btrfs", "-q", str(made.image)], what="mkfs.btrfs")
    mnt = made.tmp / "btrfs"
    mnt.mkdir()
    run(["mount", "-o", "loop,compress=zstd", str(made.image), str(mnt)], what="mount loop")
    made.btrfs_mnt = mnt
    return mnt


def cleanup_mounts(made: Made, lz: Lazycaf | None) -> list[str]:
    """Unmount every mount of ``made`` and stop every daemon of its caches; warnings."""
    warnings: list[str] = []
    for mnt in made.mounts:
        if not is_mounted(mnt):
            continue
        if lz is not None:
            cmd = [str(lz.exe), "umount", str(mnt)]
            subprocess.run(cmd, capture_output=True, text=True, timeout=90, check=False)
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True, check=False)
        if is_mounted(mnt):
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)
            warnings.append(f"{mnt} needed a lazy unmount")
    for cache in made.caches:
        if lz is not None and (cache / "fetcher.lock").exists():
            try:
                lz.fetcher_stop(cache)
            except BenchError as exc:
                warnings.append(f"fetcher stop for {cache} failed: {exc}")
        forget_lock(CacheLayout(cache).index)  # the cache goes with the temp dir
    return warnings


def cleanup(made: Made, lz: Lazycaf | None) -> list[str]:
    """Undo everything in ``made`` (mounts, daemons, servers, processes, the Btrfs image and
    its loop device, the temp dir); warnings about what could not be undone or was left."""
    warnings = cleanup_mounts(made, lz)
    for proc in made.servers:
        stop_process(proc)
    marker = str(made.tmp)
    left = wait_for_exit(marker)
    for pid in left:  # started (indirectly) by this run: its temp dir is in their command line
        warnings.append(f"process {pid} still mentions {marker} after cleanup; SIGTERM")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    if left and wait_for_exit(marker, 5.0):
        warnings.append(f"processes {pids_mentioning(marker)} survived SIGTERM")
    if made.btrfs_mnt is not None and is_mounted(made.btrfs_mnt):
        res = subprocess.run(["umount", str(made.btrfs_mnt)], capture_output=True, text=True)
        if res.returncode != 0:
            warnings.append(f"umount {made.btrfs_mnt}: {res.stderr.strip()}")
    if made.image is not None:
        loops = subprocess.run(["losetup", "-j", str(made.image)], capture_output=True, text=True)
        for line in loops.stdout.splitlines():
            subprocess.run(["losetup", "-d", line.split(":", 1)[0]], check=False)
    still = [t for _, t, _ in mount_table() if t == marker or t.startswith(marker + "/")]
    if still:
        warnings.append(f"mounts left under {marker}: {still}; NOT removing it")
    else:
        shutil.rmtree(made.tmp, ignore_errors=True)
        if made.tmp.exists():
            warnings.append(f"could not remove all of {made.tmp}")
    return warnings + leftovers(made)


def leftovers(made: Made) -> list[str]:
    """Loop devices, network namespaces and processes of this run still present."""
    found = []
    if made.image is not None:
        loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
        found += [f"loop device {ln}" for ln in loops.splitlines() if str(made.image) in ln]
    if made.netns_prefix is not None and shutil.which("ip"):
        netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        names = [ln.split()[0] for ln in netns.splitlines() if ln.strip()]
        found += [f"netns {n}" for n in names if n.startswith(made.netns_prefix)]
    found += [f"process {pid}" for pid in pids_mentioning(str(made.tmp))]
    return found


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds into the caller's finally blocks


def unwind_on_sigterm() -> None:
    """Make SIGTERM raise SystemExit, so ``finally`` blocks (the cleanup) run."""
    signal.signal(signal.SIGTERM, _on_sigterm)


def guarded_run(
    name: str,
    body: Callable[[], None],
    cleanup: Callable[[], list[str]],
    *,
    errors: tuple[type[BaseException], ...] = (BenchError,),
) -> int:
    """Run a benchmark's ``body``, then always its ``cleanup`` (also on SIGTERM and Ctrl-C);
    an exit code: 0, 1 for one of ``errors`` (said in one line), 130 interrupted, 3 when the
    cleanup left something behind (each leftover said as a warning)."""
    unwind_on_sigterm()
    start = time.perf_counter()
    code = 0
    try:
        body()
    except errors as exc:
        detail = getattr(exc, "stderr", None) or ""
        print(f"{name}: error: {exc} {detail}".rstrip(), file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        code = 130
    finally:
        for warning in cleanup():
            print(f"{name}: WARNING: {warning}", file=sys.stderr)
            code = code or 3
    print(f"[{name}] total runtime {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return code


def run_in_tempdir(
    name: str,
    tmpdir: Path | None,
    body: Callable[[Made, Lazycaf | None], None],
    *,
    lazycaf: Path | None = None,
) -> int:
    """``guarded_run`` of ``body(made, lz)`` in a fresh temp dir under ``tmpdir``, then the
    cleanup of all it made (with ``lazycaf``: ``lz`` runs that CLI, packing into the temp
    dir's ``cas``, and its mounts and daemons are cleaned up too; else ``lz`` is None)."""
    made = Made(Path(tempfile.mkdtemp(prefix=f"{name}-", dir=tmpdir)))
    lz = Lazycaf(lazycaf, made.tmp / "cas", clean_env=False) if lazycaf is not None else None

    def clean() -> list[str]:
        progress(name)(f"cleaning up {made.tmp} ...")
        return cleanup(made, lz)

    # packs keep their stat caches in the temp dir, never in the home directory (where one
    # run's would make the next run's first packs warm); a bench may set its own inside
    with temp_env("LAZYCAF_STATE", str(made.tmp / "pack-state")):
        return guarded_run(name, lambda: body(made, lz), clean)


# -- lazycaf -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Lazycaf:
    """The CLI, run as a subprocess (so figures include interpreter start-up).

    ``cas``: the local CAS directory the run packs into. ``clean_env``: run the CLI with
    ``python_env()`` over this environment (no venv ``PATH``). ``mount_args``: added to every
    ``mount`` (e.g. ``--cas DIR`` where no daemon was started with a CAS).
    ``wait_after_umount``: after ``umount``, wait until the mount process has exited (so it
    costs no CPU later)."""

    exe: Path
    cas: Path
    clean_env: bool = True
    mount_args: tuple[str, ...] = ()
    wait_after_umount: bool = False

    @property
    def python(self) -> Path:
        return self.exe.parent / "python"

    def env(self, cache: Path | None) -> dict[str, str]:
        env = {**os.environ, **(python_env() if self.clean_env else {})}
        if cache is not None:
            env["LAZYCAF_CACHE"] = str(cache)
        return env

    def cli(
        self, *args: str, cache: Path | None = None, what: str, timeout: float | None = 600.0
    ) -> str:
        return run([str(self.exe), *args], what=what, env=self.env(cache), timeout=timeout)

    def pack(self, tree: Path, *, tag: str | None = None) -> str:
        """``lazycaf pack TREE`` into ``cas``; the manifest digest (hex)."""
        extra = ["--tag", tag] if tag else []
        out = self.cli("pack", str(tree), "--cas", str(self.cas), *extra, what=f"pack {tree}")
        digest = out.strip().splitlines()[-1] if out.strip() else ""
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise BenchError(f"pack {tree}: expected a manifest digest, got {out!r:.200}")
        return digest

    def mount(self, ref: str, mnt: Path, cache: Path, *extra: str) -> float:
        """Seconds ``lazycaf mount REF MNT EXTRA...`` took to return (the tree visible)."""
        cmd = [str(self.exe), "mount", ref, str(mnt), *self.mount_args, *extra]
        secs = timed(cmd, what=f"mount {ref[:12]} at {mnt}", env=self.env(cache))
        if not is_mounted(mnt):
            raise BenchError(f"lazycaf mount returned but {mnt} is not a mount point")
        return secs

    def umount(self, mnt: Path) -> None:
        self.cli("umount", str(mnt), what=f"umount {mnt}")  # waits for the trace save
        if self.wait_after_umount and (left := wait_for_exit(f" {mnt} ")):
            print(f"mount process(es) {left} for {mnt} still running after umount", file=sys.stderr)

    def stats(self, cache: Path) -> dict[str, float]:
        raw = json.loads(self.cli("stats", "--json", cache=cache, what="stats --json"))
        return {k: float(v) for k, v in raw.items() if isinstance(v, int | float)}

    def fetcher_stop(self, cache: Path) -> None:
        self.cli("fetcher", "stop", cache=cache, what=f"fetcher stop ({cache})")

    def cache_init(self, cache: Path) -> None:
        out = self.cli("cache", "init", str(cache), what="cache init")
        if "compression on" not in out:
            raise BenchError(f"cache init {cache} did not turn compression on: {out.strip()}")


def find_lazycaf(given: Path) -> Path | None:
    """``given`` if it is a file, else ``lazycaf`` on PATH."""
    if given.is_file():
        return given.absolute()
    found = shutil.which("lazycaf")
    return None if found is None else Path(found)


# -- the sample ----------------------------------------------------------------------------
def build_sample(out: Path, packages: Sequence[str] = (), *, timeout: float = 1800.0) -> str:
    """Build the sample tree (a relocatable Python with ``packages``, default numpy) at
    ``out`` with ``scripts/build_sample.py`` (a standalone script); its last output line."""
    cmd = [sys.executable, str(BUILD_SAMPLE), str(out), "--force"]
    if packages:
        cmd += ["--packages", *packages]
    print(f"building the sample in {out} ...", file=sys.stderr, flush=True)
    out_text = run(cmd, what="build_sample.py", timeout=timeout).strip()
    return out_text.splitlines()[-1] if out_text else ""


def sample_tree(given: Path | None, tmp: Path) -> Path:
    """The sample executable: ``given`` (``--sample``), or built under ``tmp``."""
    if given is not None:
        return given.resolve()
    build_sample(tmp / "sample")
    return tmp / "sample"


# -- results -------------------------------------------------------------------------------
def _num(x: float | None) -> float | None:
    return None if x is None or x != x else round(x, 6)  # NaN (no samples) -> null


@dataclass(frozen=True)
class Figure:
    """One measured figure: its samples (this run), their median, and where the benchmark
    compares it to a baseline, the baseline's samples and the ratio as its table states it
    (``ratio_means`` says which way, e.g. "this / local")."""

    name: str
    unit: str
    samples: tuple[float, ...]
    baseline: str | None = None
    baseline_samples: tuple[float, ...] = ()
    ratio: float | None = None
    ratio_means: str = ""

    @property
    def median(self) -> float:
        return median(self.samples)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "unit": self.unit,
            "samples": [_num(x) for x in self.samples],
            "median": _num(self.median),
        }
        if self.baseline is not None:
            out["baseline"] = {
                "name": self.baseline,
                "samples": [_num(x) for x in self.baseline_samples],
                "median": _num(median(self.baseline_samples)),
            }
        if self.ratio is not None:
            out["ratio"] = _num(self.ratio)
            out["ratio_means"] = self.ratio_means
        return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


@dataclass
class Record:
    """One benchmark run, as ``results.json`` holds it: when (UTC), on what machine, under
    what load, with which arguments; every figure; and the report's Markdown (setup facts,
    tables, notes) that ``render_benchmarks`` puts beside them."""

    bench: str
    title: str
    argv: list[str]
    args: dict[str, Any]
    start: Load = field(default_factory=Load.now)
    facts: list[str] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    report: list[str] = field(default_factory=list)
    data: Any = None  # the benchmark's own records, for tools that read them back

    @classmethod
    def begin(cls, bench: str, title: str, argv: Sequence[str], args: Any) -> Record:
        fields = {k: _jsonable(v) for k, v in sorted(vars(args).items())}
        return cls(bench, title, list(argv), fields)

    def finish(self, path: Path) -> dict[str, Any]:
        """Print the report (the machine and the load first) and write the results JSON to
        ``path``; the document written."""
        end, machine = Load.now(), Machine.now()
        print(f"\n## {self.title} (python -m scripts.{self.bench})\n")
        for line in [*machine.lines(), load_line(self.start, end)]:
            print(f"- {line}")
        print("\n".join(self.report))
        return write_results(path, self, end=end, machine=machine)

    def to_json(self, end: Load, machine: Machine) -> dict[str, Any]:
        return {
            "bench": self.bench,
            "title": self.title,
            "date": self.start.at,
            "command": " ".join(["python -m scripts." + self.bench, *self.argv]),
            "args": self.args,
            "machine": machine.to_json(),
            "load": {
                "start": self.start.to_json(),
                "end": end.to_json(),
                "cpu_steal_pct": round(end.steal_pct_since(self.start), 2),
            },
            "facts": self.facts,
            "figures": [f.to_json() for f in self.figures],
            "report": self.report,
            "data": self.data,
        }


def default_json(bench: str) -> Path:
    """Where a benchmark writes its results unless ``--json PATH`` says otherwise."""
    return REPO / "results" / bench / "results.json"


def write_results(
    path: Path, record: Record, *, end: Load | None = None, machine: Machine | None = None
) -> dict[str, Any]:
    """Write ``record`` to ``path`` atomically, with the end load and the machine (taken now
    unless given); the document written."""
    doc = record.to_json(end or Load.now(), machine or Machine.now())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)
    print(f"results: {path}", file=sys.stderr)
    return doc


@contextlib.contextmanager
def temp_env(name: str, value: str) -> Iterator[None]:
    """``os.environ[name] = value`` for the block (children started in it inherit it)."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before
