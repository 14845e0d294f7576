"""``lazycaf mount`` through the host's mount zygote: the client half, standard library only.

A ``lazycaf mount`` that starts Python, imports trio, pyfuse3 and the mount code from a cold
page cache spends ~0.3-0.5 s before it does any work. The fetcher daemon keeps a *mount
zygote* beside it (``lazycaf.cli.zygote``): a process that has done those imports and forks one
child per mount. This client, which imports nothing outside the standard library, hands the
zygote the command line, working directory, environment, umask and its own stdin, stdout and
stderr (``SCM_RIGHTS``), then waits for the child's exit code. The child runs the very same
``lazycaf mount`` code as the in-process path, printing to this process's terminal.

``try_zygote`` returns ``None`` whenever the zygote cannot take the request (none running,
another user, another mount namespace, the code changed since it started, ...): the caller
then mounts in-process as before, so the zygote only ever makes a mount faster.
``LAZYCAF_NO_ZYGOTE=1`` turns it off (here and in a daemon started with it).
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path
from typing import Final

from lazycaf.core.errors import LazyCafError
from lazycaf.host.paths import (
    CONFIG_ENV,
    CONFIG_SEARCH_PATH,
    NO_ZYGOTE_ENV,
    cache_paths,
    zygote_disabled,
    zygote_socket,
)

__all__ = [
    "NO_ZYGOTE_ENV",
    "code_fingerprint",
    "try_zygote",
    "zygote_disabled",
    "zygote_ready",
]

_CONNECT_TIMEOUT: Final = 2.0  # the zygote answers "accepted"/"refused" at once
_RESULT_TIMEOUT: Final = 300.0  # the mount itself gives up on readiness after 120 s


def zygote_ready(fetcher: Path) -> bool:
    """The daemon at socket ``fetcher`` has a zygote listening (its socket appears then)."""
    return zygote_socket(fetcher).exists()


def code_fingerprint() -> str:
    """What a zygote and a client compare to be sure they run the same code: the interpreter,
    the package directory and the newest modification of its modules (an upgrade or an edit
    of any module changes it; the zygote then retires and the daemon starts a fresh one)."""
    pkg = Path(__file__).resolve().parent.parent
    newest = count = 0
    for folder, _dirs, files in os.walk(pkg):
        for name in files:
            if name.endswith(".py"):
                count += 1
                newest = max(newest, os.stat(os.path.join(folder, name)).st_mtime_ns)
    return f"{sys.executable}|{pkg}|{count}|{newest}"


def _option(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.partition("=")[2]
    return None


def _config_applies(argv: list[str]) -> bool:
    """A config file may set options: one is named (``--config``, ``$LAZYCAF_CONFIG``) or
    found where the search looks. Without one, ``lazycaf.cli.config`` (``tomllib``,
    ``dataclasses``, ``argparse``: 15-20 ms of a cold start) is not imported."""
    if os.environ.get(CONFIG_ENV) or any(a.startswith("--config") for a in argv):
        return True
    return any(os.path.isfile(os.path.expanduser(p)) for p in CONFIG_SEARCH_PATH)


def _mount_argv(argv: list[str]) -> bool:
    """A background ``lazycaf mount`` (the only command the zygote serves; the mount parser
    takes no abbreviated options, so full names are all there is to look for)."""
    if any(a.startswith("--config") for a in argv):
        from lazycaf.cli.config import without_config

        argv = without_config(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command != "mount":
        return False
    return not any(a in ("--foreground", "-h", "--help", "--version") for a in argv)


def _fetcher_socket(argv: list[str]) -> Path:
    """The daemon socket the mount will use: the flags, else the environment, else the config
    file (``lazycaf.cli.config.preset``), else the defaults, as the parser would have it."""
    cache, sock = _option(argv, "--cache"), _option(argv, "--socket")
    if (cache is None or sock is None) and _config_applies(argv):
        from lazycaf.cli.config import preset

        from_file = preset(argv, "mount", ("cache", "socket"))
        cache = cache if cache is not None else from_file.get("cache")
        sock = sock if sock is not None else from_file.get("socket")
    return cache_paths(Path(cache) if cache else None, Path(sock) if sock else None)[1]


def _read_line(sock: socket.socket, buf: bytearray) -> str | None:
    while b"\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            return None
        buf += chunk
    line, _, rest = bytes(buf).partition(b"\n")
    buf[:] = rest
    return line.decode(errors="replace")


def try_zygote(argv: list[str]) -> int | None:
    """Run ``lazycaf ARGV`` in a child of the zygote; its exit code, or ``None`` when the
    zygote cannot take it (mount in-process then). Argument errors are the child's to
    report, in the very words the in-process path would use."""
    if zygote_disabled() or not _mount_argv(argv):
        return None
    try:  # a closed stdio fd: nothing to hand over (and the socket would take its number)
        for fd in (0, 1, 2):
            os.fstat(fd)
    except OSError:
        return None
    try:
        path = zygote_socket(_fetcher_socket(argv))
    except LazyCafError:  # a bad config file: the in-process mount reports it
        return None
    umask = os.umask(0o022)
    os.umask(umask)
    try:
        request = {
            "argv": argv,
            "cwd": os.getcwd(),  # fails in a removed directory: mount in-process then
            "env": dict(os.environ),
            "umask": umask,
            "fingerprint": code_fingerprint(),
        }
    except OSError:
        return None
    data = json.dumps(request).encode() + b"\n"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(_CONNECT_TIMEOUT)
        sock.connect(str(path))
        sent = socket.send_fds(sock, [data], [0, 1, 2])
        sock.sendall(data[sent:])
        buf = bytearray()
        answer = _read_line(sock, buf)
    except OSError:  # none listening, a closed stdio fd, a zygote gone mid-request
        sock.close()
        return None
    if answer != "accepted":
        sock.close()
        return None
    try:
        sock.settimeout(_RESULT_TIMEOUT)
        result = _read_line(sock, buf)
        why = "it stopped before the mount finished (see the mount's log)"
    except OSError as exc:
        result, why = None, f"{exc.strerror or exc}"
    finally:
        sock.close()
    if result is not None and result.startswith("exit "):
        code = result.removeprefix("exit ")
        if code.lstrip("-").isdigit():
            return int(code)
    print(f"lazycaf: error: the mount zygote at {path} failed: {why}", file=sys.stderr)
    return 1
