"""The CLI's ``lazycaf run``: mount an executable privately, run a command from it, unmount.

``run REF [--profile NAME] [--record] [mount options] -- CMD ...`` mounts REF on a fresh
directory ``CACHE/runs/PID-XXXXXXXX`` (mode 0700, inside the host cache's 0700 ``runs``
directory), runs CMD with ``{mnt}`` in its arguments replaced and ``$LAZYCAF_MNT`` set to the
mountpoint, then unmounts (waiting until the mount process has saved the run's trace) and
returns CMD's exit code, or 128+N when CMD died of signal N. ``profile record`` is this
command with ``--record``.

Recording: a run prefetches its profile's hot set but, unlike a plain ``lazycaf mount``,
merges its reads into the profile only with ``--record``, so a fleet of jobs does not rewrite
a shared profile on every start.

Signals: SIGINT and SIGTERM are forwarded to CMD, and ``run`` goes on waiting for it. One
exception: a SIGINT while ``run`` is in the terminal's foreground process group is taken to
come from the terminal (Ctrl-C), which sent it to CMD too, so it is not sent twice. ``run``
itself killed (SIGKILL): the mount was started with ``--owner-pid`` of this process and
unmounts itself once it is gone (``lazycaf.mount.root``); CMD, if still running, is left
alone and loses the mount's files. The empty directory is removed by a later ``run``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Final

import trio

from lazycaf.cas.refs import profile_name_for
from lazycaf.cli.host import umount
from lazycaf.core.errors import LazyCafError, UsageError
from lazycaf.host.paths import cache_paths

__all__ = ["MNT_ENV", "run"]

MNT_ENV: Final = "LAZYCAF_MNT"
_FORWARDED: Final = (signal.SIGINT, signal.SIGTERM)


class _MountFailed(LazyCafError):
    """``lazycaf mount`` refused: its message, and its exit code passed through."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


async def run(args: argparse.Namespace) -> int:
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        raise UsageError("run needs a command after --: lazycaf run REF -- CMD ...")
    cache, _ = cache_paths(args.cache, args.socket)
    from_terminal = await trio.to_thread.run_sync(_in_terminal_foreground)
    mnt = await trio.to_thread.run_sync(_private_dir, cache / "runs")
    forwarder = _Forwarder(from_terminal=from_terminal)
    with trio.open_signal_receiver(*_FORWARDED) as signals:
        async with trio.open_nursery() as nursery:
            # consumes signals until the end: one arriving while the mount ends is not
            # redelivered to this process when the receiver closes
            nursery.start_soon(forwarder.serve, signals)
            try:
                code = await _mount_and_run(args, cmd, mnt, forwarder)
            finally:
                nursery.cancel_scope.cancel()
    if args.record:
        name = args.profile or profile_name_for(args.ref) or args.ref
        print(
            f"lazycaf: recorded a run of {' '.join(cmd)!r} (exit {code}) into profile {name!r}",
            file=sys.stderr,
        )
    return code


async def _mount_and_run(
    args: argparse.Namespace, cmd: list[str], mnt: str, forwarder: _Forwarder
) -> int:
    try:
        try:
            await _mount(args, mnt)
        except BaseException:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(_remove_dir, mnt)
            raise
        try:
            if forwarder.received:  # a signal while mounting: CMD never starts
                return 128 + forwarder.received[0]
            return await _run(cmd, mnt, forwarder)
        finally:
            with trio.CancelScope(shield=True):
                await _unmount(mnt)
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(_remove_dir, mnt)


