"""A mount's composition root: resolve the ref, build the inode table, serve FUSE.

``run_mount`` serves one mount in this process until it is unmounted; ``lazycaf mount``
runs it in a forked child and returns once the child reports the tree visible (or why not).

Offline (``--offline``): the ref resolves to the digest this cache last resolved it to,
the mount refuses unless every blob of the executable is cached, and it neither prefetches
nor records a trace (both need the CAS).

Ending: an unmount ends the kernel's FUSE connection, but pyfuse3's main loop returns only
once every request handler has, and a read waiting on a fetch from a slow CAS may wait up to
``--fetch-timeout``. So the mount watches the FUSE device for the end of the connection (an
error on ``/dev/fuse``: after a plain unmount, or the last close after a lazy one) and then
cancels the handlers in flight, whose answers nobody can receive any more; SIGTERM does the
same. The run's trace is then saved within ``SAVE_TIMEOUT`` seconds, or given up, and the
process exits: ``lazycaf umount`` returns within a bound whatever the fetches are doing. On
the way out the mount logs the FUSE requests it answered, by opcode (one line,
``FUSE requests by opcode: {json}``, in its log ``CACHE/logs/mount<MOUNTPOINT, / as _>.log``).

Owner (``--owner-pid``, what ``lazycaf run`` passes): the mount watches that process through
a pidfd and, once it exits, unmounts itself the same way, so a ``run`` killed by SIGKILL
leaves no mount behind.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import select
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import trio
import trio.lowlevel

from lazycaf.cas.refs import profile_name_for
from lazycaf.core.digest import Digest
from lazycaf.core.errors import NotFound, Unavailable, UsageError
from lazycaf.core.manifestindex import ManifestIndex
from lazycaf.core.sizes import format_size
from lazycaf.host.client import FetcherClient, ensure_daemon
from lazycaf.host.defaults import FETCH_TIMEOUT
from lazycaf.host.index import Index
from lazycaf.host.paths import CacheLayout
from lazycaf.mount.blobreader import BlobReader
from lazycaf.mount.indexfile import open_index
from lazycaf.mount.inodes import InodeTable
from lazycaf.mount.recording import (
    DEFAULT_EAGER_SHARE,
    MountProfile,
    load_profile,
    prefetch_own_bundle,
)
from lazycaf.traces.trace import Profile

__all__ = [
    "SAVE_TIMEOUT",
    "MountConfig",
    "check_mountpoint",
    "is_mounted",
    "mount_pid",
    "mount_pid_file",
    "run_mount",
    "runtime_dir",
]

log = logging.getLogger(__name__)
_READY_TIMEOUT: Final = 120.0
SAVE_TIMEOUT: Final = 10.0  # longest a mount on its way out spends saving its trace


@dataclass(frozen=True)
class MountConfig:
    ref: str
    mountpoint: Path
    cache_dir: Path
    socket_path: Path
    cas_spec: str | None
    fetch_timeout: float = FETCH_TIMEOUT
    readahead_kb: int = 1024
    open_roundtrips: bool = False  # answer open/opendir even when the kernel could skip them
    profile: str | None = None  # default: the ref's name without its tag (or the digest)
    prefetch: bool = True
    crowd: bool = True  # no profile: prefetch the crowd's hot set (``lazycaf.traces.crowd``)
    import_graph: bool = True  # no profile: prefetch by imports (``lazycaf.mount.importcrawl``)
    eager_share: float = DEFAULT_EAGER_SHARE
    offline: bool = False
    cache_size: int | None = None  # the byte budget of a daemon this mount starts
    record: bool = True  # merge the run's trace into the profile on the way out
    owner_pid: int | None = None  # unmount once this process exits


def is_mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def _mount_bdi(target: str) -> str | None:
    """major:minor of the mount at ``target`` (a real path: never stat inside our own mount,
    the thread that would answer is the one asking)."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == target:
                return fields[2]
    return None


