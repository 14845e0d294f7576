"""Where a host's LazyCAF state is by default: the cache directory and the sockets in it.

Standard library only: the command line's zygote fast path (``lazycaf.cli.zygote_client``) needs
these before anything heavier is imported.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "NO_ZYGOTE_ENV",
    "cache_paths",
    "default_cache_dir",
    "fetcher_socket",
    "zygote_disabled",
    "zygote_socket",
]

NO_ZYGOTE_ENV = "LAZYCAF_NO_ZYGOTE"


def default_cache_dir() -> Path:
    return Path(os.environ.get("LAZYCAF_CACHE") or Path.home() / ".cache" / "lazycaf" / "host")


def fetcher_socket(cache_dir: Path) -> Path:
    """The daemon's socket of a cache, unless told otherwise (``--socket``)."""
    return cache_dir / "fetcher.sock"


def cache_paths(cache: Path | None, socket: Path | None) -> tuple[Path, Path]:
    """The cache directory and the daemon's socket a command means, absolute: ``--cache``
    or the default, ``--socket`` or the cache's own."""
    cache_dir = (cache or default_cache_dir()).absolute()
    return cache_dir, (socket or fetcher_socket(cache_dir)).absolute()


def zygote_socket(fetcher: Path) -> Path:
    """The mount zygote's socket beside the daemon's (``fetcher-zygote.sock``)."""
    return fetcher.with_name(fetcher.stem + "-zygote.sock")


def zygote_disabled(env: dict[str, str] | os._Environ[str] | None = None) -> bool:
    """``LAZYCAF_NO_ZYGOTE=1``: no zygote kept by a daemon, none asked by a mount."""
    return (env if env is not None else os.environ).get(NO_ZYGOTE_ENV, "") not in ("", "0")
