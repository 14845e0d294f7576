"""lazycaf.host.service and the autostart rule of ``ensure_daemon``: sd_notify over a real
AF_UNIX datagram socket, journald detection, the service marker, ``$LAZYCAF_NO_AUTOSTART``."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest

from lazycaf.core.errors import Unavailable
from lazycaf.host.client import ensure_daemon
from lazycaf.host.service import (
    DEFAULT_FETCHER_UNIT,
    notify,
    service_marker,
    service_unit,
    under_systemd,
    write_service_marker,
)


def _listener(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    return sock


def test_notify_sends_one_datagram(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with _listener(tmp_path / "notify") as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
        assert notify("READY=1\nSTATUS=up")
        assert sock.recv(4096) == b"READY=1\nSTATUS=up"


def test_notify_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"lazycaf-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify("STOPPING=1")
        assert sock.recv(4096) == b"STOPPING=1"


def test_notify_without_a_manager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not notify("READY=1")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert not notify("READY=1")  # swallowed, as sd_notify does


def test_under_systemd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INVOCATION_ID", raising=False)
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    assert not under_systemd()
    st = os.fstat(2)
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    assert under_systemd()
    # a JOURNAL_STREAM inherited from elsewhere does not name this stderr
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")
    assert not under_systemd()
    monkeypatch.setenv("INVOCATION_ID", "0123456789abcdef0123456789abcdef")
    assert under_systemd()


def test_marker_round_trip(tmp_path: Path) -> None:
    assert service_unit(tmp_path) is None
    write_service_marker(tmp_path, "lazycaf-fetcher@a.service")
    assert service_unit(tmp_path) == "lazycaf-fetcher@a.service"
    service_marker(tmp_path).write_text("")
    assert service_unit(tmp_path) == DEFAULT_FETCHER_UNIT


def test_service_owned_cache_starts_no_daemon(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    write_service_marker(cache, "lazycaf-fetcher.service")
    started = time.monotonic()
    with pytest.raises(Unavailable) as err:
        ensure_daemon(cache, None, cache / "fetcher.sock", service_wait=0.5)
    assert 0.4 < time.monotonic() - started < 5
    assert "systemctl start lazycaf-fetcher.service" in str(err.value)
    assert "\n" not in str(err.value)
    assert not (cache / "fetcher.log").exists()  # no daemon was started


def test_service_owned_cache_waits_for_a_restart(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    write_service_marker(cache, "lazycaf-fetcher.service")
    path = cache / "fetcher.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

    def come_back() -> None:
        time.sleep(0.3)
        server.bind(str(path))
        server.listen(8)

    thread = threading.Thread(target=come_back)
    thread.start()
    try:
        ensure_daemon(cache, None, path, service_wait=5)
    finally:
        thread.join()
        server.close()
    assert not (cache / "fetcher.log").exists()


def test_no_autostart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAZYCAF_NO_AUTOSTART", "1")
    cache = tmp_path / "cache"
    with pytest.raises(Unavailable, match="LAZYCAF_NO_AUTOSTART is set"):
        ensure_daemon(cache, None, cache / "fetcher.sock")
    assert not cache.exists()
