"""Helpers shared by test modules: waiting on a condition, and a sample tree to pack.

Fixtures live in ``tests/conftest.py``; what a test module imports lives here, so that no test
module imports another.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
import trio

from tests.conftest import run_cli

T = TypeVar("T")


def _timed_out(what: str, timeout: float, last: object) -> str:
    shown = repr(last)
    if len(shown) > 300:
        shown = shown[:300] + "..."
    return f"timed out after {timeout:g} s waiting for {what} (last seen: {shown})"


def wait_for(
    predicate: Callable[[], T | None], what: str, *, timeout: float = 15.0, interval: float = 0.02
) -> T:
    """Call ``predicate`` until it returns something true and return that; fail the test,
    naming ``what``, when ``timeout`` seconds pass first. For waits on another process or
    thread: a test's own timers belong to trio's ``autojump_clock`` instead."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(_timed_out(what, timeout, value))
        time.sleep(interval)


async def wait_for_async(
    predicate: Callable[[], T | None],
    what: str,
    *,
    timeout: float = 15.0,  # noqa: ASYNC109 (an outer fail_after could not name `what`)
    interval: float = 0.005,
) -> T:
    """``wait_for`` inside a trio test: the other tasks run between two calls of ``predicate``
    (which must be quick: it runs in the event loop). Under ``autojump_clock`` the timeout is
    virtual time, which jumps while the loop waits on a worker thread: wait on tasks there."""
    value = predicate()
    with trio.move_on_after(timeout):
        while not value:
            await trio.sleep(interval)
            value = predicate()
        return value
    pytest.fail(_timed_out(what, timeout, value))


def make_tree(root: Path) -> Path:
    """A tree with every entry kind: dirs, small and chunked files, symlinks, hard links."""
    (root / "bin").mkdir(parents=True)
    (root / "lib/pkg/sub").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    (root / "bin/tool").write_bytes(b"#!/bin/sh\necho hi\n")
    (root / "bin/tool").chmod(0o755)
    (root / "lib/pkg/__init__.py").write_text("x = 1\n")
    (root / "lib/pkg/sub/data.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    (root / "lib/pkg/empty").write_bytes(b"")
    (root / "lib/pkg/ünïcode.txt").write_text("snowman ☃\n")
    (root / "lib/pkg/readonly").write_text("ro")
    (root / "lib/pkg/readonly").chmod(0o444)
    os.symlink("tool", root / "bin/tool-link")
    os.symlink("../lib/pkg", root / "bin/pkg-link")
    os.symlink("/nonexistent/absolute", root / "bin/abs-link")
    os.link(root / "lib/pkg/__init__.py", root / "lib/pkg/hardlink.py")
    os.link(root / "lib/pkg/__init__.py", root / "bin/hardlink2")
    os.utime(
        root / "lib/pkg/__init__.py", ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789)
    )
    return root


def walk(root: Path) -> dict[str, os.stat_result]:
    """Every entry under ``root`` (relative path -> lstat), ``root`` itself excepted."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            out[str(p.relative_to(root))] = p.lstat()
    return out


def pack(tree: Path, cas: Path | str, *extra: str) -> str:
    """``lazycaf pack TREE --cas CAS EXTRA...``; returns the manifest digest it printed."""
    out = run_cli("pack", tree, "--cas", cas, *extra).stdout.decode().strip()
    assert len(out) == 64, out
    return out
