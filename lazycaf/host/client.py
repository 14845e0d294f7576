"""The client of the local fetcher daemon's Unix socket, and starting a daemon on demand.

Mounts never import ``fetcher``: they talk to the daemon through this client. When no daemon
serves a cache, ``ensure_daemon`` starts one (``lazycaf fetcher serve``) detached, as
sccache starts its server, and waits until its socket answers: unless a service runs the
cache's daemon (``lazycaf.host.service``), or ``$LAZYCAF_NO_AUTOSTART`` is set.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Final

import trio

from lazycaf.core.digest import Digest
from lazycaf.core.errors import (
    BlobNotFound,
    LazyCafError,
    NotFound,
    Unavailable,
    UsageError,
    first_error,
)
from lazycaf.core.priority import Priority
from lazycaf.host.defaults import FETCH_TIMEOUT
from lazycaf.host.paths import CacheLayout
from lazycaf.host.service import (
    NO_AUTOSTART_ENV,
    autostart_disabled,
    service_marker,
    service_unit,
)
from lazycaf.host.wire import LineReader, parse_reply

__all__ = [
    "daemon_budget",
    "DaemonUnreachable",
    "FetcherClient",
    "SERVICE_WAIT",
    "ensure_daemon",
    "socket_answers",
]

_START_TIMEOUT: Final = 20.0
SERVICE_WAIT: Final = 10.0  # a service being restarted (stop drains the zygote: up to 8 s)
ENSURE_BATCH: Final = 65536  # digests ``ensure_all`` holds at once: memory bounded by it
ENSURE_MANY: Final = 128  # blobs per ``ensure_many`` request ...
ENSURE_BYTES: Final = 16 << 20  # ... and bytes, where known: the daemon holds them at once
ENSURE_REQUESTS: Final = 4  # ``ensure_many`` requests in flight


class DaemonUnreachable(Unavailable):
    """The daemon's socket refused, reset or closed a connection: it is not running."""