def check_mountpoint(path: Path) -> str:
    """Refuse a missing, non-directory, mounted or non-empty mountpoint; its real path."""
    try:
        os.statvfs(path)  # the kernel asks the filesystem each time (attributes are cached)
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:  # a FUSE mount whose process died (kill -9)
            raise UsageError(
                f"mountpoint {path} is a mount whose process is gone (lazycaf umount it first)"
            ) from None
    if not path.exists():
        raise UsageError(f"mountpoint {path} does not exist")
    if not path.is_dir():
        raise UsageError(f"mountpoint {path} is not a directory")
    if is_mounted(path):
        raise UsageError(f"mountpoint {path} is already a mount point (lazycaf umount it first)")
    if any(path.iterdir()):
        raise UsageError(f"mountpoint {path} is not empty")
    return os.path.realpath(path)


async def _readahead_after_init(ops: Any, mountpoint: str, kb: int) -> None:
    """Set the mount's ``read_ahead_kb`` once the kernel's INIT request is answered: the
    kernel caps the bdi's readahead at the answer's ``max_readahead`` (the 128 KiB it
    offered, which libfuse keeps) while handling it, undoing any earlier setting; and the
    readahead bounds the size of every read request (a cold 1 GiB read: 8,192 requests of
    128 KiB instead of 1,024 of 1 MiB)."""
    await ops.initialized.wait()
    await trio.lowlevel.checkpoint()  # the answer is written after ``init`` returns
    await trio.to_thread.run_sync(_set_readahead, mountpoint, kb)


def _set_readahead(mountpoint: str, kb: int) -> None:
    bdi = _mount_bdi(mountpoint)
    if bdi is None:
        return
    try:
        Path(f"/sys/class/bdi/{bdi}/read_ahead_kb").write_text(str(kb))
    except OSError as exc:  # not root: the kernel default stays
        log.info("could not set read_ahead_kb of %s: %s", bdi, exc)


