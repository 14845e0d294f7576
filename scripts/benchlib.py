"""Helpers the benchmark scripts share: running commands, the page cache, the mount table,
and facts about the machine. Imported by ``scripts/bench_*.py`` (run as scripts, so this
directory is on ``sys.path``)."""

from __future__ import annotations

import contextlib
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from lazycaf.cli.zygote_client import zygote_ready
from lazycaf.host.client import socket_answers
from lazycaf.host.paths import fetcher_socket

__all__ = [
    "BenchError",
    "Made",
    "daemon_ready",
    "md_row",
    "progress",
    "guarded_run",
    "sample_tree",
    "cpu_model",
    "drop_caches",
    "fs_of",
    "is_mounted",
    "meminfo_gib",
    "mount_table",
    "run",
]


def progress(name: str) -> Callable[[str], None]:
    """A ``say(msg)`` for benchmark ``name``: timestamped progress lines on stderr (the
    report goes to stdout or files)."""

    def say(msg: str) -> None:
        print(f"[{name} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    return say


def md_row(*cells: str) -> str:
    """One row of a Markdown table."""
    return "| " + " | ".join(cells) + " |"


def daemon_ready(cache: Path) -> bool:
    """The fetcher daemon of ``cache`` answers on its socket and its mount zygote listens
    (a host's daemon has been up a while: mounts go through the zygote)."""
    sock = fetcher_socket(cache)
    return socket_answers(sock) and zygote_ready(sock)


class BenchError(Exception):
    """A step of the benchmark failed; the message says which and why."""


@dataclass
class Made:
    """Everything a benchmark run created, for its cleanup to undo: a temp dir and what lives
    in it (mount points, host caches, a Btrfs loop image), and the servers it started."""

    tmp: Path
    mounts: list[Path] = field(default_factory=list)
    caches: list[Path] = field(default_factory=list)
    servers: list[subprocess.Popen[Any]] = field(default_factory=list)
    btrfs_mnt: Path | None = None
    image: Path | None = None

    def mountpoint(self, name: str) -> Path:
        mnt = self.tmp / name
        mnt.mkdir(exist_ok=True)
        if mnt not in self.mounts:
            self.mounts.append(mnt)
        return mnt

    def log(self, name: str) -> Path:
        (self.tmp / "logs").mkdir(exist_ok=True)
        return self.tmp / "logs" / name


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


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds into the caller's finally blocks


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
    signal.signal(signal.SIGTERM, _on_sigterm)
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


def sample_tree(given: Path | None, tmp: Path) -> Path:
    """The sample executable: ``given`` (``--sample``), or built under ``tmp`` with
    ``scripts/build_sample.py`` (Python + numpy)."""
    if given is not None:
        return given.resolve()
    sample = tmp / "sample"
    print("building the sample ...", file=sys.stderr, flush=True)
    script = Path(__file__).resolve().parent / "build_sample.py"
    run([sys.executable, str(script), str(sample)], what="build the sample")
    return sample
