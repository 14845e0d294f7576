#!/usr/bin/env python3
"""Network shaping for benchmarks: a rate-limited, delayed link into a private namespace.

``shaped_link(name, rate_mbit=..., rtt_ms=...)`` builds, for the duration of a ``with`` block:

- a network namespace ``lzc-<name>`` (the *client* side), joined to the root namespace by a
  veth pair in a private /30: ``10.77.N.1`` on the root side (``Link.host_ip``, device
  ``lzcNh``) and ``10.77.N.2`` inside the namespace (``Link.client_ip``, device ``lzcNc``).
  There is no default route in the namespace: it reaches the host IP and nothing else;
- a ``tbf`` qdisc at ``rate_mbit`` on both veth ends (so both directions are limited);
- a round-trip delay of ``rtt_ms`` for TCP connections made through ``Link.proxy``.

This kernel has no ``netem``, so the delay is made in userspace by a TCP *delay line* proxy:
``Link.proxy(target_host, target_port)`` starts a subprocess listening on
``(host_ip, port)``; each connection a client in the namespace makes to it is forwarded to
the target (loopback or the host IP, in the root namespace), and every chunk received in
either direction is released ``rtt_ms / 2`` after it arrived, in order and without waiting
for earlier chunks to be acknowledged (a delay line, not stop-and-wait). Both sockets set
TCP_NODELAY. What this models and what it does not:

- a request/response exchange on an open connection costs one RTT, as on a real link
  (``check`` measures it: the time of a tiny GET on a kept-alive connection);
- connection set-up: the kernel completes the client's handshake with the proxy at once,
  so ``connect()`` returns without delay. With ``handshake=True`` (the default) the proxy
  charges the handshake's RTT to the first bytes instead (client data reaches the target no
  earlier than 1.5 RTT after the accept, server data reaches the client no earlier than
  2 RTT after it), so the first request on a new connection costs 2 RTT in total, as it would
  on a real link; only the moment the client sees ``connect()`` return differs;
- it delays data, not ACKs: TCP between client and proxy runs at a near-zero RTT, so
  slow start and window limits do not slow transfers down the way a real long link would
  (throughput is shaped by ``tbf`` only, and the proxy buffers up to a few MiB per direction);
- only connections through the proxy are delayed. Traffic sent straight to ``host_ip`` is
  rate limited but not delayed, and clients in the root namespace that connect to the proxy
  address bypass the veth (no rate limit, delay only).

Everything is removed when the block exits, also on exceptions and KeyboardInterrupt: the
processes started with ``Link.popen`` (and any other process left in the namespace), the
proxies, the namespace, the veth pair and its qdiscs. Proxy subprocesses also exit by
themselves when their owner dies. Links are recorded in ``/run/lzc-netsim/``; a namespace,
veth or record left behind by a run whose owner process is gone (crash, SIGKILL) is removed
when the next link is built (or by ``python scripts/netsim.py cleanup``). Several links may
exist at once (distinct names); building needs root.

Commands run by ``Link.run``/``Link.popen`` use ``ip netns exec``, which also gives the
command a private mount namespace: a FUSE mount made by such a command is invisible to the
root namespace and to other commands. Pass ``share_mounts=True`` to enter only the network
namespace (``nsenter --net``), e.g. for a daemon whose mount other processes must see.

Library use (benchmarks run as ``python -m scripts.bench_x`` do ``from scripts import netsim``)::

    rate, rtt = netsim.PROFILES["100mbit"]
    with netsim.shaped_link("bench", rate_mbit=rate, rtt_ms=rtt) as link:
        addr, port = link.proxy("127.0.0.1", cas_port)  # reach the CAS via the delay line
        link.run(["curl", "-s", f"http://{addr}:{port}/v1/stats"], check=True)

CLI for manual checks (root)::

    python scripts/netsim.py check --profile 100mbit   # prints "rtt X ms, throughput Y Mbit/s"
    python scripts/netsim.py up --profile 1gbit --proxy 127.0.0.1:8000   # hold until Ctrl-C
    python scripts/netsim.py cleanup                   # remove links of dead owners
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import fcntl
import functools
import http.server
import ipaddress
import json
import os
import re
import select
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Final

#: Named presets: name -> (rate_mbit, rtt_ms).
PROFILES: Final[dict[str, tuple[float, float]]] = {"1gbit": (1000, 1.0), "100mbit": (100, 10.0)}

NETNS_PREFIX: Final = "lzc-"
STATE_DIR: Final = Path("/run/lzc-netsim")
_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,39}")
_HOST_DEV_RE: Final = re.compile(r"lzc\d+h")
_SUBNETS: Final = range(1, 255)  # 10.77.N.0/30 for N in this range
_STOP_TIMEOUT: Final = 5.0


# --------------------------------------------------------------------------------------------
# The link


@dataclass
class Link:
    """One shaped link; made by :func:`shaped_link`, valid inside its ``with`` block only."""

    name: str
    netns: str  # "lzc-<name>"
    host_ip: str  # root-namespace end, "10.77.N.1"
    client_ip: str  # namespace end, "10.77.N.2"
    host_dev: str  # veth in the root namespace, "lzcNh"
    client_dev: str  # veth in the namespace, "lzcNc"
    rate_mbit: float
    rtt_ms: float
    _procs: list[subprocess.Popen[Any]] = field(default_factory=list, repr=False)
    _proxies: list[subprocess.Popen[str]] = field(default_factory=list, repr=False)

    @property
    def exec_prefix(self) -> list[str]:
        """``ip netns exec lzc-<name>``: prepend to a command to run it in the namespace."""
        return ["ip", "netns", "exec", self.netns]

    @property
    def nsenter_prefix(self) -> list[str]:
        """Like :attr:`exec_prefix`, but enters only the network namespace (mounts shared)."""
        return ["nsenter", f"--net=/run/netns/{self.netns}", "--"]

    def argv(self, cmd: Sequence[str], *, share_mounts: bool = False) -> list[str]:
        """The full command line that runs ``cmd`` inside the namespace."""
        prefix = self.nsenter_prefix if share_mounts else self.exec_prefix
        return [*prefix, *cmd]

    def run(
        self, cmd: Sequence[str], *, share_mounts: bool = False, **kw: Any
    ) -> subprocess.CompletedProcess[Any]:
        """``subprocess.run(cmd, **kw)`` inside the namespace (same defaults: check=False)."""
        return subprocess.run(self.argv(cmd, share_mounts=share_mounts), **kw)

    def popen(
        self, cmd: Sequence[str], *, share_mounts: bool = False, **kw: Any
    ) -> subprocess.Popen[Any]:
        """``subprocess.Popen(cmd, **kw)`` inside the namespace; stopped when the link closes."""
        proc: subprocess.Popen[Any] = subprocess.Popen(
            self.argv(cmd, share_mounts=share_mounts), **kw
        )
        self._procs.append(proc)
        return proc

    def proxy(
        self, target_host: str, target_port: int, *, handshake: bool = True
    ) -> tuple[str, int]:
        """Start a delay-line proxy to ``(target_host, target_port)`` in the root namespace.

        Returns ``(host_ip, port)``, which clients inside the namespace connect to. The target
        must be a loopback address (``localhost``, ``127.x``, ``::1``) or this link's host IP.
        ``handshake``: charge one extra RTT to the start of each connection (see module doc).
        Each call starts one proxy subprocess; all are stopped when the link closes.
        """
        target = _check_target(target_host, self.host_ip)
        delay_s = self.rtt_ms / 2000
        # The delay line holds rate x delay bytes in flight; allow generously more than that.
        buffer = max(4 << 20, int(self.rate_mbit * 1e6 / 8 * delay_s * 4))
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "_proxy",
            "--listen",
            self.host_ip,
            "--target",
            target,
            "--target-port",
            str(target_port),
            "--delay-ms",
            repr(self.rtt_ms / 2),
            "--buffer",
            str(buffer),
        ]
        if not handshake:
            cmd.append("--no-handshake")
        proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, close_fds=True
        )
        self._proxies.append(proc)
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 15)
        line = proc.stdout.readline() if ready else ""
        if not line.strip().isdigit():
            raise RuntimeError(f"netsim proxy did not start (exit {proc.poll()}): {line!r}")
        return self.host_ip, int(line)

    def _stop_all(self) -> None:
        """Stop the processes and proxies this link started (TERM, then KILL after 5 s)."""
        for proc in reversed(self._procs):
            _stop_process(proc)
        for proxy in self._proxies:
            with contextlib.suppress(OSError):
                if proxy.stdin is not None:
                    proxy.stdin.close()  # the proxy exits when its stdin closes
            _stop_process(proxy, term=False)
            if proxy.stdout is not None:
                proxy.stdout.close()


def _check_target(host: str, host_ip: str) -> str:
    if host == "localhost":
        return "127.0.0.1"
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"proxy target must be an IP address or 'localhost': {host!r}") from None
    if not (addr.is_loopback or str(addr) == host_ip):
        raise ValueError(f"proxy target must be loopback or the link's host IP {host_ip}: {host}")
    return str(addr)


def _stop_process(proc: subprocess.Popen[Any], *, term: bool = True) -> None:
    if proc.poll() is None and term:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
    try:
        proc.wait(_STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()


@contextlib.contextmanager
def shaped_link(
    name: str,
    *,
    rate_mbit: float,
    rtt_ms: float,
    burst_bytes: int | None = None,
    queue_ms: float = 20.0,
) -> Iterator[Link]:
    """Build namespace ``lzc-<name>`` behind a veth shaped to ``rate_mbit`` (tbf, both ways).

    ``rtt_ms`` is the round trip applied by :meth:`Link.proxy` (rtt/2 each way).
    ``burst_bytes`` is the tbf bucket (default: max(128 KiB, 1 ms at the rate)) and
    ``queue_ms`` the tbf ``latency`` (how long a packet may wait before tail drop).
    Needs root. Removes everything on exit, also on exceptions and KeyboardInterrupt.
    """
    if not _NAME_RE.fullmatch(name):
        raise ValueError(f"link name must match {_NAME_RE.pattern}: {name!r}")
    if not rate_mbit > 0 or not rtt_ms >= 0:
        raise ValueError(f"need rate_mbit > 0 and rtt_ms >= 0: {rate_mbit}, {rtt_ms}")
    netns = NETNS_PREFIX + name
    burst = burst_bytes or max(128 * 1024, int(rate_mbit * 1e6 / 8 / 1000))
    with _locked():
        _cleanup_stale(own=name)
        n = _free_subnet()
        link = Link(
            name=name,
            netns=netns,
            host_ip=f"10.77.{n}.1",
            client_ip=f"10.77.{n}.2",
            host_dev=f"lzc{n}h",
            client_dev=f"lzc{n}c",
            rate_mbit=rate_mbit,
            rtt_ms=rtt_ms,
        )
        _write_state(link, n)
    try:
        _build(link, burst=burst, queue_ms=queue_ms)
        yield link
    finally:
        try:
            link._stop_all()
        finally:
            with _locked():
                _remove(netns, link.host_dev)
                _state_path(name).unlink(missing_ok=True)


def _build(link: Link, *, burst: int, queue_ms: float) -> None:
    ns = link.netns
    inside = ["ip", "netns", "exec", ns]
    tbf = ["tbf", "rate", f"{round(link.rate_mbit * 1000)}kbit", "burst", str(burst)]
    tbf += ["latency", f"{queue_ms:g}ms"]
    peer = ["peer", "name", link.client_dev, "netns", ns]
    steps = [
        ["ip", "netns", "add", ns],
        ["ip", "link", "add", link.host_dev, "type", "veth", *peer],
        ["ip", "addr", "add", f"{link.host_ip}/30", "dev", link.host_dev],
        ["ip", "link", "set", link.host_dev, "up"],
        [*inside, "ip", "addr", "add", f"{link.client_ip}/30", "dev", link.client_dev],
        [*inside, "ip", "link", "set", link.client_dev, "up"],
        [*inside, "ip", "link", "set", "lo", "up"],
        ["tc", "qdisc", "add", "dev", link.host_dev, "root", *tbf],
        [*inside, "tc", "qdisc", "add", "dev", link.client_dev, "root", *tbf],
    ]
    for step in steps:
        _cmd(step)


# --------------------------------------------------------------------------------------------
# Bookkeeping: a lock, one record per link, removal of what dead owners left behind


def _cmd(argv: Sequence[str], *, check: bool = True) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    STATE_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    with open(STATE_DIR / "lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _state_path(name: str) -> Path:
    return STATE_DIR / f"{name}.json"


def _proc_start(pid: int) -> str | None:
    """Start time of a process (to tell a live owner from a reused pid), None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _write_state(link: Link, n: int) -> None:
    record = {
        "name": link.name,
        "netns": link.netns,
        "n": n,
        "host_dev": link.host_dev,
        "pid": os.getpid(),
        "start": _proc_start(os.getpid()),
    }
    _state_path(link.name).write_text(json.dumps(record) + "\n")


