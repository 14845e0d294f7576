"""The fetcher daemon's composition root: one per host cache.

Holds ``<cache>/fetcher.lock`` for its lifetime (a second daemon for the same cache exits at
once), reconciles the cache, then serves mounts on ``<cache>/fetcher.sock`` until SIGTERM,
with GC and the compactor (what was written plain, compressed once fetching goes quiet:
``fetcher.cache.compactor``) as background services. With ``PeerOptions`` it also serves
its cache to other hosts' daemons over HTTP (``fetcher.daemon.peerapp``) and fetches its
misses from theirs (``fetcher.fetching.sources``), re-reading the peer list file every
second.
Beside it runs the host's mount zygote (``fetcher.daemon.zygote_keeper``). With
``metrics_listen`` it serves its Prometheus metrics (``fetcher.daemon.metrics``) on
``GET /metrics`` at that address; the peer listener serves them too.
Under a ``Type=notify`` unit it sends ``READY=1`` once everything is up and its socket
accepts, and ``STOPPING=1`` on the way out (``lazycaf.host.service``).
``collect_without_daemon`` runs one GC pass on a cache no daemon serves, holding the same
lock (LMDB allows one writer); ``verify_without_daemon`` scrubs it the same way.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import ipaddress
import logging
import os
import secrets
import signal
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import trio

from fetcher.cache.blobcache import BlobCache
from fetcher.cache.collector import GarbageCollector, GcResult, collect_once, resolve_policy
from fetcher.cache.compactor import Compactor
from fetcher.cache.policy import GcPolicy
from fetcher.cache.scrub import Scrubbed, scrub
from fetcher.daemon.metrics import daemon_registry
from fetcher.daemon.mountapi import MountApi
from fetcher.daemon.peerapp import PeerApp
from fetcher.daemon.zygote_keeper import keep_zygote
from fetcher.fetching.peersource import PeerSources
from fetcher.fetching.prefetch import PEER_WORKERS, WORKERS, PrefetchQueue
from fetcher.fetching.service import FetchService
from fetcher.fetching.sources import CasSource, TieredSource
from fetcher.peers.peerset import PeerSet, check_address
from fetcher.web.asgi import ServerTls, bind_socket, serve_app
from fetcher.web.metrics import MetricsApp
from lazycaf.cas.api import open_cas
from lazycaf.core.errors import LazyCafError, UsageError
from lazycaf.host.defaults import PEER_TIMEOUT
from lazycaf.host.paths import CacheLayout, fetcher_socket, zygote_disabled
from lazycaf.host.service import (
    DEFAULT_FETCHER_UNIT,
    current_unit,
    notify,
    write_service_marker,
)

__all__ = [
    "DaemonRunning",
    "GcOptions",
    "PeerOptions",
    "collect_without_daemon",
    "run_daemon",
    "stop_daemon",
    "verify_without_daemon",
]

log = logging.getLogger(__name__)

_RECENT_BUDGET: Final = (
    256 << 20
)  # zstd payloads kept in memory for peers (fetcher.fetching.recent)


class DaemonRunning(LazyCafError):
    exit_code = 0


@dataclass(frozen=True)
class GcOptions:
    """Given on the command line; None keeps what the cache remembers (or the default)."""

    cache_size: int | None = None
    high: float | None = None
    low: float | None = None


@dataclass(frozen=True)
class PeerOptions:
    """``listen``: serve peers on HOST:PORT (port 0 picks one); ``advertise``: the address
    peers reach this daemon at, as the peer list writes it (default: the bound address);
    ``peers_file``: the peer list; ``token``: the bearer token peers share; ``timeout``: the
    bound on one request to a peer, in seconds; ``tls``: serve the listener over https;
    ``client_tls``: reach the peers over https (one cluster speaks one scheme)."""

    listen: str | None = None
    advertise: str | None = None
    peers_file: Path | None = None
    token: str | None = None
    timeout: float = PEER_TIMEOUT
    tls: ServerTls | None = None
    client_tls: bool = False

    @property
    def enabled(self) -> bool:
        return self.listen is not None or self.peers_file is not None


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DaemonRunning(f"a fetcher daemon already serves {lock_path.parent}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)


def _unix_socket(path: Path) -> socket.socket:
    """The daemon's socket, bound but not listening yet: a client's connect is refused until
    the daemon can take a signal (``run_daemon`` listens once ``_stop_on_signals`` runs)."""
    if len(os.fsencode(path)) > 100:
        raise UsageError(f"socket path too long for AF_UNIX: {path}")
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # stale: we hold the lock, so no live daemon owns it
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    os.chmod(path, 0o660)
    return sock


async def run_daemon(
    cache_root: Path,
    cas_spec: str | None,
    socket_path: Path | None = None,
    *,
    gc_options: GcOptions = GcOptions(),
    peer_options: PeerOptions = PeerOptions(),
    zygote: bool = True,
    metrics_listen: str | None = None,
    cacert: Path | None = None,
    task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``cache_root`` until cancelled or signalled; ``zygote``: keep a mount zygote
    beside the daemon (``lazycaf.cli.zygote``) so mounts skip Python's imports;
    ``metrics_listen``: serve ``GET /metrics`` on HOST:PORT; ``cacert``: the CA bundle an
    https CAS and https peers must chain to (``lazycaf.cas.tls``)."""
    await trio.to_thread.run_sync(functools.partial(cache_root.mkdir, parents=True, exist_ok=True))
    socket_path = socket_path or fetcher_socket(cache_root)
    with _exclusive(CacheLayout(cache_root).lock), contextlib.ExitStack() as sockets:
        cache = await trio.to_thread.run_sync(BlobCache, cache_root)
        sockets.callback(cache.close)
        sockets.callback(cache.index.sync)
        peer_sock = bind_socket(peer_options.listen) if peer_options.listen else None
        if peer_sock is not None:
            sockets.callback(peer_sock.close)
        metrics_sock = bind_socket(metrics_listen) if metrics_listen else None
        if metrics_sock is not None:
            sockets.callback(metrics_sock.close)
        peers = _peer_set(peer_options, peer_sock) if peer_options.enabled else None
        instance = secrets.token_hex(8)  # peers tell this daemon apart from its aliases
        rec = await trio.to_thread.run_sync(cache.reconcile)
        log.info("cache %s reconciled: %s", cache_root, rec)
        policy = await trio.to_thread.run_sync(_policy, cache, gc_options)
        source = TieredSource(
            # prefetch has its own connection pool: reads never queue behind it
            CasSource(open_cas(cas_spec, cacert=cacert), open_cas(cas_spec, cacert=cacert)),
            peers=peers,
            peer_sources=None
            if peers is None
            else PeerSources(
                token=peer_options.token,
                timeout=peer_options.timeout,
                instance=instance,
                tls=peer_options.client_tls,
                cacert=cacert,
            ),
        )
        api: list[MountApi] = []
        gc = GarbageCollector(cache, policy, lambda: api[0].hot_set() if api else set())
        recent = _RECENT_BUDGET if peer_sock is not None else 0
        service = FetchService(cache, source, gc=gc, recent_budget=recent)
        prefetch = PrefetchQueue(
            service,
            batch=_prefetch_batch(peers),
            workers=PEER_WORKERS if peers is not None else WORKERS,
        )
        api.append(MountApi(service, prefetch, gc, peers=peers))
        registry = daemon_registry(service, gc, peers)
        sock = _unix_socket(socket_path)
        sockets.callback(_remove_socket, socket_path)
        sockets.callback(sock.close)
        try:
            async with trio.open_nursery() as nursery:
                # SIGTERM handled before anyone can connect: a daemon stopped right after
                # it answered would otherwise die of the signal's default action, unlogged
                await nursery.start(_stop_on_signals, nursery.cancel_scope)
                sock.listen(1024)
                await nursery.start(service.run)
                await nursery.start(prefetch.run)
                await nursery.start(gc.run)
                await nursery.start(Compactor(cache, service.busy).run)
                await nursery.start(api[0].serve, sock)
                nursery.start_soon(_flush_periodically, service)
                if zygote and not zygote_disabled():
                    await nursery.start(keep_zygote, socket_path)
                if peers is not None:
                    nursery.start_soon(_reload_peers_periodically, peers)
                if peer_sock is not None and peers is not None:
                    app = PeerApp(
                        service,
                        peers,
                        token=peer_options.token,
                        instance=instance,
                        registry=registry,
                    )
                    serve = functools.partial(serve_app, tls=peer_options.tls)
                    await nursery.start(serve, app, peer_sock)
                if metrics_sock is not None:
                    await nursery.start(serve_app, MetricsApp(registry), metrics_sock)
                gc.notice_commit()  # over the high watermark already (a smaller budget)
                log.info(
                    "fetcher daemon serving %s on %s (CAS %s; cache %d of %d bytes; peers %s)",
                    cache_root,
                    socket_path,
                    source.cas.where,
                    cache.usage,
                    policy.budget,
                    "off" if peers is None else f"{len(peers)} as {peers.self_address}",
                )
                task_status.started(socket_path)
                _notify_ready(cache_root)
        finally:
            notify("STOPPING=1")
            await source.aclose()