class FetcherClient:
    """Async client of one daemon with a pool of connections; errors come back typed."""

    def __init__(self, socket_path: Path, *, timeout: float = FETCH_TIMEOUT) -> None:
        self.socket_path = socket_path
        self._timeout = timeout
        self._idle: list[tuple[trio.SocketStream, LineReader]] = []
        self._one_by_one = False  # the daemon does not know ``ensure_many``

    async def _connect(self) -> tuple[trio.SocketStream, LineReader]:
        try:
            stream = await trio.open_unix_socket(str(self.socket_path))
        except OSError as exc:
            raise DaemonUnreachable(
                f"fetcher daemon ({self.socket_path}) unreachable: {exc.strerror or exc}"
            ) from exc
        return stream, LineReader(stream)

    async def _call(self, request: str) -> Any:
        return parse_reply(await self._exchange(request))

    async def _exchange(self, request: str) -> bytes:
        """Send one request line and return the reply line as it came."""
        conn = self._idle.pop() if self._idle else await self._connect()
        try:
            with trio.fail_after(self._timeout):
                await conn[0].send_all(request.encode() + b"\n")
                line = await conn[1].readline()
        except trio.TooSlowError:
            await conn[0].aclose()
            raise Unavailable(
                f"fetcher daemon ({self.socket_path}) did not answer {_short(request)!r} "
                f"within {self._timeout:g} s"
            ) from None
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            await conn[0].aclose()
            raise DaemonUnreachable(f"fetcher daemon ({self.socket_path}) failed: {exc}") from exc
        except BaseException:
            with trio.CancelScope(shield=True):
                await conn[0].aclose()  # mid-exchange: the connection's state is unknown
            raise
        if line is None:
            await conn[0].aclose()
            raise DaemonUnreachable(f"fetcher daemon ({self.socket_path}) closed the connection")
        self._idle.append(conn)
        return line

    async def ensure(self, digest: Digest, *, priority: Priority = Priority.DEMAND) -> int:
        reply = await self._call(f"ensure {digest.hex} {priority.label}")
        return int(reply["size"])

    async def ensure_all(
        self,
        digests: Iterable[Digest],
        *,
        cache_root: Path | None = None,
        sizes: Mapping[Digest, int] | None = None,
        concurrency: int = ENSURE_REQUESTS,
        batch_size: int = ENSURE_BATCH,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> None:
        """Make every blob present (materialize, pin).

        Works through ``digests`` in batches of ``batch_size``: memory stays bounded by the
        batch, whatever the count. Each batch goes to the daemon in ``ensure_many`` requests
        of ``ENSURE_MANY`` blobs, at most ``concurrency`` in flight: the daemon fetches each
        with one request per source (one blob per request was ~1.6 ms a blob). ``sizes``
        (the blobs' lengths, from the manifest) also bound a request by ``ENSURE_BYTES``:
        the daemon holds a request's blobs in memory at once. With
        ``cache_root``, blobs whose file is already in that cache (a file under ``blobs/``
        has verified) are not asked for: one ``touch`` per batch keeps their place in the
        LRU. A blob the daemon cannot find anywhere stops the whole call with a
        ``BlobNotFound`` naming the first such blob in ``digests`` order; any other error
        is raised as itself, not inside an exception group. ``on_progress(done, fetched)``
        is called as blobs are known present: ``done`` of ``digests`` so far, ``fetched``
        of them through the daemon (a progress bar's callback)."""
        done = fetched = 0
        report = on_progress or (lambda done, fetched: None)

        def progress(n: int) -> None:
            nonlocal done, fetched
            done += n
            fetched += n
            report(done, fetched)

        pending = iter(digests)
        while batch := list(itertools.islice(pending, batch_size)):
            if cache_root is not None:
                present = await trio.to_thread.run_sync(_present, cache_root, batch)
                await self.touch(present)
                held = set(present)
                batch = [d for d in batch if d not in held]
                done += len(held)
                report(done, fetched)
            await self._ensure_batch(_parts(batch, sizes), concurrency, progress)

    async def _ensure_batch(
        self, parts: list[list[Digest]], concurrency: int, progress: Callable[[int], None]
    ) -> None:
        """``ensure_all``'s work on one batch, in ``parts`` that ``concurrency`` workers
        share (no task per part). After a part with a blob no source
        has, no new part starts and later ones are cancelled, but earlier ones finish: the
        one raised is the first blob of the batch that is missing, whatever order the
        answers came in."""
        missing: dict[int, Digest] = {}
        in_flight: dict[int, trio.CancelScope] = {}
        todo = iter(enumerate(parts))

        async def worker() -> None:
            for i, part in todo:
                if missing:
                    return
                with trio.CancelScope() as in_flight[i]:
                    lost = await self._ensure_part(part)
                    if lost is not None:
                        missing[i] = lost
                        for j, scope in in_flight.items():
                            if j > min(missing):
                                scope.cancel()
                    else:
                        progress(len(part))
                del in_flight[i]

        try:
            async with trio.open_nursery() as nursery:
                for _ in range(min(concurrency, len(parts))):
                    nursery.start_soon(worker)
        except BaseExceptionGroup as group:
            errors, others = group.split(LazyCafError)
            if errors is None or others is not None:
                raise
            raise first_error(errors) from None
        if missing:
            raise BlobNotFound(missing[min(missing)], "the CAS")

    async def _ensure_part(self, part: list[Digest]) -> Digest | None:
        """One ``ensure_many`` request: None once every blob of ``part`` is cached, or the
        first one no source has. A daemon older than the request gets one ``ensure`` per
        blob instead."""
        if not self._one_by_one:
            try:
                reply = await self._call("ensure_many " + " ".join(d.hex for d in part))
            except UsageError as exc:
                if "unknown request" not in str(exc):
                    raise
                self._one_by_one = True
            else:
                lost = reply["missing"]
                return None if lost is None else Digest.parse(lost)
        for d in part:
            try:
                await self.ensure(d)
            except NotFound:
                return d
        return None

    async def prefetch(self, digests: list[Digest]) -> int:
        """Queue blobs for background fetching, in order; returns how many were new."""
        queued = 0
        for start in range(0, len(digests), 2000):
            batch = " ".join(d.hex for d in digests[start : start + 2000])
            queued += int((await self._call(f"prefetch {batch}"))["queued"])
        return queued

    async def record(self, name: str, trace_json: str) -> dict[str, Any]:
        """Merge one run's trace into profile ``name`` (the daemon writes it to the CAS)."""
        result: dict[str, Any] = await self._call(f"record {name} {trace_json}")
        return result

    async def prefetch_bundle(self, parts: list[tuple[Digest, list[Digest]]]) -> int:
        """Queue blobs for background fetching through the parts of a bundle that hold them
        (``lazycaf.cas.bundle``: one request a part): (part digest, its blobs wanted) in
        order; returns how many were new."""
        body = {"parts": [[part.hex, [d.hex for d in blobs]] for part, blobs in parts]}
        line = json.dumps(body, separators=(",", ":"))
        return int((await self._call(f"prefetch_bundle {line}"))["queued"])

    async def bundle(self, name: str, executable: Digest, plan: list[Digest]) -> dict[str, Any]:
        """Have profile ``name`` name a bundle of ``plan`` (its hot set on ``executable``),
        built by the daemon's CAS unless the one it names still fits."""
        line = " ".join([name, executable.hex, *(d.hex for d in plan)])
        result: dict[str, Any] = await self._call(f"bundle {line}")
        return result

    async def crowd(self) -> tuple[list[Any], int]:
        """Every profile's hot set by file digest, as rows of ``lazycaf.traces.crowd``'s
        ``CrowdFile.to_json``, and how many profiles it merges. The reply (up to a few MB of
        JSON) is parsed in a worker thread, off the mount's event loop."""
        reply = await trio.to_thread.run_sync(parse_reply, await self._exchange("crowd"))
        if not isinstance(reply, dict) or not isinstance(reply.get("files"), list):
            raise Unavailable("the fetcher daemon sent a malformed crowd reply")
        return reply["files"], int(reply.get("profiles", 0))

    async def resolve(self, ref: str, *, cached: bool = False) -> Digest:
        """The manifest digest ``ref`` names; ``cached``: the one this cache last resolved
        it to, without asking the CAS (offline)."""
        if not ref or any(c.isspace() for c in ref):
            raise UsageError(f"invalid ref {ref!r}")
        return Digest.parse(await self._call(f"resolve {ref}" + (" cached" if cached else "")))

    async def touch(self, digests: list[Digest]) -> None:
        """Tell the daemon this mount read these cached blobs (their LRU position)."""
        for start in range(0, len(digests), 2000):
            await self._call("touch " + " ".join(d.hex for d in digests[start : start + 2000]))

    async def mounted(self, executable: Digest) -> None:
        await self._call(f"mounted {executable.hex}")

    async def holds(self, executable: Digest) -> dict[str, int]:
        """How much of an executable the cache holds: blobs, bytes, missing_* of each."""
        result: dict[str, int] = await self._call(f"holds {executable.hex}")
        return result

    async def pin(self, executable: Digest, *, unpin: bool = False) -> int:
        """Add (or remove) a pin of an executable; returns its pin count."""
        return int((await self._call(f"{'unpin' if unpin else 'pin'} {executable.hex}"))["pins"])

    async def gc(self) -> dict[str, int]:
        result: dict[str, int] = await self._call("gc")
        return result

    async def verify(self, rate: int | None) -> dict[str, Any]:
        """Rehash every cached blob at most ``rate`` bytes a second (None: no limit) and
        drop the bad (``fetcher.cache.scrub``): checked, bytes, bad and which."""
        result: dict[str, Any] = await self._call(f"verify {rate or 0}")
        return result

    async def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("stats")
        return result

    async def info(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("info")
        return result

    async def aclose(self) -> None:
        while self._idle:
            await self._idle.pop()[0].aclose()

    async def drop_idle(self) -> None:
        """Forget pooled connections (after the daemon restarted they are dead)."""
        await self.aclose()


def socket_answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(str(path))
        except OSError:
            return False
        return True


def _parts(batch: list[Digest], sizes: Mapping[Digest, int] | None) -> list[list[Digest]]:
    """``batch`` cut into ``ensure_many`` requests: at most ``ENSURE_MANY`` blobs, and at
    most ``ENSURE_BYTES`` of them where their ``sizes`` are known (at least one blob)."""
    parts: list[list[Digest]] = []
    part: list[Digest] = []
    held = 0
    for d in batch:
        size = sizes.get(d, 0) if sizes is not None else 0
        if part and (len(part) >= ENSURE_MANY or held + size > ENSURE_BYTES):
            parts.append(part)
            part, held = [], 0
        part.append(d)
        held += size
    if part:
        parts.append(part)
    return parts


def _short(request: str) -> str:
    """A request as an error names it: ``ensure_many`` and ``prefetch`` lines are long."""
    verb, _, rest = request.partition(" ")
    words = rest.split(" ")
    return request if len(words) <= 2 else f"{verb} {words[0]} ... ({len(words)} digests)"


def _present(cache_root: Path, digests: list[Digest]) -> list[Digest]:
    layout = CacheLayout(cache_root)
    return [d for d in digests if os.path.exists(layout.blob(d))]


def daemon_budget(path: Path) -> int | None:
    """The byte budget of the daemon answering on ``path``, or None when none answers
    (sync, one ``stats`` exchange; for the CLI before any event loop exists)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5.0)
        try:
            s.connect(str(path))
            s.sendall(b"stats\n")
            reply = s.makefile("rb").readline()
        except OSError:
            return None
    try:
        budget = parse_reply(reply).get("budget")
    except (LazyCafError, AttributeError):
        return None
    return budget if isinstance(budget, int) else None


def ensure_daemon(
    cache_dir: Path,
    cas_spec: str | None,
    socket_path: Path,
    *,
    cache_size: int | None = None,
    service_wait: float = SERVICE_WAIT,
) -> None:
    """Start ``lazycaf fetcher serve`` for ``cache_dir`` unless one already answers (sync).

    ``cache_size`` is the new daemon's byte budget (remembered by the cache); a daemon that
    already runs keeps its own. A cache whose daemon is a service (``<cache>/fetcher.service``,
    ``lazycaf.host.service``) gets no second, unmanaged daemon: wait up to ``service_wait``
    seconds for the service's socket (a restart), then fail naming the unit. Nor does one
    start under ``$LAZYCAF_NO_AUTOSTART``. The started daemon logs to ``<cache>/fetcher.log``,
    rotated (``--log-file``)."""
    if socket_answers(socket_path):
        return
    unit = service_unit(cache_dir)
    if unit is not None:
        _wait_for_service(cache_dir, socket_path, unit, service_wait)
        return
    if autostart_disabled():
        raise Unavailable(
            f"no fetcher daemon answers on {socket_path} and {NO_AUTOSTART_ENV} is set: "
            f"start one (`lazycaf fetcher serve --cache {cache_dir}`, or its service)"
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    log_path = CacheLayout(cache_dir).log
    cmd = [sys.executable, "-m", "lazycaf", "fetcher", "serve", "--cache", str(cache_dir)]
    cmd += ["--socket", str(socket_path), "--log-file", str(log_path)]
    if cas_spec:
        cmd += ["--cas", cas_spec]
    if cache_size is not None:
        cmd += ["--cache-size", str(cache_size)]
    env = {k: v for k, v in os.environ.items() if k not in _SYSTEMD_ENV}
    with open(log_path, "ab") as log:  # what is written before logging is set up
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            env=env,
        )
    deadline = time.monotonic() + _START_TIMEOUT
    while time.monotonic() < deadline:
        if socket_answers(socket_path):
            return
        if proc.poll() is not None:
            if socket_answers(socket_path):  # lost a start race to another daemon: fine
                return
            break
        time.sleep(0.05)
    tail: list[str] = []
    with contextlib.suppress(OSError):
        tail = log_path.read_text(errors="replace").strip().splitlines()[-1:]
    raise Unavailable(
        f"could not start the fetcher daemon for {cache_dir} (log {log_path}: {' '.join(tail)})"
    )


# A daemon a mount starts is not the unit the mount may run in: it must not log to (or
# notify) that unit's journal stream or manager.
_SYSTEMD_ENV: Final = frozenset({"INVOCATION_ID", "JOURNAL_STREAM", "NOTIFY_SOCKET"})


def _wait_for_service(cache_dir: Path, socket_path: Path, unit: str, wait: float) -> None:
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        time.sleep(0.1)
        if socket_answers(socket_path):
            return
    raise Unavailable(
        f"the fetcher daemon of {cache_dir} is the service {unit}, and it is not running: "
        f"start it (`systemctl start {unit}`), or remove {service_marker(cache_dir)} to let "
        "mounts start their own"
    )
