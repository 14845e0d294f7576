"""Where a host's LazyCAF state lives: the cache directory, its layout, the sockets in it.

``CacheLayout`` is the one owner of a host cache's on-disk layout: every module that opens a
blob file, the index or the temp directory asks it for the path.

Standard library only: the command line's zygote fast path (``lazycaf.cli.zygote_client``) needs
these before anything heavier is imported.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lazycaf.core.digest import Digest

__all__ = [
    "CONFIG_ENV",
    "CONFIG_SEARCH_PATH",
    "NO_ZYGOTE_ENV",
    "CacheLayout",
    "cache_paths",
    "default_cache_dir",
    "fetcher_socket",
    "zygote_disabled",
    "zygote_socket",
]

NO_ZYGOTE_ENV = "LAZYCAF_NO_ZYGOTE"
CONFIG_ENV = "LAZYCAF_CONFIG"  # the config file (``lazycaf.cli.config``), else the first of:
CONFIG_SEARCH_PATH = ("~/.config/lazycaf/config.toml", "/etc/lazycaf/config.toml")


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


class CacheLayout:
    """A host cache directory::

    <root>/index.lmdb/           the LMDB index (``lazycaf.host.index``)
    <root>/blobs/<2 hex>/<hex>   verified blob content, uncompressed (Btrfs compresses it)
    <root>/tmp/                  blobs being staged
    <root>/manifests/<hex>.idx   a manifest's index (``lazycaf.core.manifestindex``), built by
                                 the first mount of that manifest, shared by every later one;
                                 removed when GC evicts the manifest
    <root>/fetcher.sock, fetcher.lock, fetcher.log   the daemon's socket, lock and log
    """

    __slots__ = ("_blobs_prefix", "blobs", "index", "root", "tmp")

    def __init__(self, root: Path) -> None:
        self.root = root
        self.index = root / "index.lmdb"
        self.blobs = root / "blobs"
        self.tmp = root / "tmp"
        self._blobs_prefix = f"{self.blobs}/"

    def blob(self, digest: Digest) -> Path:
        return self.blobs / self.blob_name(digest)

    def blob_str(self, digest: Digest) -> str:
        """``blob`` as a string, without ``pathlib`` (~5 us less: a mount asks it per read)."""
        h = digest.hex
        return f"{self._blobs_prefix}{h[:2]}/{h}"

    @property
    def manifests(self) -> Path:
        return self.root / "manifests"

    def manifest_index(self, digest: Digest) -> Path:
        return self.manifests / f"{digest.hex}.idx"

    @staticmethod
    def blob_name(digest: Digest) -> str:
        """A blob file's path relative to ``blobs``."""
        h = digest.hex
        return f"{h[:2]}/{h}"

    @property
    def lock(self) -> Path:
        return self.root / "fetcher.lock"

    @property
    def log(self) -> Path:
        return self.root / "fetcher.log"
