"""The daemon's API for mounts on its Unix socket (the line protocol of ``lazycaf.wire``).

    ensure <hex> demand|prefetch  -> ok {"size": n} once the blob is in the cache
    resolve <ref>                 -> ok "<hex>"  (the manifest digest a ref names)
    stats                         -> ok {FetchService.statistics()}
    info                          -> ok {"cache", "cas", "pid"}

Each connection is served by its own task; a failing request answers ``err`` and the
connection goes on.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import asdict
from typing import Any

import trio

from fetcher.service import DEMAND, PREFETCH, FetchService
from lazycaf.cas import resolve
from lazycaf.digest import Digest
from lazycaf.errors import LazyCafError, UsageError
from lazycaf.wire import LineReader, error_reply, ok_reply

__all__ = ["MountApi"]

log = logging.getLogger(__name__)


class MountApi:
    def __init__(self, service: FetchService) -> None:
        self.service = service

    async def serve(
        self, sock: socket.socket, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._handle, [listener])
            task_status.started()

    async def _handle(self, stream: trio.SocketStream) -> None:
        reader = LineReader(stream)
        try:
            async with stream:
                while (line := await reader.readline()) is not None:
                    try:
                        reply = ok_reply(await self.dispatch(line.decode().split()))
                    except LazyCafError as exc:
                        reply = error_reply(exc)
                    await stream.send_all(reply)
        except (trio.BrokenResourceError, trio.ClosedResourceError, UnicodeDecodeError):
            pass  # a mount went away mid-exchange

    async def dispatch(self, words: list[str]) -> Any:
        match words:
            case ["ensure", hex_digest, priority]:
                prio = PREFETCH if priority == "prefetch" else DEMAND
                size = await self.service.ensure(Digest.parse(hex_digest), priority=prio)
                return {"size": size}
            case ["resolve", ref]:
                return (await resolve(self.service.cas, ref)).hex
            case ["stats"]:
                return asdict(self.service.statistics())
            case ["info"]:
                return {
                    "cache": str(self.service.cache.root),
                    "cas": self.service.cas.where,
                    "pid": os.getpid(),
                }
            case _:
                raise UsageError(f"unknown request {' '.join(words)[:100]!r}")
