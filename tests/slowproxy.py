"""A TCP proxy for tests that holds every chunk from the server for a fixed delay: a slow
CAS link (latency, not a mock: the real server answers behind it)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import trio


async def _pipe(src: trio.SocketStream, dst: trio.SocketStream, delay: float) -> None:
    try:
        while data := await src.receive_some(65536):
            await trio.sleep(delay)
            await dst.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await dst.aclose()


async def _serve(
    listener: socket.socket, target: tuple[str, int], delay: float, stop: trio.Event
) -> None:
    async def handle(client: trio.SocketStream) -> None:
        try:
            server = await trio.open_tcp_stream(*target)
        except OSError:
            await client.aclose()
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_pipe, client, server, 0)
            nursery.start_soon(_pipe, server, client, delay)

    async with trio.open_nursery() as nursery:
        listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(listener))]
        nursery.start_soon(trio.serve_listeners, handle, listeners)
        await stop.wait()
        nursery.cancel_scope.cancel()


@contextmanager
def slow_proxy(target_url: str, delay: float) -> Iterator[str]:
    """Yield a URL that reaches ``target_url`` with ``delay`` seconds added to each response
    chunk. The proxy runs in its own thread and stops on exit."""
    host, port = target_url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    token: list[trio.lowlevel.TrioToken] = []
    stop: list[trio.Event] = []

    async def main() -> None:
        token.append(trio.lowlevel.current_trio_token())
        stop.append(trio.Event())
        await _serve(sock, (host, int(port)), delay, stop[0])

    thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
    thread.start()
    while not stop:
        time.sleep(0.01)
    try:
        yield url
    finally:
        trio.from_thread.run_sync(stop[0].set, trio_token=token[0])
        thread.join(10)
        sock.close()
