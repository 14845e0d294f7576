"""``lazycaf run`` end to end: the real CLI, mount, daemon and CAS."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Host, run_cli
from tests.helpers import wait_for


def lazycaf_mounts() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if " fuse.lazycaf " in line]


def small_exe(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "a").write_text("hello\n")
    cas = tmp_path / "cas"
    run_cli("pack", tree, "--cas", cas, "--tag", "small:v1")
    return cas


def start_run(host: Host, cas: Path, *cmd: str, output: int) -> subprocess.Popen[bytes]:
    """``lazycaf run`` in the background, in a session of its own (no terminal)."""
    argv = [sys.executable, "-m", "lazycaf", "run", "small:v1", "--cas", str(cas), "--", *cmd]
    return subprocess.Popen(
        argv,
        env={**os.environ, **host.env},
        stdout=output,
        stderr=output,
        start_new_session=True,
    )


def runs_left(host: Host) -> list[Path]:
    runs = host.cache / "runs"
    return sorted(runs.iterdir()) if runs.exists() else []


def test_exit_codes_mountpoint_and_env(host: Host, tmp_path: Path) -> None:
    cas = small_exe(tmp_path)
    before = lazycaf_mounts()
    script = 'cat {mnt}/a "$LAZYCAF_MNT/a"; echo "{mnt} $LAZYCAF_MNT"; exit 3'
    proc = host.cli("run", "small:v1", "--cas", cas, "--", "sh", "-c", script, check=False)
    assert proc.returncode == 3, proc.stderr
    hello, hello2, paths = proc.stdout.decode().splitlines()
    assert hello == hello2 == "hello"
    mnt, env_mnt = paths.split()
    assert mnt == env_mnt and Path(mnt).parent == host.cache / "runs"
    assert not Path(mnt).exists() and mnt not in lazycaf_mounts()
    assert (host.cache / "runs").stat().st_mode & 0o777 == 0o700

    assert host.cli("run", "small:v1", "--cas", cas, "--", "true").returncode == 0
    proc = host.cli("run", "small:v1", "--cas", cas, "--", "sh", "-c", "kill -KILL $$", check=False)
    assert proc.returncode == 128 + signal.SIGKILL
    proc = host.cli("run", "small:v1", "--cas", cas, "--", "/nonexistent/cmd", check=False)
    assert proc.returncode == 127 and b"cannot run /nonexistent/cmd" in proc.stderr
    proc = host.cli("run", "nope:v1", "--cas", cas, "--", "true", check=False)
    assert proc.returncode == 1 and proc.stderr.count(b"\n") == 1, proc.stderr
    proc = host.cli("run", "small:v1", "--cas", cas, check=False)
    assert proc.returncode == 2 and b"needs a command" in proc.stderr
    assert lazycaf_mounts() == before and runs_left(host) == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signals_are_forwarded(host: Host, tmp_path: Path, signum: int) -> None:
    cas = small_exe(tmp_path)
    ready, got = tmp_path / "ready", tmp_path / "got"
    name = signal.Signals(signum).name.removeprefix("SIG")
    script = (
        f'trap "echo {name} > {got}; exit 7" {name}; '
        f"cat {{mnt}}/a > {ready}; while :; do sleep 0.1; done"
    )
    run = start_run(host, cas, "sh", "-c", script, output=subprocess.PIPE)
    try:
        wait_for(
            lambda: ready.exists() and ready.read_text() == "hello\n", "CMD started", timeout=60
        )
        run.send_signal(signum)
        _, err = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 7, err
    assert got.read_text() == f"{name}\n"
    assert runs_left(host) == []


def test_killed_run_leaves_no_mount(host: Host, tmp_path: Path) -> None:
    cas = small_exe(tmp_path)
    info = tmp_path / "info"
    run = start_run(
        host,
        cas,
        "sh",
        "-c",
        f'echo "$LAZYCAF_MNT $$" > {info}.tmp; mv {info}.tmp {info}; exec sleep 300',
        output=subprocess.DEVNULL,  # CMD outlives run and would hold a pipe open
    )
    cmd_pid = None
    try:
        mnt, pid = wait_for(lambda: info.exists() and info.read_text().split(), "CMD", timeout=60)
        cmd_pid = int(pid)
        assert mnt in lazycaf_mounts()
        run.kill()
        run.wait(timeout=30)
        wait_for(lambda: mnt not in lazycaf_mounts(), "the orphaned mount gone", timeout=30)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        if cmd_pid is not None:
            os.kill(cmd_pid, signal.SIGKILL)
    assert Path(mnt).exists()  # the killed run could not remove it: the next one does
    host.cli("run", "small:v1", "--cas", cas, "--", "true")
    assert not Path(mnt).exists() and runs_left(host) == []


def test_record_saves_the_run_into_the_profile(host: Host, tmp_path: Path) -> None:
    cas = small_exe(tmp_path)
    proc = host.cli("run", "small:v1", "--cas", cas, "--", "cat", "{mnt}/a")
    assert proc.stdout == b"hello\n" and proc.stderr == b""
    proc = host.cli("profile", "show", "small", "--cas", cas, check=False)
    assert proc.returncode == 1 and b"no profile 'small'" in proc.stderr  # not recorded

    proc = host.cli("run", "small:v1", "--record", "--cas", cas, "--", "cat", "{mnt}/a")
    assert b"into profile 'small'" in proc.stderr
    lines = host.cli("profile", "show", "small", "--cas", cas).stdout.decode().splitlines()
    assert lines[0].startswith("profile 'small': 1 run(s)")

    proc = host.cli(
        "profile", "record", "--name", "other", "small:v1", "--cas", cas, "--", "cat", "{mnt}/a"
    )
    assert proc.stdout == b"hello\n" and b"into profile 'other'" in proc.stderr
    lines = host.cli("profile", "show", "other", "--cas", cas).stdout.decode().splitlines()
    assert lines[0].startswith("profile 'other': 1 run(s)")
