"""The host's mount zygote: imports done once, one forked child per ``lazycaf mount``.

``python -m lazycaf.cli.zygote --socket PATH`` is started (and restarted) by the fetcher daemon.
It imports what a mount needs (trio, pyfuse3, lmdb, the mount code), then waits on a Unix
socket. For each request of ``lazycaf.cli.zygote_client`` it checks that it may serve it, answers
``accepted``, and forks; the child takes the client's stdin, stdout and stderr, working
directory, environment and umask and runs ``lazycaf mount`` exactly as the command line does
(which forks the mount process and prints ``mounted ...`` to the client's terminal). The
zygote reaps the child and sends the client ``exit N``.

It refuses (``refused WHY``; the client then mounts in-process) a peer of another user, in
another mount namespace (a FUSE mount made here would be invisible to it) or under another
root directory (its paths would name other files here), and a client
whose code fingerprint differs: the code changed since the zygote started, so it retires and
the daemon starts a fresh one.

Fork safety: the zygote never starts a thread, a trio loop or an LMDB environment, so a
child starts from a clean single-threaded process. It exits when the daemon that started it
does (``PR_SET_PDEATHSIG``, and a check of its parent pid).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import importlib
import json
import os
import selectors
import shlex
import signal
import socket
import struct
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Final

import setproctitle

from lazycaf.cli.zygote_client import code_fingerprint

__all__ = ["main", "serve"]

_REQUEST_TIMEOUT: Final = 2.0
_MAX_REQUEST: Final = 4 << 20
_PR_SET_PDEATHSIG: Final = 1
_DRAIN_S: Final = 5.0  # how long a stopping zygote still waits to report mounts under way


def _say(msg: str) -> None:
    print(f"lazycaf zygote[{os.getpid()}]: {msg}", file=sys.stderr, flush=True)


# What a mount imports, loaded once in the zygote and shared by every child it forks.
PRELOAD: Final = (
    "lazycaf.cli.host",
    "lazycaf.cli.main",
    "lazycaf.host.index",
    "lazycaf.mount.blobreader",
    "lazycaf.mount.fuse_ops",
    "lazycaf.mount.recording",
    "lazycaf.mount.root",
)


def _preload() -> None:
    """Import everything a mount imports, so a child has nothing left to load."""
    for name in PRELOAD:
        importlib.import_module(name)


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _peer(conn: socket.socket) -> tuple[int, int]:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _gid = struct.unpack("3i", creds)
    return pid, uid


def _namespace(pid: int | str, kind: str) -> str:
    try:
        return os.readlink(f"/proc/{pid}/ns/{kind}")
    except OSError:
        return "?"


def _root(pid: int | str) -> str:
    try:
        return os.readlink(f"/proc/{pid}/root")
    except OSError:
        return "?"


class _Refused(Exception):
    pass


class Zygote:
    """Invariant: a forked child closes every fd the zygote holds (``_child``)."""

    def __init__(self, listener: socket.socket, parent: int) -> None:
        self.listener = listener
        self.parent = parent
        self.fingerprint = code_fingerprint()
        self.mnt_ns = _namespace("self", "mnt")
        self.root = _root("self")
        self.children: dict[int, socket.socket] = {}  # zygote child pid -> its client
        self.retire = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._selector = selectors.DefaultSelector()
        self._selector.register(listener, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)

    def run(self) -> None:
        """Serve until told to stop (SIGTERM), the code changed or the parent died; then
        stop accepting and, for up to ``_DRAIN_S``, still report the mounts under way."""
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, self._stop)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        while not self.retire and os.getppid() == self.parent:
            for key, _ in self._selector.select(timeout=1.0):
                if key.fileobj is self.listener:
                    self._accept()
                else:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 4096)
            self._reap()
        self._selector.unregister(self.listener)
        deadline = time.monotonic() + _DRAIN_S
        while self.children and time.monotonic() < deadline:
            self._selector.select(timeout=0.2)
            with contextlib.suppress(BlockingIOError):
                os.read(self._wake_r, 4096)
            self._reap()

    def _stop(self, signum: int, frame: object) -> None:
        self.retire = True

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except BlockingIOError:
            return
        fds: list[int] = []
        try:
            conn.settimeout(_REQUEST_TIMEOUT)
            request, fds = self._read_request(conn)
            self._check(conn, request)
            conn.sendall(b"accepted\n")
        except _Refused as exc:
            with contextlib.suppress(OSError):
                conn.sendall(f"refused {exc}\n".encode())
            _close_all(fds)
            conn.close()
            return
        except (OSError, ValueError) as exc:
            _say(f"dropped a request: {exc}")
            _close_all(fds)
            conn.close()
            return
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = self._child(conn, fds, request)
            except SystemExit as exc:  # argparse's errors
                code = exc.code if isinstance(exc.code, int) else 2
            except BaseException:
                traceback.print_exc()
            finally:
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code)
        _close_all(fds)
        self.children[pid] = conn
        _say(f"pid {pid}: lazycaf {shlex.join(map(str, request['argv']))}")

    def _read_request(self, conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
        data, fds, _flags, _addr = socket.recv_fds(conn, 65536, 3)
        try:
            buf = bytearray(data)
            while b"\n" not in buf:
                if len(buf) > _MAX_REQUEST:
                    raise ValueError("request too long")
                chunk = conn.recv(65536)
                if not chunk:
                    raise ValueError("client hung up mid-request")
                buf += chunk
            request = json.loads(bytes(buf).partition(b"\n")[0])
            if len(fds) != 3 or not isinstance(request, dict):
                raise ValueError("malformed request")
        except BaseException:  # the fds came with the request: they go with it
            _close_all(fds)
            raise
        return request, fds

    def _check(self, conn: socket.socket, request: dict[str, Any]) -> None:
        pid, uid = _peer(conn)
        if uid != os.getuid():
            raise _Refused(f"serves uid {os.getuid()} only")
        if _namespace(pid, "mnt") != self.mnt_ns:
            raise _Refused("the client is in another mount namespace")
        if _root(pid) != self.root:  # its paths would mean other files here
            raise _Refused("the client has another root directory")
        if request.get("fingerprint") != self.fingerprint:
            self.retire = True
            raise _Refused("the code changed since this zygote started; retiring")

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = self.children.pop(pid, None)
            if conn is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            _say(f"pid {pid}: exit {code}")
            with contextlib.suppress(OSError):
                conn.sendall(f"exit {code}\n".encode())
            conn.close()

    def _child(self, conn: socket.socket, fds: list[int], request: dict[str, Any]) -> int:
        """In the forked child: become the client's ``lazycaf mount`` process."""
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGCHLD, signal.SIGTERM):
            signal.signal(signum, signal.SIG_DFL)
        # detach, never close, the zygote's socket objects: a finaliser run later must not
        # close an fd number that has been reused by then
        self._selector.close()
        owned = [conn.detach(), self.listener.detach(), self._wake_r, self._wake_w]
        _close_all(owned + [c.detach() for c in self.children.values()])
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        _close_all([fd for fd in fds if fd > 2])
        os.chdir(request["cwd"])
        os.umask(int(request["umask"]))
        os.environ.clear()
        os.environ.update({str(k): str(v) for k, v in request["env"].items()})
        argv = [str(a) for a in request["argv"]]
        sys.argv = ["lazycaf", *argv]
        setproctitle.setproctitle(shlex.join(sys.argv))  # what `ps` shows for this mount
        from lazycaf.cli.main import main

        return main(argv, zygote=False)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _listen(path: Path) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # stale: the daemon that starts us holds the cache lock
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    tmp = path.with_name(f".z{os.getpid()}")  # no longer than the final name
    old = os.umask(0o177)
    try:
        sock.bind(str(tmp))
    finally:
        os.umask(old)
    sock.listen(64)
    sock.setblocking(False)
    os.rename(tmp, path)  # the path appears only once it is listening (zygote_ready)
    return sock


def serve(path: Path, parent: int) -> None:
    """Serve mount requests on ``path`` until the parent ``parent`` exits or the code
    changes under us."""
    _die_with_parent()
    if os.getppid() != parent:
        return
    _preload()
    gc.collect()
    gc.freeze()  # children's collections leave the preloaded objects' pages shared
    setproctitle.setproctitle(f"lazycaf zygote {path}")
    listener = _listen(path)
    try:
        _say(f"serving mounts on {path}")
        Zygote(listener, parent).run()
    finally:
        listener.close()
        with contextlib.suppress(OSError):
            path.unlink()  # the daemon starts the next zygote only after this one exited


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lazycaf.cli.zygote")
    p.add_argument("--socket", type=Path, required=True)
    p.add_argument("--parent", type=int, default=os.getppid(), help="exit when it does")
    args = p.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        serve(args.socket.absolute(), args.parent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
