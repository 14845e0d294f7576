"""A TCP proxy for tests that holds every chunk from the server for a fixed delay: a slow
CAS link (latency, not a mock: the real server answers behind it). It can also hold the
server's answers altogether until the test lets them go, so that a download is provably still
in flight while the test does something to the process waiting for it."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import trio

from tests.helpers import wait_for


@dataclass
class _Gate:
    """Open unless a test holds the answers; while closed, ``allowance`` bytes still pass (a
    piece at a time: the last may overshoot) and ``held`` counts the pieces waiting."""

    opened: trio.Event = field(default_factory=trio.Event)
    allowance: int = 0
    held: int = 0

    async def pass_through(self, size: int) -> None:
        if self.opened.is_set():
            return
        if self.allowance > 0:
            self.allowance -= size
            return
        self.held += 1
        try:
            await self.opened.wait()
        finally:
            self.held -= 1


async def _pipe(
    src: trio.SocketStream, dst: trio.SocketStream, delay: float, gate: _Gate | None
) -> None:
    try:
        while data := await src.receive_some(65536):
            await trio.sleep(delay)
            if gate is not None:
                await gate.pass_through(len(data))
            await dst.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await dst.aclose()


async def _serve(
    listener: socket.socket, target: tuple[str, int], delay: float, gate: _Gate, stop: trio.Event
) -> None:
    async def handle(client: trio.SocketStream) -> None:
        try:
            server = await trio.open_tcp_stream(*target)
        except OSError:
            await client.aclose()
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_pipe, client, server, 0, None)
            nursery.start_soon(_pipe, server, client, delay, gate)

    async with trio.open_nursery() as nursery:
        listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(listener))]
        nursery.start_soon(trio.serve_listeners, handle, listeners)
        await stop.wait()
        nursery.cancel_scope.cancel()


@dataclass
class SlowProxy:
    """A running proxy: ``url`` reaches the server. Its methods are called from the test's
    thread; the proxy runs its own trio loop in another."""

    url: str
    _token: trio.lowlevel.TrioToken
    _gate: _Gate

    def hold(self, *, after: int = 0) -> None:
        """Let about ``after`` more bytes of answers through, then keep every answer (or the
        rest of one) at the proxy until ``release``."""

        def close() -> None:
            if self._gate.opened.is_set():
                self._gate.opened = trio.Event()
            self._gate.allowance = after

        trio.from_thread.run_sync(close, trio_token=self._token)

    def release(self) -> None:
        """Let the held answers, and every later one, through."""
        trio.from_thread.run_sync(self._gate.opened.set, trio_token=self._token)

    def held(self) -> int:
        """How many answer pieces wait at the proxy now."""
        return trio.from_thread.run_sync(lambda: self._gate.held, trio_token=self._token)


@contextmanager
def slow_proxy(target_url: str, delay: float = 0.0) -> Iterator[SlowProxy]:
    """A proxy to ``target_url`` that adds ``delay`` seconds to each response chunk. It runs in
    its own thread and stops on exit, dropping whatever it still held."""
    host, port = target_url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    started: list[tuple[trio.lowlevel.TrioToken, _Gate, trio.Event]] = []

    async def main() -> None:
        gate, stop = _Gate(), trio.Event()
        gate.opened.set()
        started.append((trio.lowlevel.current_trio_token(), gate, stop))
        await _serve(sock, (host, int(port)), delay, gate, stop)

    thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
    thread.start()
    wait_for(lambda: started, "the proxy's event loop to start")
    token, gate, stop = started[0]
    try:
        yield SlowProxy(url, token, gate)
    finally:
        trio.from_thread.run_sync(stop.set, trio_token=token)
        thread.join(10)
        sock.close()