def _notify_ready(cache_root: Path) -> None:
    """Tell systemd (``Type=notify``) the socket accepts; a daemon a unit runs marks the cache
    as the service's, so mounts never start a second daemon beside it."""
    if os.environ.get("NOTIFY_SOCKET"):  # marked first: a unit ready is a unit that owns it
        write_service_marker(cache_root, current_unit() or DEFAULT_FETCHER_UNIT)
    notify(f"READY=1\nSTATUS=serving {cache_root}")


def _prefetch_batch(peers: PeerSet | None) -> Callable[[], int]:
    """Blobs per prefetch group: 8, or with peers 8 per member up to 64: a group is split by
    home, and a request per home for one or two blobs costs more CPU than the bytes do
    (measured with 8 daemons: 64 cut peers' CPU time by a quarter against 8)."""
    if peers is None:
        return lambda: 8
    return lambda: 8 * max(1, min(len(peers), 8))


def _remove_socket(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _peer_set(options: PeerOptions, sock: socket.socket | None) -> PeerSet:
    advertise = options.advertise
    if advertise is None and sock is not None:
        host, port = sock.getsockname()[:2]
        if host in ("0.0.0.0", "::"):
            raise UsageError(
                f"--peer-listen {options.listen} binds every address: "
                "give --peer-advertise HOST:PORT, the address peers reach this host at"
            )
        advertise = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if sock is not None and options.token is None:
        # On loopback too: every local user (and every container sharing the network
        # namespace) reaches it.
        loopback = ipaddress.ip_address(sock.getsockname()[0]).is_loopback
        log.warning(
            "serving peers on %s without --peer-token-file: %s can read this cache and make "
            "this daemon fetch blobs into it",
            options.listen,
            "every local user" if loopback else "anyone who reaches it",
        )
    if options.peers_file is not None and not options.peers_file.exists():
        raise UsageError(f"peer list {options.peers_file} does not exist")
    return PeerSet(
        self_address=check_address(advertise) if advertise else None, path=options.peers_file
    )


async def _reload_peers_periodically(peers: PeerSet) -> None:
    while True:
        await trio.sleep(1.0)
        await trio.to_thread.run_sync(peers.reload)


def _policy(cache: BlobCache, options: GcOptions) -> GcPolicy:
    return resolve_policy(
        cache.index, cache.root, budget=options.cache_size, high=options.high, low=options.low
    )


async def _flush_periodically(service: FetchService) -> None:
    """Batch the durability of new blobs (one syncfs a second instead of an fsync a blob)
    and the access times of blobs read (one transaction a second)."""
    cache = service.cache
    try:
        while True:
            await trio.sleep(1.0)
            touched = service.take_touched()
            try:
                await trio.to_thread.run_sync(cache.flush, touched)
            except (LazyCafError, OSError) as exc:  # a full disk: retried next second
                log.warning("cache flush failed: %s", exc)
                service.touch(list(touched))
    finally:
        with trio.CancelScope(shield=True):
            try:
                await trio.to_thread.run_sync(cache.flush, service.take_touched())
            except (LazyCafError, OSError) as exc:  # the next start reconciles
                log.warning("final cache flush failed: %s", exc)


def collect_without_daemon(
    cache_root: Path,
    options: GcOptions = GcOptions(),
    *,
    on_batch: Callable[[int, int], None] = lambda evicted, of: None,
) -> GcResult:
    """One GC pass on a cache that no daemon serves (sync), reporting like
    ``collect_once``. Raises ``DaemonRunning`` when a daemon holds the cache: ask it
    instead."""
    with _exclusive(CacheLayout(cache_root).lock):
        cache = BlobCache(cache_root)
        try:
            result = collect_once(cache, _policy(cache, options), on_batch=on_batch)
            cache.flush()
            return result
        finally:
            cache.index.sync()
            cache.close()


def verify_without_daemon(
    cache_root: Path,
    rate: int | None,
    *,
    on_blob: Callable[[int], None] = lambda nbytes: None,
) -> Scrubbed:
    """``fetcher.cache.scrub`` on a cache that no daemon serves (sync), holding its lock for
    the whole scrub (a mount started meanwhile cannot start a daemon). Raises
    ``DaemonRunning`` when a daemon holds the cache: ask it instead."""
    with _exclusive(CacheLayout(cache_root).lock):
        cache = BlobCache(cache_root)
        try:
            return scrub(cache, rate=rate, on_blob=on_blob)
        finally:
            cache.index.sync()
            cache.close()


async def _stop_on_signals(
    scope: trio.CancelScope, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        task_status.started()
        async for signum in signals:
            log.info("fetcher daemon stopping on signal %d", signum)
            notify("STOPPING=1")  # at once: stopping the zygote may take seconds
            scope.cancel()
            return


def stop_daemon(cache_root: Path, *, timeout: float = 15.0) -> int | None:
    """SIGTERM the daemon serving ``cache_root`` and wait for it to exit (sync).

    Returns its pid, or None when no daemon holds the cache's lock.
    """
    lock_path = CacheLayout(cache_root).lock
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pass
        else:
            return None  # nobody holds it: no daemon
        pid = int(os.pread(fd, 32, 0).decode().strip() or 0)
        if pid <= 0:
            return None
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        fcntl.flock(fd, fcntl.LOCK_EX)  # released when the daemon exits
        return pid
    finally:
        os.close(fd)