async def run_mount(config: MountConfig, *, ready: Callable[[str], None]) -> None:
    """Mount and serve until unmounted or signalled; ``ready(digest)`` once visible."""
    from lazycaf.mount import fuse_ops  # pyfuse3 only where a mount really runs

    real_mountpoint = await trio.to_thread.run_sync(check_mountpoint, config.mountpoint)
    if config.owner_pid is not None and not _alive(config.owner_pid):
        raise UsageError(f"owner process {config.owner_pid} does not exist")
    start_daemon = functools.partial(
        ensure_daemon,
        config.cache_dir,
        config.cas_spec,
        config.socket_path,
        cache_size=config.cache_size,
    )
    await trio.to_thread.run_sync(start_daemon)
    client = FetcherClient(config.socket_path, timeout=config.fetch_timeout + 5)
    cache = CacheLayout(config.cache_dir)
    try:
        prefetch = config.prefetch and not config.offline
        profile_name = config.profile or profile_name_for(config.ref)
        loaded = _Loaded()
        async with trio.open_nursery() as nursery:
            if prefetch and profile_name:  # the profile travels beside the manifest
                nursery.start_soon(loaded.load, client, cache, profile_name)
            digest = await client.resolve(config.ref, cached=config.offline)
            if config.offline:
                await _check_all_cached(client, digest, config.ref)
            else:
                await client.ensure(digest)
            loaded.manifest_here(digest)  # its bundle may go now: the manifest crossed
            await client.mounted(digest)
            name = f"manifest {digest}"
            name += f" (ref {config.ref!r})" if config.ref != digest.hex else ""
            load = functools.partial(open_index, cache, digest, name=name)
            manifest: ManifestIndex = await trio.to_thread.run_sync(load)
        if not profile_name:  # a bare digest: its profile is named by it
            profile_name = digest.hex
            if prefetch:
                loaded.profile = await load_profile(client, cache, profile_name)
                loaded.bundle_queued = await prefetch_own_bundle(client, loaded.profile, digest)
        table = InodeTable(manifest)
        # off the loop: opening it may wait for a daemon opening it too (``indexlock``)
        index = await trio.to_thread.run_sync(functools.partial(Index, cache.index, readonly=True))
        profile = MountProfile(
            client,
            manifest,
            digest,
            cache,
            name=profile_name,
            prefetch=prefetch,
            eager_share=config.eager_share,
            record=config.record and not config.offline,
            profile=loaded.profile,
            crowd=config.crowd,
            import_graph=config.import_graph,
            bundle_queued=loaded.bundle_queued,
            mountpoint=real_mountpoint,
        )
        reader = BlobReader(
            cache,
            index,
            client,
            chunk_size=manifest.chunk_size,
            timeout=config.fetch_timeout,
            observer=profile,
            restart_daemon=start_daemon,
        )
        await profile.queue_hot_set()
        skip_open = fuse_ops.can_skip_open() and not config.open_roundtrips
        ops = fuse_ops.LazyOperations(table, reader, skip_open=skip_open)
        options = {"fsname=lazycaf", "subtype=lazycaf", "ro", "nosuid", "nodev"}
        options |= {"default_permissions"}
        if os.getuid() == 0:
            options.add("allow_other")
        fuse_ops.fuse_init(ops, real_mountpoint, options)
        pid_file = mount_pid_file(real_mountpoint)
        try:
            log.info("mounted %s (%d entries) at %s", digest, len(table), config.mountpoint)
            await trio.to_thread.run_sync(_write_pid_file, pid_file)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_readahead_after_init, ops, real_mountpoint, config.readahead_kb)
                await nursery.start(profile.run)
                nursery.start_soon(reader.report_touches)
                ready(digest.hex)
                with trio.CancelScope() as serving:  # cancelled: drop the requests in flight

                    def stop_serving() -> None:
                        fuse_ops.fuse_terminate()
                        serving.cancel()

                    nursery.start_soon(_handle_signals, stop_serving, profile.save)
                    nursery.start_soon(_cancel_when_disconnected, serving.cancel)
                    if config.owner_pid is not None:
                        nursery.start_soon(_stop_when_exited, config.owner_pid, stop_serving)
                    await fuse_ops.fuse_main()
                nursery.cancel_scope.cancel()
        finally:
            fuse_ops.fuse_close(unmount=True)
            reader.close()
            requests = json.dumps(dict(sorted(ops.requests.items())), separators=(",", ":"))
            log.info("FUSE requests by opcode: %s", requests)
            with trio.CancelScope(shield=True):
                await _save_bounded(profile)  # plans the next run's bundle on the index
            index.close()
            pid_file.unlink(missing_ok=True)
    finally:
        with trio.CancelScope(shield=True):
            await client.aclose()


async def _save_bounded(profile: MountProfile) -> None:
    with trio.move_on_after(SAVE_TIMEOUT) as scope:
        await profile.save()
    if scope.cancelled_caught:
        log.warning("the run's trace was not saved within %g s: given up", SAVE_TIMEOUT)


def _fuse_device_fd() -> int | None:
    """This process's ``/dev/fuse`` descriptor (a mount process serves one mount)."""
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                return int(name)
        except OSError:  # closed meanwhile (the listing's own descriptor, for one)
            continue
    return None


async def _cancel_when_disconnected(cancel: Callable[[], None]) -> None:
    """Call ``cancel`` once the kernel has ended this mount's FUSE connection.

    The device reports an error (``EPOLLERR``) exactly then: after an unmount, or after the
    last file closed following a lazy one. An epoll set holding the device with no events
    asked becomes readable only for that, so the wait costs nothing while the mount serves
    (requests waiting make the device readable, which the set does not ask about).
    """
    fd = _fuse_device_fd()
    if fd is None:
        log.warning("no /dev/fuse descriptor found: reads in flight delay the unmount")
        return
    watch = select.epoll()
    try:
        watch.register(fd, 0)  # EPOLLERR and EPOLLHUP are always reported
        while not watch.poll(0):
            await trio.lowlevel.wait_readable(watch.fileno())
    finally:
        watch.close()
    log.info("the FUSE connection ended: cancelling the requests in flight")
    cancel()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


