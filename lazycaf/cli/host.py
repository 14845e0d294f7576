"""The CLI commands of a host: mount, umount, stats, the fetcher daemon, the cache."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import faulthandler
import functools
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from lazycaf.cli.progress import Bar, bar_for
from lazycaf.cli.tokens import read_token
from lazycaf.core.errors import (
    BlobNotFound,
    LazyCafError,
    NotFound,
    Unavailable,
    UsageError,
    first_error,
)
from lazycaf.core.sizes import format_size, parse_size
from lazycaf.host.client import (
    FetcherClient,
    daemon_budget,
    ensure_daemon,
    socket_answers,
)
from lazycaf.host.defaults import BULK_TIMEOUT
from lazycaf.host.paths import CacheLayout, cache_paths
from lazycaf.mount.root import (
    SAVE_TIMEOUT,
    MountConfig,
    check_mountpoint,
    is_mounted,
    mount_pid,
    run_mount,
)

if TYPE_CHECKING:
    from lazycaf.core.digest import Digest
    from lazycaf.core.manifest import Manifest
    from lazycaf.trees.materialize import MaterializeResult

__all__ = [
    "cache_init",
    "materialize",
    "fetcher_serve",
    "fetcher_stop",
    "mount",
    "mount_background",
    "stats",
    "umount",
]


def _cache_paths(args: argparse.Namespace) -> tuple[Path, Path]:
    return cache_paths(args.cache, args.socket)


def _mount_config(args: argparse.Namespace) -> MountConfig:
    cache, sock = _cache_paths(args)
    cas_spec = args.cas or None
    if cas_spec and "://" not in cas_spec:
        cas_spec = os.path.abspath(cas_spec)
    mnt = Path(os.path.abspath(args.mountpoint))
    return MountConfig(
        args.ref,
        mnt,
        cache,
        sock,
        cas_spec,
        fetch_timeout=args.fetch_timeout,
        open_roundtrips=args.open_roundtrips,
        profile=args.profile,
        prefetch=not args.no_prefetch,
        crowd=not args.no_crowd,
        import_graph=not args.no_import_graph,
        eager_share=args.eager_share,
        offline=args.offline,
        cache_size=parse_size(args.cache_size) if args.cache_size else None,
        record=not args.no_record,
        owner_pid=args.owner_pid,
    )


def _warn_if_budget_ignored(config: MountConfig) -> None:
    if config.cache_size is None:
        return
    budget = daemon_budget(config.socket_path)
    if budget is not None and budget != config.cache_size:
        print(
            f"lazycaf: warning: --cache-size ignored: the fetcher daemon of "
            f"{config.cache_dir} runs with a budget of {format_size(budget)} (restart it with "
            "`lazycaf fetcher stop`, then mount again)",
            file=sys.stderr,
        )


def mount_background(args: argparse.Namespace, run: Callable[[argparse.Namespace], int]) -> int:
    """``lazycaf mount`` without --foreground: fork a session-leader child that serves the
    mount, wait until it says the tree is visible (or why not), then return.

    Forking (before any trio loop or LMDB environment exists) instead of starting a second
    interpreter saves a whole Python start-up from mount-ready time.
    """
    config = _mount_config(args)
    check_mountpoint(config.mountpoint)
    _warn_if_budget_ignored(config)
    log_path = config.cache_dir / "logs" / f"mount{str(config.mountpoint).replace('/', '_')}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the mount process
        code = 1
        try:
            os.close(read_fd)
            os.setsid()
            log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            null_fd = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null_fd, 0)
            os.dup2(log_fd, 1)
            os.dup2(log_fd, 2)
            os.close(log_fd)
            os.close(null_fd)
            args.foreground, args.ready_fd = True, write_fd
            faulthandler.enable()  # a fatal signal leaves the Python stack in the log
            code = run(args)
        except BaseException:  # an unexpected error: the log keeps its traceback
            traceback.print_exc()
        finally:
            with contextlib.suppress(Exception):  # a full disk under the log, say
                sys.stderr.flush()
            os._exit(code)
    os.close(write_fd)
    text = _read_ready_line(read_fd).strip()
    if text.startswith("ready "):
        digest = text.removeprefix("ready ")
        print(f"mounted {args.ref} ({digest[:12]}) at {config.mountpoint}; log: {log_path}")
        return 0
    code_text, _, error = text.partition(" ")
    if code_text.isdigit():
        print(f"lazycaf: error: {error}", file=sys.stderr)
        return int(code_text)
    print(
        f"lazycaf: error: the mount process exited before it was ready (see {log_path})",
        file=sys.stderr,
    )
    return 1


def _read_ready_line(fd: int, timeout: float = 120.0) -> str:
    deadline = time.monotonic() + timeout
    data = b""
    with os.fdopen(fd, "rb", buffering=0) as pipe:
        while not data.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([pipe], [], [], remaining)[0]:
                break
            chunk = pipe.read(4096)
            if not chunk:
                break
            data += chunk
    return data.decode(errors="replace")


async def mount(args: argparse.Namespace) -> int:
    """The foreground mount (the background child runs this too)."""
    config = _mount_config(args)
    ready_fd: list[int] = [args.ready_fd] if args.ready_fd is not None else []
    if not ready_fd:  # the background parent warned already
        _warn_if_budget_ignored(config)

    def ready(digest: str) -> None:
        if ready_fd:
            os.write(ready_fd[0], f"ready {digest}\n".encode())
            os.close(ready_fd.pop())
        else:
            print(
                f"mounted {args.ref} ({digest[:12]}) at {config.mountpoint}; Ctrl-C unmounts",
                flush=True,
            )

    try:
        await run_mount(config, ready=ready)
    except BaseException as exc:
        err = first_error(exc)
        if ready_fd:
            line = f"{err.exit_code} {err}" if isinstance(err, LazyCafError) else f"1 {err!r}"
            os.write(ready_fd[0], " ".join(line.split()).encode() + b"\n")
            os.close(ready_fd.pop())
        raise
    return 0


async def umount(args: argparse.Namespace) -> int:
    """Unmount, then wait (bounded) until the mount process saved its trace and exited. A
    mount whose process died (its mountpoint answers ENOTCONN) is unmounted the same way."""
    mnt = args.mountpoint.absolute()
    if not is_mounted(mnt):
        raise UsageError(f"{mnt} {'is not mounted' if _exists(mnt) else 'does not exist'}")
    pid = mount_pid(mnt)
    cmd = ["fusermount3", "-u", *(["-z"] if args.lazy else []), str(mnt)]
    proc = await trio.run_process(cmd, capture_stderr=True, check=False)
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()
        if "busy" in err.lower():
            raise LazyCafError(
                f"{mnt} is busy: a process has files open or its working directory there "
                "(close them, or umount --lazy)"
            )
        raise LazyCafError(f"cannot unmount {mnt}: {err}")
    if pid is not None:  # the mount saves its run's trace on the way out: wait for it
        with trio.move_on_after(_EXIT_WAIT) as waited:
            await _wait_exit(pid)
        if waited.cancelled_caught:
            print(
                f"lazycaf: warning: {mnt} is unmounted, but its mount process (pid {pid}) "
                f"did not exit within {_EXIT_WAIT:g} s; its trace may be lost",
                file=sys.stderr,
            )
    return 0


# a mount on its way out saves its trace within SAVE_TIMEOUT (lazycaf.mount.root)
_EXIT_WAIT = SAVE_TIMEOUT + 20.0


def _exists(path: Path) -> bool:
    try:
        os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError:  # ENOTCONN and the like: something is there
        return True
    return True


async def _wait_exit(pid: int) -> None:
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        await trio.lowlevel.wait_readable(pidfd)  # readable once the process exits
    finally:
        os.close(pidfd)


async def stats(args: argparse.Namespace) -> int:
    cache, sock = _cache_paths(args)
    if not socket_answers(sock):
        raise Unavailable(f"no fetcher daemon answers on {sock} (cache {cache})")
    client = FetcherClient(sock)
    try:
        stats = await client.stats()
    finally:
        await client.aclose()
    if args.json:
        print(json.dumps(stats, sort_keys=True))
    else:
        for key, value in stats.items():
            print(f"{key:22s} {value}")
    return 0


async def fetcher_serve(args: argparse.Namespace) -> int:
    from fetcher.daemon.root import DaemonRunning, GcOptions, PeerOptions, run_daemon
    from fetcher.web.asgi import server_tls
    from lazycaf.cli.daemonlog import log_to_file_unless_service

    log_to_file_unless_service(args.log_file, force_stderr=args.log_stderr)
    faulthandler.enable()  # descriptor 2 is the log (or the journal): a fatal signal's stack
    cache, sock = _cache_paths(args)
    size = parse_size(args.cache_size) if args.cache_size else None
    options = GcOptions(size, args.gc_high, args.gc_low)
    if args.peer_timeout <= 0:
        raise UsageError(f"--peer-timeout must be positive, got {args.peer_timeout:g}")
    token_file = args.peer_token_file
    tls = server_tls(args.tls_cert, args.tls_key)
    if tls is not None and not args.peer_listen:
        raise UsageError("--tls-cert and --tls-key serve the peer listener: add --peer-listen")
    peers = PeerOptions(
        listen=args.peer_listen,
        advertise=args.peer_advertise,
        peers_file=args.peers.absolute() if args.peers else None,
        token=read_token(token_file, "--peer-token-file") if token_file else None,
        timeout=args.peer_timeout,
        tls=tls,
        client_tls=args.peer_tls,
    )
    try:
        await run_daemon(
            cache,
            args.cas,
            sock,
            gc_options=options,
            peer_options=peers,
            metrics_listen=args.metrics_listen,
            cacert=args.cacert,
        )
    except DaemonRunning as exc:
        print(f"lazycaf fetcher: {exc}", file=sys.stderr)
    return 0


async def fetcher_stop(args: argparse.Namespace) -> int:
    from fetcher.daemon.root import stop_daemon

    cache, _ = _cache_paths(args)
    pid = await trio.to_thread.run_sync(stop_daemon, cache)
    print(f"stopped fetcher daemon {pid}" if pid else f"no fetcher daemon serves {cache}")
    return 0


async def cache_init(args: argparse.Namespace) -> int:
    from fetcher.cache.blobcache import init_cache_dir

    try:
        fs, compressed = await trio.to_thread.run_sync(init_cache_dir, args.dir)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise UsageError(f"cannot initialise cache {args.dir}: {exc}") from exc
    if compressed:
        print(f"cache {args.dir}: on Btrfs, zstd compression on")
    else:
        print(
            f"lazycaf: warning: cache {args.dir} is on {fs}, not Btrfs: "
            "no transparent compression and materialize will copy instead of reflinking",
            file=sys.stderr,
        )
    return 0


def _absolute(path: str | Path) -> Path:
    return Path(os.path.abspath(path))


async def materialize(args: argparse.Namespace) -> int:
    """A full ordinary tree from the host cache: reflinks on Btrfs, copies elsewhere. All or
    nothing, modes made safe unless ``--keep-setid`` (``lazycaf.trees.materialize``)."""
    from lazycaf.core.manifest import Manifest
    from lazycaf.trees.materialize import check_target, write_tree

    cache, sock = _cache_paths(args)
    target, cas_spec = _absolute(args.dir), args.cas
    if cas_spec and "://" not in cas_spec:
        cas_spec = str(_absolute(cas_spec))
    await trio.to_thread.run_sync(check_target, target)
    await trio.to_thread.run_sync(ensure_daemon, cache, cas_spec, sock)
    client = FetcherClient(sock, timeout=BULK_TIMEOUT)
    try:
        digest = await client.resolve(args.ref)
        await client.ensure(digest)
        blob = CacheLayout(cache).blob(digest)
        data = await trio.to_thread.run_sync(blob.read_bytes)
        manifest = await trio.to_thread.run_sync(Manifest.decode, data)
        blobs = await trio.to_thread.run_sync(manifest.blobs)
        with bar_for(args, "materialize: blobs", total=len(blobs)) as bar:
            await _ensure_tree_blobs(client, cache, manifest, blobs, bar)
    finally:
        await client.aclose()
    entries = len(manifest.entries)
    with bar_for(args, "materialize: writing", total=entries, unit="entries") as bar:
        write = functools.partial(
            write_tree,
            cache,
            manifest,
            target,
            copy=args.copy,
            keep_setid=args.keep_setid,
            on_entry=bar.advance,
        )
        signum, res = await _run_until_signal(write)
    if res is None:
        print(f"lazycaf: interrupted: nothing written at {target}", file=sys.stderr)
        return 128 + signum
    if res.copied and not args.copy:
        print(
            f"lazycaf: note: {res.copied} files were copied, not reflinked: {target} is not on "
            f"the cache's Btrfs filesystem ({cache})",
            file=sys.stderr,
        )
    if args.json:
        print(
            json.dumps(
                {"ref": args.ref, "digest": digest.hex, "target": str(target)}
                | dataclasses.asdict(res),
                sort_keys=True,
            )
        )
        return 0
    print(
        f"materialized {args.ref} ({digest.short}) at {target}: {res.files} files, "
        f"{res.bytes} bytes, {res.reflinked} reflinked, {res.copied} copied"
    )
    return 0


async def _ensure_tree_blobs(
    client: FetcherClient, cache: Path, manifest: Manifest, blobs: dict[Digest, int], bar: Bar
) -> None:
    """Every blob of ``manifest`` (``blobs``, with their sizes) in the cache; a missing one
    is named with its path."""
    try:
        await client.ensure_all(blobs, cache_root=cache, sizes=blobs, on_progress=bar.fetched)
    except BlobNotFound as exc:
        path = next((e.path for e in manifest.entries if exc.digest in e.blob_digests()), "?")
        raise NotFound(f"blob {exc.digest} of {path} is not in the CAS") from None


async def _run_until_signal(
    fn: Callable[..., MaterializeResult],
) -> tuple[int, MaterializeResult | None]:
    """Run ``fn(stop=event)`` in a thread; SIGINT or SIGTERM sets the event, and ``fn``
    undoes its work and raises ``KeyboardInterrupt``: (the signal, None) then."""
    stop = threading.Event()
    got: list[int] = [signal.SIGINT]

    def on_signal(signum: int, frame: object) -> None:
        got[0] = signum
        stop.set()

    main_thread = threading.current_thread() is threading.main_thread()  # else: no signals
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM) if main_thread}
    try:
        return 0, await trio.to_thread.run_sync(functools.partial(fn, stop=stop))
    except KeyboardInterrupt:
        if not stop.is_set():
            raise
        return got[0], None
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
