"""``lazycaf service install|uninstall``: the systemd units, written for this installation.

The units ship as package data (``lazycaf/cli/units/*.service``) with ``@NAME@`` holes: the
absolute path of this installation's ``lazycaf``, the cache, the CAS, the CAS server's store
(``--cas-root DIR`` or ``--cas-store s3://…``, whose keys go in ``/etc/lazycaf/s3.env``) and
address. ``install`` fills them in, writes both units into ``--prefix`` and marks the
cache as the service's (``lazycaf.host.service``: mounts then never start a daemon of their
own); ``uninstall`` removes the units and the marker. Neither runs ``systemctl``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
from importlib import resources
from pathlib import Path
from typing import Final

import trio

from lazycaf.host.paths import default_cache_dir
from lazycaf.host.service import DEFAULT_FETCHER_UNIT, service_marker, write_service_marker

__all__ = ["UNITS", "install", "lazycaf_command", "render_unit", "uninstall"]

UNITS: Final = (DEFAULT_FETCHER_UNIT, "lazycaf-cas.service")
_PLAIN: Final = re.compile(r"[A-Za-z0-9_@%+=:,./-]+")


def lazycaf_command() -> list[str]:
    """This installation's ``lazycaf``: the console script beside the interpreter, else
    ``python -m lazycaf``."""
    script = Path(sys.executable).parent / "lazycaf"
    if os.access(script, os.X_OK):
        return [str(Path(os.path.abspath(script)))]
    return [os.path.abspath(sys.executable), "-m", "lazycaf"]


def _unit_word(word: str) -> str:
    """One command-line word as an ``ExecStart=`` line spells it (systemd.service(5):
    ``%`` and ``$`` are specifiers and variables; quote anything unusual)."""
    word = word.replace("%", "%%").replace("$", "$$")
    if _PLAIN.fullmatch(word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_unit(name: str, values: dict[str, str | list[str]]) -> str:
    """The unit ``name`` with each ``@KEY@`` replaced by its value (a list: several words)."""
    text = resources.files("lazycaf.cli").joinpath("units", name).read_text()
    for key, value in values.items():
        words = value if isinstance(value, list) else [value]
        text = text.replace(f"@{key}@", " ".join(_unit_word(w) for w in words))
    leftover = re.search(r"@[A-Z]+@", text)
    assert leftover is None, f"{name}: {leftover.group()} not filled in"
    return text


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.chmod(0o644)
    os.replace(tmp, path)


async def install(args: argparse.Namespace) -> int:
    return await trio.to_thread.run_sync(_install, args)


async def uninstall(args: argparse.Namespace) -> int:
    return await trio.to_thread.run_sync(_uninstall, args)


def _install(args: argparse.Namespace) -> int:
    from lazycaf.cas.api import default_cas_spec

    cache = Path(os.path.abspath(args.cache or default_cache_dir()))
    cas = args.cas or default_cas_spec()
    if "://" not in cas:
        cas = os.path.abspath(cas)
    values: dict[str, str | list[str]] = {
        "LAZYCAF": lazycaf_command(),
        "CACHE": str(cache),
        "CAS": cas,
        "LISTEN": args.cas_listen,
    }
    if args.cas_store is not None:  # a frontend on a bucket: nothing on disk to write
        values |= {"STORE": args.cas_store, "WHERE": ["--store", args.cas_store]}
        values["WRITABLE"] = "-/var/lib/lazycaf"  # "-": ignored when absent
    else:
        root = os.path.abspath(args.cas_root)
        values |= {"STORE": root, "WHERE": ["--root", root], "WRITABLE": root}
    args.prefix.mkdir(parents=True, exist_ok=True)
    for name in UNITS:
        _write(args.prefix / name, render_unit(name, values))
        print(f"wrote {args.prefix / name}")
    cache.mkdir(parents=True, exist_ok=True)
    write_service_marker(cache, DEFAULT_FETCHER_UNIT)
    print(
        f"marked {cache} as the service's: mounts no longer start a daemon of their own\n"
        f"next: systemctl daemon-reload && systemctl enable --now {DEFAULT_FETCHER_UNIT}"
    )
    return 0


def _uninstall(args: argparse.Namespace) -> int:
    cache = Path(os.path.abspath(args.cache or default_cache_dir()))
    for name in UNITS:
        with contextlib.suppress(FileNotFoundError):
            (args.prefix / name).unlink()
            print(f"removed {args.prefix / name}")
    with contextlib.suppress(FileNotFoundError):
        service_marker(cache).unlink()
        print(f"removed {service_marker(cache)}: mounts start their own daemon again")
    return 0
