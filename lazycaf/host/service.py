"""Running as a systemd service: readiness notification, the journal, who owns a cache.

- ``notify(state)``: the ``sd_notify`` protocol by hand (one datagram of ``KEY=VALUE`` lines
  to ``$NOTIFY_SOCKET``; a leading ``@`` names an abstract socket). A no-op outside a
  ``Type=notify`` unit; errors are swallowed, as libsystemd's ``sd_notify`` does.
- ``under_systemd()``: started by systemd, so stderr reaches the journal: ``$JOURNAL_STREAM``
  names stderr's device and inode (the check ``systemd.exec(5)`` prescribes; the variable
  alone leaks into shells started from user services), or ``$INVOCATION_ID`` is set.
- The **service marker** ``<cache>/fetcher.service`` holds the name of the unit that runs the
  cache's daemon. While it exists, mounts never start a daemon of their own: they wait a
  little for the service (a restart) and then fail, naming the unit. Written by
  ``lazycaf service install`` and by a daemon started by systemd; removed by
  ``lazycaf service uninstall`` (or by hand).
- ``$LAZYCAF_NO_AUTOSTART`` (any value but empty or ``0``): never start a daemon.

Standard library only: the daemon, ``cas serve`` and the mount's client all use it.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from typing import Final

__all__ = [
    "DEFAULT_FETCHER_UNIT",
    "NO_AUTOSTART_ENV",
    "autostart_disabled",
    "current_unit",
    "notify",
    "service_marker",
    "service_unit",
    "under_systemd",
    "write_service_marker",
]

NO_AUTOSTART_ENV: Final = "LAZYCAF_NO_AUTOSTART"
DEFAULT_FETCHER_UNIT: Final = "lazycaf-fetcher.service"


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to the service manager; True if it was sent."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address or address[0] not in "/@":
        return False
    if address[0] == "@":  # an abstract socket: its name starts with NUL
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto(state.encode(), address)
        except OSError:
            return False
    return True


def under_systemd() -> bool:
    """True when this process runs as (part of) a systemd unit whose stderr is kept."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    if stream:
        with contextlib.suppress(OSError, ValueError):
            dev, _, ino = stream.partition(":")
            st = os.fstat(2)
            if (st.st_dev, st.st_ino) == (int(dev), int(ino)):
                return True
    return bool(os.environ.get("INVOCATION_ID"))


def current_unit() -> str | None:
    """The ``.service`` unit this process runs in, from its cgroup, or None."""
    try:
        text = Path("/proc/self/cgroup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        for part in reversed(line.rpartition(":")[2].split("/")):
            if part.endswith(".service"):
                return part
    return None


def service_marker(cache_dir: Path) -> Path:
    return cache_dir / "fetcher.service"


def service_unit(cache_dir: Path) -> str | None:
    """The unit that runs ``cache_dir``'s daemon, or None when mounts may start one."""
    try:
        name = service_marker(cache_dir).read_text().strip()
    except FileNotFoundError:
        return None
    except OSError:
        return DEFAULT_FETCHER_UNIT
    return name or DEFAULT_FETCHER_UNIT


def write_service_marker(cache_dir: Path, unit: str) -> None:
    """Record that ``unit`` runs ``cache_dir``'s daemon (temp file, then rename)."""
    path = service_marker(cache_dir)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(unit + "\n")
    os.replace(tmp, path)


def autostart_disabled(env: dict[str, str] | os._Environ[str] | None = None) -> bool:
    return (env if env is not None else os.environ).get(NO_AUTOSTART_ENV, "") not in ("", "0")
