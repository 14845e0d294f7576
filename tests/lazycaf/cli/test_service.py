"""Running as a systemd service, through the CLI: ``lazycaf service install`` writes units
that ``systemd-analyze verify`` accepts; the daemon and ``cas serve`` send ``READY=1`` to a
real ``$NOTIFY_SOCKET`` only once they accept connections, and ``STOPPING=1`` on SIGTERM; the
daemon logs to its rotated file, or to stderr under systemd."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lazycaf.cli.daemonlog import RotatingStderrLog
from lazycaf.cli.service import lazycaf_command
from lazycaf.host.client import socket_answers
from lazycaf.host.service import service_unit
from tests.conftest import require, run_cli, stop

_SYSTEMD = ("INVOCATION_ID", "JOURNAL_STREAM", "NOTIFY_SOCKET")
_NAMESPACED = {
    "PrivateTmp", "PrivateDevices", "PrivateMounts", "ProtectSystem", "ProtectHome",
    "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups",
    "ProtectProc", "ReadOnlyPaths", "ReadWritePaths", "InaccessiblePaths", "TemporaryFileSystem",
    "BindPaths", "BindReadOnlyPaths", "RootDirectory", "RootImage", "MountFlags",
}  # fmt: skip


def test_install_writes_units_systemd_accepts(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    require(analyze is not None, "systemd-analyze (Debian's systemd package) is needed")
    assert analyze is not None
    units, cache = tmp_path / "units", tmp_path / "cache dir"
    run_cli(
        "service", "install", "--prefix", units, "--cache", cache,
        "--cas", tmp_path / "cas", "--cas-root", tmp_path / "store", "--cas-listen", "[::1]:8470",
    )  # fmt: skip
    fetcher = (units / "lazycaf-fetcher.service").read_text()
    exec_start = next(x for x in fetcher.splitlines() if x.startswith("ExecStart="))
    assert exec_start.startswith(f"ExecStart={lazycaf_command()[0]} fetcher serve")
    assert f'--cache "{cache}"' in exec_start
    assert "Type=notify" in fetcher and "KillMode=process" in fetcher
    settings = {x.partition("=")[0] for x in fetcher.splitlines() if x and x[0] not in "#["}
    # each would give the daemon a mount namespace of its own: the zygote's mounts would be
    # invisible to the host, or /dev/fuse or the mountpoints hidden from them
    assert not settings & _NAMESPACED, settings & _NAMESPACED
    assert service_unit(cache) == "lazycaf-fetcher.service"
    proc = subprocess.run(
        [analyze, "verify", *sorted(units.glob("*.service"))], capture_output=True, text=True
    )
    # systemd-analyze exits 0 on unknown keys and bad values: it only prints them
    assert (proc.returncode, proc.stdout + proc.stderr) == (0, "")
    run_cli("service", "uninstall", "--prefix", units, "--cache", cache)
    assert list(units.iterdir()) == [] and service_unit(cache) is None


def test_install_for_a_bucket_serves_the_bucket(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    require(analyze is not None, "systemd-analyze (Debian's systemd package) is needed")
    assert analyze is not None
    units, cache = tmp_path / "units", tmp_path / "cache"
    run_cli(
        "service", "install", "--prefix", units, "--cache", cache,
        "--cas", "http://127.0.0.1:8470", "--cas-store", "s3://fleet-bucket/lazycaf",
    )  # fmt: skip
    cas = (units / "lazycaf-cas.service").read_text()
    exec_start = next(x for x in cas.splitlines() if x.startswith("ExecStart="))
    assert exec_start.endswith(
        "cas serve --store s3://fleet-bucket/lazycaf --listen 127.0.0.1:8470"
    )
    assert "EnvironmentFile=-/etc/lazycaf/s3.env" in cas.splitlines()
    proc = subprocess.run(
        [analyze, "verify", *sorted(units.glob("*.service"))], capture_output=True, text=True
    )
    assert (proc.returncode, proc.stdout + proc.stderr) == (0, "")
    both = run_cli(
        "service", "install", "--prefix", units, "--cas-root", tmp_path, "--cas-store", "s3://b",
        check=False,
    )  # fmt: skip
    assert both.returncode == 2 and b"not allowed with" in both.stderr


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(30)
    try:
        yield sock
    finally:
        sock.close()


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SYSTEMD}
    return {**env, "LAZYCAF_NO_ZYGOTE": "1", **extra}


def _popen(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "lazycaf", *args],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


@pytest.mark.slow
def test_daemon_notifies_ready_once_its_socket_accepts(
    tmp_path: Path, notify_socket: socket.socket
) -> None:
    cache = tmp_path / "cache"
    env = _env(NOTIFY_SOCKET=str(tmp_path / "notify"), INVOCATION_ID="ab" * 16)
    args = ["fetcher", "serve", "--cache", str(cache), "--cas", str(tmp_path / "cas")]
    proc = _popen([*args, "--log-file", str(cache / "fetcher.log")], env)
    try:
        ready = notify_socket.recv(4096).decode()
        assert ready.startswith("READY=1\n"), ready
        assert socket_answers(cache / "fetcher.sock")  # ready means accepting
        assert service_unit(cache) is not None  # a unit runs it: mounts leave it alone
        proc.send_signal(signal.SIGTERM)
        assert notify_socket.recv(4096) == b"STOPPING=1"
        _, err = proc.communicate(timeout=30)
    finally:
        stop(proc)
    assert proc.returncode == 0
    # under systemd the log is stderr (journald), not the file
    assert b"fetcher daemon serving" in err
    assert not (cache / "fetcher.log").exists()


@pytest.mark.slow
def test_daemon_outside_systemd_logs_to_its_file(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    args = ["fetcher", "serve", "--cache", str(cache), "--cas", str(tmp_path / "cas")]
    proc = _popen([*args, "--log-file", str(cache / "fetcher.log")], _env())
    try:
        deadline = time.monotonic() + 30
        while not socket_answers(cache / "fetcher.sock"):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        stop(proc)
    log = (cache / "fetcher.log").read_text()
    assert "fetcher daemon serving" in log and "stopping on signal" in log
    assert b"fetcher daemon serving" not in err
    assert service_unit(cache) is None  # no unit, no marker


@pytest.mark.slow
def test_cas_serve_notifies_ready_once_its_port_listens(
    tmp_path: Path, notify_socket: socket.socket
) -> None:
    env = _env(NOTIFY_SOCKET=str(tmp_path / "notify"))
    proc = _popen(
        ["cas", "serve", "--root", str(tmp_path / "store"), "--listen", "127.0.0.1:0"], env
    )
    try:
        ready = notify_socket.recv(4096).decode()
        assert ready.startswith("READY=1\nSTATUS=serving "), ready
        url = ready.rpartition(" on ")[2]
        assert httpx.get(f"{url}/v1/stats", timeout=5).status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert notify_socket.recv(4096) == b"STOPPING=1"
        proc.wait(timeout=30)
    finally:
        stop(proc)
    assert proc.returncode == 0


def test_log_file_rotates_and_stderr_follows(tmp_path: Path) -> None:
    path = tmp_path / "fetcher.log"
    saved = os.dup(2)
    handler = RotatingStderrLog(path, maxBytes=2000, backupCount=2)
    logger = logging.getLogger("lazycaf.test.rotation")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        for i in range(200):
            logger.warning("line %03d %s", i, "x" * 40)
        os.write(2, b"written to descriptor 2\n")
    finally:
        logger.removeHandler(handler)
        handler.close()
        os.dup2(saved, 2)
        os.close(saved)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["fetcher.log", "fetcher.log.1", "fetcher.log.2"]
    assert all(p.stat().st_size <= 2000 for p in tmp_path.iterdir())
    current = path.read_text()
    assert "line 199" in current and "written to descriptor 2" in current