class _Forwarder:
    """Passes SIGINT and SIGTERM on to CMD once it runs; remembers what arrived before."""

    def __init__(self, *, from_terminal: bool) -> None:
        self.from_terminal = from_terminal  # a SIGINT came from the terminal, to CMD too
        self.received: list[int] = []
        self.proc: trio.Process | None = None

    async def serve(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            self.received.append(signum)
            if self.proc is not None and not (signum == signal.SIGINT and self.from_terminal):
                self.proc.send_signal(signum)  # a no-op once CMD has been reaped


def _private_dir(parent: Path) -> str:
    """A fresh empty directory under ``parent`` (0700), named after this process; empty
    ones whose ``run`` is gone (killed) are removed on the way."""
    parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(parent, 0o700)
    for old in parent.iterdir():
        pid = old.name.partition("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            with contextlib.suppress(OSError):  # not empty, still a mount: leave it
                old.rmdir()
    return tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=parent)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_dir(path: str) -> None:
    with contextlib.suppress(OSError):  # still a mount (an unmount that failed): keep it
        os.rmdir(path)


def _mount_argv(args: argparse.Namespace, mnt: str) -> list[str]:
    argv = ["mount", args.ref, mnt, "--owner-pid", str(os.getpid())]
    valued = {
        "--cas": args.cas,
        "--cache": args.cache,
        "--socket": args.socket,
        "--profile": args.profile,
        "--cache-size": args.cache_size,
        "--fetch-timeout": repr(args.fetch_timeout),
        "--eager-share": repr(args.eager_share),
    }
    argv += [
        part for flag, value in valued.items() if value is not None for part in (flag, str(value))
    ]
    flags = {
        "--no-prefetch": args.no_prefetch,
        "--no-crowd": args.no_crowd,
        "--no-import-graph": args.no_import_graph,
        "--offline": args.offline,
        "--open-roundtrips": args.open_roundtrips,
        "--no-record": not args.record,
    }
    return argv + [flag for flag, on in flags.items() if on]


async def _mount(args: argparse.Namespace, mnt: str) -> None:
    """``lazycaf mount`` in a child (through the mount zygote when one runs): it returns once
    the tree is visible, and the mount process outlives it."""
    mounted = await trio.run_process(
        [sys.executable, "-m", "lazycaf", *_mount_argv(args, mnt)],
        check=False,
        capture_stdout=True,
        capture_stderr=True,
    )
    if mounted.returncode != 0:
        text = mounted.stderr.decode(errors="replace").strip().splitlines()
        message = (text[-1] if text else "lazycaf mount failed").removeprefix("lazycaf: error: ")
        raise _MountFailed(message, mounted.returncode)


async def _run(cmd: list[str], mnt: str, forwarder: _Forwarder) -> int:
    """Run CMD (stdin, stdout, stderr inherited) until it exits: its exit code, 128+N for
    signal N, 127 or 126 when it cannot be started."""
    argv = [part.replace("{mnt}", mnt) for part in cmd]
    env = {**os.environ, MNT_ENV: mnt}
    try:
        proc = await trio.lowlevel.open_process(argv, env=env)
    except (FileNotFoundError, PermissionError) as exc:
        print(f"lazycaf: error: cannot run {argv[0]}: {exc.strerror}", file=sys.stderr)
        return 127 if isinstance(exc, FileNotFoundError) else 126
    forwarder.proc = proc
    code = await proc.wait()
    return 128 - code if code < 0 else code


def _in_terminal_foreground() -> bool:
    """This process is in its controlling terminal's foreground process group."""
    try:
        fd = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY)
    except OSError:  # no controlling terminal
        return False
    try:
        return os.tcgetpgrp(fd) == os.getpgrp()
    except OSError:
        return False
    finally:
        os.close(fd)


async def _unmount(mnt: str) -> None:
    """Unmount and wait until the mount process saved the trace and exited; a mount that a
    leftover process of CMD keeps busy is detached lazily (it ends with that process)."""
    try:
        await umount(argparse.Namespace(mountpoint=Path(mnt), lazy=False))
    except LazyCafError as exc:
        if "busy" not in str(exc):
            raise
        print(f"lazycaf: warning: {exc}; detaching it lazily", file=sys.stderr)
        await umount(argparse.Namespace(mountpoint=Path(mnt), lazy=True))