async def _stop_when_exited(pid: int, stop: Callable[[], None]) -> None:
    """Call ``stop`` once process ``pid`` (the mount's owner) has exited. A pidfd, not the
    pid, is waited on: it cannot come to mean another process once that pid is reused."""
    try:
        pidfd: int | None = os.pidfd_open(pid)
    except ProcessLookupError:  # gone already
        pidfd = None
    if pidfd is not None:
        try:
            await trio.lowlevel.wait_readable(pidfd)  # readable once the process exits
        finally:
            os.close(pidfd)
    log.info("owner process %d exited: unmounting", pid)
    stop()


class _Loaded:
    """The profile a mount loads beside its manifest, and the blobs of the profile's own
    bundle asked for once both are here (``prefetch_own_bundle``)."""

    def __init__(self) -> None:
        self.profile: Profile | None = None
        self.bundle_queued: int | None = None
        self._executable: Digest | None = None
        self._manifest = trio.Event()

    def manifest_here(self, digest: Digest) -> None:
        self._executable = digest
        self._manifest.set()

    async def load(self, client: FetcherClient, cache: CacheLayout, name: str) -> None:
        """Load the profile; once the manifest is in the cache too (the bundle must not
        share the link with it), ask for the profile's bundle if it was planned on this
        tree."""
        self.profile = await load_profile(client, cache, name)
        await self._manifest.wait()
        assert self._executable is not None
        self.bundle_queued = await prefetch_own_bundle(client, self.profile, self._executable)


async def _check_all_cached(client: FetcherClient, digest: Digest, ref: str) -> None:
    """Offline: refuse, saying what is missing, unless the whole executable is cached."""
    try:
        held = await client.holds(digest)
    except NotFound:
        raise Unavailable(
            f"offline: the manifest of {ref} ({digest.short}) is not in the cache; "
            "mount it once without --offline (or `lazycaf cache pin` it)"
        ) from None
    if held["missing_blobs"]:
        raise Unavailable(
            f"offline: {held['missing_blobs']} of {held['blobs']} blobs "
            f"({format_size(held['missing_bytes'])} of {format_size(held['bytes'])}) of {ref} "
            "are not in the cache; mount without --offline to fetch them "
            "(or `lazycaf cache pin` it while online)"
        )


async def _handle_signals(
    terminate: Callable[[], None], save: Callable[[], Awaitable[None]]
) -> None:
    """SIGTERM/SIGINT/SIGHUP unmount; SIGUSR1 saves the run's trace now (profile save)."""
    stop = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    with trio.open_signal_receiver(*stop, signal.SIGUSR1) as signals:
        async for signum in signals:
            if signum == signal.SIGUSR1:
                await save()
                continue
            log.info("unmounting on signal %d", signum)
            terminate()
            return


def runtime_dir() -> Path:
    """Where mounts leave their pid files: /run/lazycaf for root, else a per-user dir."""
    if os.getuid() == 0:
        return Path("/run/lazycaf")
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/lazycaf-{os.getuid()}"
    return Path(base) / "lazycaf"


def mount_pid_file(real_mountpoint: str) -> Path:
    return runtime_dir() / ("mount" + real_mountpoint.replace("%", "%25").replace("/", "%2F"))


def _write_pid_file(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.write_text(f"{os.getpid()}\n")


def mount_pid(mountpoint: Path) -> int | None:
    """The pid of the process serving the lazycaf mount at ``mountpoint``, if known."""
    try:
        pid = int(mount_pid_file(os.path.realpath(mountpoint)).read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    return pid
