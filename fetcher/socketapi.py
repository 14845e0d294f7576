"""The daemon's API for mounts on its Unix socket (the line protocol of ``lazycaf.wire``).

    ensure <hex> demand|prefetch  -> ok {"size": n} once the blob is in the cache
    prefetch <hex> [<hex> ...]    -> ok {"queued": n}  (fetched in order, below reads)
    record <name> <trace json>    -> ok {"profile": hex, "runs": n}  (merged into the profile)
    resolve <ref>                 -> ok "<hex>"  (the manifest digest a ref names)
    stats                         -> ok {FetchService.statistics()}
    info                          -> ok {"cache", "cas", "pid"}

Each connection is served by its own task; a failing request answers ``err`` and the
connection goes on.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import asdict
from typing import Any

import trio

from fetcher.prefetch import PrefetchQueue
from fetcher.service import DEMAND, PREFETCH, FetchService
from lazycaf.cas import resolve
from lazycaf.digest import Digest
from lazycaf.errors import LazyCafError, UsageError
from lazycaf.profiles import add_run
from lazycaf.trace import Trace
from lazycaf.wire import LineReader, error_reply, ok_reply

__all__ = ["MountApi"]

log = logging.getLogger(__name__)


class MountApi:
    def __init__(self, service: FetchService, prefetch: PrefetchQueue) -> None:
        self.service = service
        self.prefetch = prefetch
        self._profile_lock = trio.Lock()  # one read-modify-write of a profile at a time

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
                        reply = ok_reply(await self.dispatch(line.decode()))
                    except LazyCafError as exc:
                        reply = error_reply(exc)
                    await stream.send_all(reply)
        except (trio.BrokenResourceError, trio.ClosedResourceError, UnicodeDecodeError):
            pass  # a mount went away mid-exchange

    async def dispatch(self, line: str) -> Any:
        verb, _, rest = line.rstrip("\n").partition(" ")
        match verb:
            case "ensure":
                hex_digest, _, priority = rest.partition(" ")
                prio = PREFETCH if priority == "prefetch" else DEMAND
                size = await self.service.ensure(Digest.parse(hex_digest), priority=prio)
                return {"size": size}
            case "prefetch":
                digests = [Digest.parse(h) for h in rest.split()]
                return {"queued": self.prefetch.add(digests)}
            case "record":
                name, _, trace_json = rest.partition(" ")
                try:
                    trace = Trace.from_json(json.loads(trace_json))
                except (ValueError, KeyError, TypeError) as exc:
                    raise UsageError(f"malformed trace: {exc}") from None
                async with self._profile_lock:
                    digest, runs = await add_run(self.service.cas, name, trace)
                log.info("profile %s: %d runs (%s)", name, runs, digest)
                return {"profile": digest.hex, "runs": runs}
            case "resolve":
                return (await resolve(self.service.cas, rest)).hex
            case "stats":
                return asdict(self.service.statistics())
            case "info":
                return {
                    "cache": str(self.service.cache.root),
                    "cas": self.service.cas.where,
                    "pid": os.getpid(),
                }
            case _:
                raise UsageError(f"unknown request {line[:100]!r}")