def _read_states() -> list[dict[str, Any]]:
    records = []
    for path in sorted(STATE_DIR.glob("*.json")):
        try:
            record: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError):
            record = {"name": path.stem, "pid": -1}
        records.append(record)
    return records


def _alive(record: dict[str, Any]) -> bool:
    pid = record.get("pid", -1)
    return isinstance(pid, int) and pid > 0 and _proc_start(pid) == record.get("start")


def _netns_names() -> list[str]:
    out = _cmd(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _host_devs() -> list[str]:
    out = _cmd(["ip", "-o", "link", "show"], check=False)
    names = [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]
    return [n for n in names if _HOST_DEV_RE.fullmatch(n)]


def _remove(netns: str | None, host_dev: str | None) -> None:
    """Kill what still runs in ``netns``, delete it and the root end of its veth (if any)."""
    if netns and netns in _netns_names():
        for _ in range(3):
            pids = [int(p) for p in _cmd(["ip", "netns", "pids", netns], check=False).split()]
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        _cmd(["ip", "netns", "del", netns], check=False)
    if host_dev and host_dev in _host_devs():
        _cmd(["ip", "link", "del", host_dev], check=False)


def _cleanup_stale(own: str | None = None) -> list[str]:
    """Remove links whose owner is gone, and unrecorded ``lzc-*`` namespaces and veths.

    Raises if ``own`` (a link name about to be built) belongs to a live owner. Call locked.
    """
    removed: list[str] = []
    live_ns: set[str] = set()
    live_devs: set[str] = set()
    for record in _read_states():
        name = str(record.get("name"))
        if _alive(record):
            if name == own:
                raise RuntimeError(f"link {name!r} is in use by pid {record['pid']}")
            live_ns.add(str(record.get("netns")))
            live_devs.add(str(record.get("host_dev")))
            continue
        _remove(record.get("netns"), record.get("host_dev"))
        _state_path(name).unlink(missing_ok=True)
        removed.append(str(record.get("netns", name)))
    for ns in _netns_names():
        if ns.startswith(NETNS_PREFIX) and ns not in live_ns:
            _remove(ns, None)
            removed.append(ns)
    for dev in _host_devs():
        if dev not in live_devs:
            _remove(None, dev)
            removed.append(dev)
    return removed


def _free_subnet() -> int:
    used = {int(r["n"]) for r in _read_states() if isinstance(r.get("n"), int)}
    nets = []
    for line in _cmd(["ip", "-4", "-o", "addr", "show"]).splitlines():
        with contextlib.suppress(ValueError, IndexError):
            nets.append(ipaddress.ip_interface(line.split()[3]).network)
    for line in _cmd(["ip", "-4", "route", "show", "table", "all"]).splitlines():
        dst = line.split()[0] if line.split() else ""
        if dst not in ("default", "") and not dst.startswith(("broadcast", "local")):
            with contextlib.suppress(ValueError):
                nets.append(ipaddress.ip_network(dst, strict=False))
    for n in _SUBNETS:
        mine = ipaddress.ip_network(f"10.77.{n}.0/30")
        if n not in used and not any(mine.overlaps(net) for net in nets if net.prefixlen >= 8):
            return n
    raise RuntimeError("no free 10.77.N.0/30 subnet for a link")


# --------------------------------------------------------------------------------------------
# The delay-line proxy (a subprocess: `netsim.py _proxy ...`), one asyncio loop on select():
# epoll/poll timeouts have 1 ms granularity, select's are microseconds.


class _Direction:
    """Bytes one side sent, released to the other side ``delay`` seconds after they arrived."""

    def __init__(self, conn: _Conn, not_before: float) -> None:
        self.conn = conn
        self.not_before = not_before
        self.queue: deque[tuple[float, bytes | None]] = deque()  # (due, data); None is EOF
        self.buffered = 0
        self.timer: asyncio.TimerHandle | None = None
        self.src: asyncio.Transport | None = None
        self.dst: asyncio.Transport | None = None
        self.dst_paused = False
        self.reading_paused = False
        self.ended = False  # EOF pushed (or the source is gone)
        self.done = False  # EOF delivered (or the destination is gone)

    def push(self, data: bytes | None) -> None:
        if self.ended:
            return
        self.ended = data is None
        loop = self.conn.loop
        self.queue.append((max(loop.time() + self.conn.delay, self.not_before), data))
        self.buffered += len(data or b"")
        self.schedule()
        self.update_reading()

    def schedule(self) -> None:
        if self.timer is None and self.queue and self.dst is not None and not self.done:
            # Timed waits wake late (~0.1-0.2 ms on a VM): aim that much early.
            when = self.queue[0][0] - self.conn.early
            self.timer = self.conn.loop.call_at(when, self.flush)

    def flush(self) -> None:
        self.timer = None
        assert self.dst is not None
        now = self.conn.loop.time() + self.conn.early
        chunks: list[bytes] = []
        eof = False
        while self.queue and self.queue[0][0] <= now:
            data = self.queue.popleft()[1]
            if data is None:
                eof = True
                break
            chunks.append(data)
            self.buffered -= len(data)
        if chunks:
            self.dst.writelines(chunks)
        if eof:
            self.done = True
            if self.dst.can_write_eof():
                with contextlib.suppress(OSError):  # the other end already went away
                    self.dst.write_eof()
            self.conn.check_done()
        self.schedule()
        self.update_reading()

    def update_reading(self) -> None:
        pause = self.dst_paused or self.buffered >= self.conn.limit
        if self.src is None or pause == self.reading_paused or self.src.is_closing():
            return
        self.reading_paused = pause
        if pause:
            self.src.pause_reading()
        else:
            self.src.resume_reading()

    def drop(self) -> None:
        """The destination is gone: discard what is queued for it."""
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.queue.clear()
        self.buffered = 0


class _Side(asyncio.Protocol):
    """One socket of a proxied connection: feeds ``out``, is written to by ``into``."""

    def __init__(self, conn: _Conn, out: _Direction, into: _Direction) -> None:
        self.conn, self.out, self.into = conn, out, into
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.set_write_buffer_limits(high=1 << 20)
        self.out.src = transport
        self.into.dst = transport
        self.out.update_reading()
        self.into.schedule()

    def data_received(self, data: bytes) -> None:
        self.out.push(data)

    def eof_received(self) -> bool:
        self.out.push(None)
        return True  # half-close: keep sending the other direction

    def connection_lost(self, exc: Exception | None) -> None:
        self.out.push(None)
        self.into.drop()
        self.conn.check_done()

    def pause_writing(self) -> None:
        self.into.dst_paused = True
        self.into.update_reading()

    def resume_writing(self) -> None:
        self.into.dst_paused = False
        self.into.update_reading()


class _Conn:
    """A client connection from the namespace and its connection to the target."""

    def __init__(self, loop: asyncio.AbstractEventLoop, args: argparse.Namespace) -> None:
        self.loop = loop
        self.delay = args.delay_ms / 1000
        self.early = args.early
        self.limit = args.buffer
        accepted = loop.time()
        # Handshake emulation: a real connect costs 1 RTT (2 delays) before the client can
        # send, so its first bytes reach the server 3 delays after the SYN, and the server's
        # first bytes reach the client 4 delays after it.
        hs = 0.0 if args.no_handshake else self.delay
        self.up = _Direction(self, accepted + 3 * hs)
        self.down = _Direction(self, accepted + 4 * hs)
        self.client = _Side(self, self.up, self.down)
        self.server = _Side(self, self.down, self.up)
        loop.create_task(self.connect(args.target, args.target_port))

    async def connect(self, host: str, port: int) -> None:
        try:
            await self.loop.create_connection(lambda: self.server, host, port)
        except OSError:
            self.up.drop()
            if self.client.transport is not None:
                self.client.transport.abort()

    def check_done(self) -> None:
        """Close both sockets once both directions have delivered their EOF."""
        if self.up.done and self.down.done:
            for side in (self.client, self.server):
                if side.transport is not None:
                    side.transport.close()  # after writing what is buffered


def _wake_latency() -> float:
    """Median lateness of a 1 ms select() timeout here."""
    late = []
    for _ in range(15):
        start = time.monotonic()
        select.select([], [], [], 0.001)
        late.append(time.monotonic() - start - 0.001)
    return max(statistics.median(late), 0.0)


def _run_proxy(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the owner, who stops us
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(29, 1, 0, 0, 0)  # PR_SET_TIMERSLACK: 1 ns
    # Timers fire late by the wake-up latency: aim early by it, but by at most 0.2 ms and a
    # quarter of the delay, so that a busy machine never makes the link faster than asked.
    args.early = min(_wake_latency(), 0.0002, args.delay_ms / 4000)
    loop = asyncio.SelectorEventLoop(selectors.SelectSelector())

    def on_stdin() -> None:  # the owner closed our stdin (or died): exit
        if not os.read(0, 4096):
            loop.stop()

    def new_side() -> _Side:
        return _Conn(loop, args).client

    loop.add_reader(0, on_stdin)
    server = loop.run_until_complete(loop.create_server(new_side, args.listen, 0, backlog=256))
    print(server.sockets[0].getsockname()[1], flush=True)
    loop.run_forever()
    return 0


# --------------------------------------------------------------------------------------------
# CLI: check, up, cleanup


class _Handler(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    disable_nagle_algorithm = True  # TCP_NODELAY (see MEASUREMENTS.md)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def copyfile(self, source: Any, outputfile: Any) -> None:
        self.wfile.flush()
        self.connection.sendfile(source)


@contextlib.contextmanager
def _http_server(bind: str, directory: Path) -> Iterator[int]:
    handler = functools.partial(_Handler, directory=str(directory))
    server = http.server.ThreadingHTTPServer((bind, 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


_PY_CLIENT: Final = r"""
import http.client, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
conn = http.client.HTTPConnection(host, port, timeout=60)
for _ in range(n):
    t = time.perf_counter()
    conn.request("GET", "/tiny")
    conn.getresponse().read()
    print("rtt", time.perf_counter() - t)
conn.close()
t, size = time.perf_counter(), 0
conn = http.client.HTTPConnection(host, port, timeout=60)
conn.request("GET", "/big")
resp = conn.getresponse()
while chunk := resp.read(1 << 20):
    size += len(chunk)
print("big", size, time.perf_counter() - t)
"""


def _measure(link: Link, host: str, port: int, n: int) -> tuple[float, float]:
    """(median tiny-GET seconds, big-download bytes/s), measured inside the namespace."""
    base = f"http://{host}:{port}"
    if shutil.which("curl"):
        tiny = [arg for _ in range(n) for arg in (f"{base}/tiny", "-o", "/dev/null")]
        out = link.run(
            ["curl", "-sS", "--fail", "-w", "%{time_total} %{num_connects}\n", *tiny],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split("\n")
        rtts = [float(line.split()[0]) for line in out if line.strip()]
        fmt = "%{size_download} %{time_total}"
        big = link.run(
            ["curl", "-sS", "--fail", "-o", "/dev/null", "-w", fmt, f"{base}/big"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        size, secs = int(big[0]), float(big[1])
    else:
        lines = link.run(
            [sys.executable, "-c", _PY_CLIENT, host, str(port), str(n)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
        rtts = [float(line.split()[1]) for line in lines if line.startswith("rtt ")]
        _, size_s, secs_s = next(line for line in lines if line.startswith("big ")).split()
        size, secs = int(size_s), float(secs_s)
    return statistics.median(rtts), size / secs


def _cmd_check(args: argparse.Namespace) -> int:
    rate, rtt = PROFILES[args.profile]
    rate = args.rate if args.rate is not None else rate
    rtt = args.rtt if args.rtt is not None else rtt
    with tempfile.TemporaryDirectory(prefix="netsim-") as tmp:
        root = Path(tmp)
        (root / "tiny").write_bytes(b"x")
        with open(root / "big", "wb") as f:
            f.truncate(args.size_mb * 1_000_000)
        with (
            shaped_link(args.name, rate_mbit=rate, rtt_ms=rtt) as link,
            _http_server(link.host_ip, root) as port,
        ):
            addr, pport = link.proxy(link.host_ip, port)
            tool = "curl" if shutil.which("curl") else "python http.client"
            print(
                f"profile {args.profile}: tbf {rate:g} Mbit/s, delay line {rtt:g} ms RTT; "
                f"{link.netns} {link.client_ip} -> proxy {addr}:{pport} -> "
                f"{link.host_ip}:{port}; client {tool}",
                flush=True,
            )
            med, bps = _measure(link, addr, pport, args.requests)
            print(f"rtt {med * 1000:.2f} ms, throughput {bps * 8 / 1e6:.1f} Mbit/s")
            if args.direct:
                med, bps = _measure(link, link.host_ip, port, args.requests)
                print(
                    f"direct (shaped, no delay): rtt {med * 1000:.2f} ms, "
                    f"throughput {bps * 8 / 1e6:.1f} Mbit/s"
                )
    return 0


def _cmd_up(args: argparse.Namespace) -> int:
    rate, rtt = PROFILES[args.profile]
    rate = args.rate if args.rate is not None else rate
    rtt = args.rtt if args.rtt is not None else rtt
    with shaped_link(args.name, rate_mbit=rate, rtt_ms=rtt) as link:
        print(f"{link.netns}: client {link.client_ip}, host {link.host_ip}, {rate:g} Mbit/s")
        for spec in args.proxy:
            host, _, port = spec.rpartition(":")
            addr, pport = link.proxy(host, int(port))
            print(f"proxy {addr}:{pport} -> {host}:{port} ({rtt:g} ms RTT)")
        print(f"enter with: {' '.join(link.exec_prefix)} bash; Ctrl-C to remove", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
    return 0


def _cmd_cleanup(args: argparse.Namespace) -> int:
    with _locked():
        removed = _cleanup_stale()
    print("removed: " + (", ".join(removed) if removed else "nothing"))
    return 0


def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # run the cleanup of `with shaped_link(...)`


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else "")
    sub = parser.add_subparsers(dest="command", required=True)
    for cmd in ("check", "up"):
        p = sub.add_parser(cmd, help="measure a link" if cmd == "check" else "hold a link")
        p.add_argument("--profile", choices=sorted(PROFILES), default="100mbit")
        p.add_argument("--rate", type=float, help="override the profile's Mbit/s")
        p.add_argument("--rtt", type=float, help="override the profile's RTT (ms)")
        p.add_argument("--name", default=cmd, help="namespace is lzc-NAME")
        if cmd == "check":
            p.add_argument("--size-mb", type=int, default=50, help="download size (MB)")
            p.add_argument("--requests", type=int, default=20, help="tiny GETs for the RTT")
            p.add_argument("--direct", action="store_true", help="also measure without proxy")
        else:
            p.add_argument("--proxy", action="append", default=[], metavar="HOST:PORT")
    sub.add_parser("cleanup", help="remove links whose owner process is gone")
    p = sub.add_parser("_proxy", help=argparse.SUPPRESS)
    p.add_argument("--listen", required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--target-port", type=int, required=True)
    p.add_argument("--delay-ms", type=float, required=True)
    p.add_argument("--buffer", type=int, default=4 << 20)
    p.add_argument("--no-handshake", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "_proxy":
        return _run_proxy(args)
    if os.geteuid() != 0:
        parser.error("needs root (ip netns, tc)")
    signal.signal(signal.SIGTERM, _sigterm)
    commands = {"check": _cmd_check, "up": _cmd_up, "cleanup": _cmd_cleanup}
    try:
        return commands[args.command](args)
    except KeyboardInterrupt:
        print("interrupted; link removed", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
