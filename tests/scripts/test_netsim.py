"""scripts/netsim.py: functional facts only (namespace, tbf, transfers, cleanup), no timings."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from scripts import netsim
from tests.conftest import require

pytestmark = pytest.mark.root

MB = 1 << 20

# Runs inside the namespace: send 1 MiB, half-close, read the echo, print both digests.
CLIENT = r"""
import hashlib, socket, sys
payload = bytes(range(256)) * 4096
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30) as s:
    s.sendall(payload)
    s.shutdown(socket.SHUT_WR)
    got = bytearray()
    while chunk := s.recv(1 << 16):
        got += chunk
print(hashlib.sha256(payload).hexdigest(), hashlib.sha256(got).hexdigest(), len(got))
"""


@pytest.fixture(autouse=True)
def _capable() -> None:
    require(
        os.geteuid() == 0 and shutil.which("ip") is not None and shutil.which("tc") is not None,
        "netsim needs root and iproute2 (ip, tc)",
    )


def _netns() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return [line.split()[0] for line in out.stdout.splitlines() if line.strip()]


def _dev_exists(dev: str) -> bool:
    return subprocess.run(["ip", "link", "show", dev], capture_output=True).returncode == 0


@pytest.fixture
def echo_server() -> Iterator[tuple[str, int]]:
    """A TCP echo server on 127.0.0.1 in the root namespace (echoes until the client's EOF)."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def handle(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(1 << 16):
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[:2]
    finally:
        stop.set()
        listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        listener.close()
        thread.join(5)


def _transfer(link: Any, host: str, port: int) -> None:
    out = link.run(
        [sys.executable, "-c", CLIENT, host, str(port)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    sent, got, size = out.stdout.split()
    assert int(size) == MB
    assert got == sent


def test_link_lifecycle_qdiscs_and_transfers(echo_server: tuple[str, int]) -> None:
    with netsim.shaped_link("t-life", rate_mbit=100, rtt_ms=10) as link:
        assert link.netns == "lzc-t-life"
        assert link.netns in _netns()
        assert link.host_ip.startswith("10.77.") and link.client_ip.startswith("10.77.")
        # tbf on both ends of the veth
        host_q = subprocess.run(
            ["tc", "qdisc", "show", "dev", link.host_dev], capture_output=True, text=True
        ).stdout
        client_q = link.run(
            ["tc", "qdisc", "show", "dev", link.client_dev], capture_output=True, text=True
        ).stdout
        assert "tbf" in host_q and "100Mbit" in host_q
        assert "tbf" in client_q and "100Mbit" in client_q
        # the namespace has its address and no route beyond the /30
        addrs = link.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
        assert f"{link.client_ip}/30" in addrs
        routes = link.run(["ip", "route"], capture_output=True, text=True).stdout
        assert "default" not in routes
        # 1 MiB both ways through the delay-line proxy, with and without handshake emulation
        _transfer(link, *link.proxy(*echo_server))
        _transfer(link, *link.proxy(*echo_server, handshake=False))
        # and straight to a server on the host IP (shaped, not delayed)
        direct = socket.create_server((link.host_ip, 0))
        with direct:
            conn_thread = threading.Thread(target=_echo_once, args=(direct,), daemon=True)
            conn_thread.start()
            _transfer(link, link.host_ip, direct.getsockname()[1])
            conn_thread.join(10)
        sleeper = link.popen(["sleep", "600"])
        proxies = list(link._proxies)
    assert link.netns not in _netns()
    assert not _dev_exists(link.host_dev)
    assert sleeper.poll() is not None
    assert all(p.poll() is not None for p in proxies)
    assert not (netsim.STATE_DIR / "t-life.json").exists()


def _echo_once(listener: socket.socket) -> None:
    conn, _ = listener.accept()
    with conn:
        while data := conn.recv(1 << 16):
            conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)


def test_cleanup_when_the_body_raises(echo_server: tuple[str, int]) -> None:
    class Boom(Exception):
        pass

    with pytest.raises(Boom), netsim.shaped_link("t-raise", rate_mbit=1000, rtt_ms=1) as link:
        link.proxy(*echo_server)
        proxies = list(link._proxies)
        assert link.netns in _netns()
        raise Boom
    assert link.netns not in _netns()
    assert not _dev_exists(link.host_dev)
    assert all(p.poll() is not None for p in proxies)


def test_cleanup_on_keyboard_interrupt() -> None:
    with pytest.raises(KeyboardInterrupt), netsim.shaped_link("t-int", rate_mbit=10, rtt_ms=0):
        raise KeyboardInterrupt
    assert "lzc-t-int" not in _netns()


def test_leftovers_of_a_crashed_run_are_removed() -> None:
    # An unrecorded namespace under our prefix, one with the name about to be built, and a
    # record whose owner is gone (pid 0 is never a live owner).
    for ns in ("lzc-t-stale", "lzc-t-orphan"):
        subprocess.run(["ip", "netns", "add", ns], check=True)
    netsim.STATE_DIR.mkdir(parents=True, exist_ok=True)
    (netsim.STATE_DIR / "t-dead.json").write_text(
        '{"name": "t-dead", "netns": "lzc-t-dead", "n": 250, "host_dev": "lzc250h", "pid": 0}'
    )
    try:
        with netsim.shaped_link("t-stale", rate_mbit=100, rtt_ms=10) as link:
            names = _netns()
            assert link.netns in names
            assert "lzc-t-orphan" not in names
            assert not (netsim.STATE_DIR / "t-dead.json").exists()
        assert link.netns not in _netns()
    finally:
        for ns in ("lzc-t-stale", "lzc-t-orphan"):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        (netsim.STATE_DIR / "t-dead.json").unlink(missing_ok=True)


def test_a_live_link_name_is_not_taken_over() -> None:
    with netsim.shaped_link("t-busy", rate_mbit=100, rtt_ms=1) as link:
        with (
            pytest.raises(RuntimeError, match="in use"),
            netsim.shaped_link("t-busy", rate_mbit=100, rtt_ms=1),
        ):
            pass
        assert link.netns in _netns()
    assert link.netns not in _netns()


def test_proxy_targets_are_local_only() -> None:
    with netsim.shaped_link("t-target", rate_mbit=100, rtt_ms=1) as link:
        for bad in ("192.0.2.1", "8.8.8.8", "example.com"):
            with pytest.raises(ValueError):
                link.proxy(bad, 80)
    assert link.netns not in _netns()


def test_profiles() -> None:
    assert netsim.PROFILES == {"1gbit": (1000, 1.0), "100mbit": (100, 10.0)}
