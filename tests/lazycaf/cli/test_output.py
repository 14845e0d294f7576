"""Output for people and scripts: progress bars on a terminal only, ``--json`` read-outs.

The bars are tested in-process (``Bar``) and through the real CLI under a pseudo-terminal;
the JSON of each command is checked against the tree it describes.
"""

from __future__ import annotations

import io
import json
import os
import pty
import re
import select
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio

from lazycaf.cas.api import load_manifest
from lazycaf.cas.local import LocalCAS
from lazycaf.cli.progress import Bar
from lazycaf.core.manifest import Manifest
from lazycaf.traces.profiles import add_run
from lazycaf.traces.trace import AccessRecord, Trace
from tests.conftest import Host, run_cli
from tests.helpers import make_tree, walk


# -- Bar ------------------------------------------------------------------------------------
class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_throttles_and_clears() -> None:
    now = [0.0]
    out = _Terminal()
    bar = Bar("work", total=10, unit="blobs", stream=out, clock=lambda: now[0])
    with bar:
        for _ in range(5):  # within 0.1 s of the first line: not drawn
            bar.advance()
        now[0] = 0.15
        bar.advance()
    frames = out.getvalue().split("\r\x1b[K")
    assert frames == [
        "",
        "work [" + "." * 24 + "]   0% 0/10 blobs",
        "work [" + "#" * 14 + "." * 10 + "]  60% 6/10 blobs",
        "",
    ]
    bar.advance()
    assert out.getvalue().count("\r\x1b[K") == 3  # closed: silent


def test_disabled_bar_writes_nothing() -> None:
    out = _Terminal()
    with Bar("work", total=3, stream=out, enabled=False, interval=0) as bar:
        bar.advance(3)
        bar.update(note="x")
    assert out.getvalue() == ""


def test_bar_without_total_shows_count_and_bytes() -> None:
    bar = Bar("verify", unit="bytes", stream=_Terminal(), clock=lambda: 0.0)
    bar.update(3 << 20, note="2 blobs")
    assert bar.line() == "verify: 3.0 MiB (0 s), 2 blobs"


# -- progress through the CLI ---------------------------------------------------------------
def _big_tree(root: Path) -> Path:
    """Enough bytes that hashing and uploading them take well over a tenth of a second."""
    for i in range(12):
        (root / f"d{i}").mkdir(parents=True)
        (root / f"d{i}/blob").write_bytes(os.urandom(8 << 20))
    return root


def _pack_on_terminal(tree: Path, cas: Path, *extra: str) -> tuple[str, str]:
    """``lazycaf pack`` with stderr on a pseudo-terminal, stdout on a pipe."""
    quiet = [x for x in extra if x == "--quiet"]  # an option of ``lazycaf`` itself
    extra = tuple(x for x in extra if x != "--quiet")
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lazycaf", *quiet, "pack", str(tree), "--cas", str(cas), *extra],
            stdout=subprocess.PIPE,
            stderr=slave,
            stdin=subprocess.DEVNULL,
        )
        os.close(slave)
        slave = -1
        err = b""
        while True:  # read the terminal until the child closes it
            ready, _, _ = select.select([master], [], [], 60)
            assert ready, "pack produced nothing for 60 s"
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every writer has closed the terminal
                break
            if not chunk:
                break
            err += chunk
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    return out.decode(), err.decode()


def test_pack_shows_progress_on_a_terminal_only(tmp_path: Path) -> None:
    tree = _big_tree(tmp_path / "tree")
    out, err = _pack_on_terminal(tree, tmp_path / "cas", "--jobs", "1")
    assert re.fullmatch(r"[0-9a-f]{64}\n", out)  # stdout carries the digest only
    assert re.search(r"pack: (hashing|checking|uploading) \[[#.]{24}\] +\d+%", err), err
    assert err.endswith("\r\x1b[K")  # the line is cleared at the end

    out2, err2 = _pack_on_terminal(tree, tmp_path / "cas2", "--quiet")
    assert out2 == out and err2 == ""

    proc = run_cli("pack", tree, "--cas", tmp_path / "cas3")  # stderr is a pipe
    assert proc.stdout.decode() == out and proc.stderr == b""


# -- --json ---------------------------------------------------------------------------------
def _json(*args: str | os.PathLike[str], host: Host | None = None) -> Any:
    proc = host.cli(*args, "--json") if host else run_cli(*args, "--json")
    return json.loads(proc.stdout)


def _manifest(cas: Path, ref: str) -> Manifest:
    async def load() -> Manifest:
        store = LocalCAS(cas)
        try:
            return (await load_manifest(store, ref))[1]
        finally:
            await store.aclose()

    return trio.run(load)


def _file_sizes(tree: Path) -> dict[str, int]:
    """Regular files as a pack counts them: one per inode (hard links are not files)."""
    seen: dict[tuple[int, int], str] = {}
    for path, st in sorted(walk(tree).items()):
        if (st.st_mode & 0o170000) == 0o100000:
            seen.setdefault((st.st_dev, st.st_ino), path)
    return {path: (tree / path).stat().st_size for path in seen.values()}


def test_pack_json_counts_the_tree(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    cas = tmp_path / "cas"
    regular = [p for p, st in walk(tree).items() if stat.S_ISREG(st.st_mode)]  # links too
    first = _json("pack", tree, "--cas", cas)
    assert first["files"] == len(regular)
    assert first["bytes"] == sum((tree / p).stat().st_size for p in regular)
    assert first["blobs_uploaded"] + first["blobs_skipped"] == first["blobs"] > 0
    assert first["bytes_uploaded"] > 0 and first["seconds"] >= 0
    listing = run_cli("ls", first["digest"], "-R", "--cas", cas).stdout.decode()
    assert "lib/pkg/sub/data.bin" in listing
    again = _json("pack", tree, "--cas", cas, "--rehash")
    assert again["digest"] == first["digest"]
    assert (again["blobs_uploaded"], again["bytes_uploaded"]) == (0, 0)
    assert again["blobs_skipped"] == first["blobs"]


def test_diff_json_lists_changes_with_sizes(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    cas = tmp_path / "cas"
    a = _json("pack", tree, "--cas", cas)["digest"]
    (tree / "new.txt").write_bytes(b"12345")
    os.unlink(tree / "bin/tool")
    (tree / "lib/pkg/readonly").chmod(0o644)
    (tree / "lib/pkg/readonly").write_text("rw!")
    b = _json("pack", tree, "--cas", cas)["digest"]
    diff = _json("diff", a, b, "--cas", cas)
    assert diff["added"] == [{"path": "new.txt", "kind": "file", "size": 5}]
    assert diff["removed"] == [{"path": "bin/tool", "kind": "file", "size": 18}]
    assert [c["path"] for c in diff["changed"]] == ["lib/pkg/readonly"]
    assert diff["changed"][0]["bytes_differ"] == 3
    assert diff["summary"] == {
        "added": 1,
        "added_bytes": 5,
        "removed": 1,
        "removed_bytes": 18,
        "changed": 1,
        "changed_bytes": 3,
        "new_blob_bytes": 5 + 3,
        "mtime_only": 1,  # bin: its mtime, from the unlink
    }
    text = run_cli("diff", a, b, "--cas", cas).stdout.decode().splitlines()
    assert not any(line.startswith("M bin ") for line in text)
    assert text[-1].endswith("; 1 more changed only their mtime (--mtimes lists them)")
    every = _json("diff", a, b, "--cas", cas, "--mtimes")
    changed = {c["path"]: c for c in every["changed"]}
    assert set(changed) == {"bin", "lib/pkg/readonly"}
    assert changed["bin"] == {"path": "bin", "what": ["mtime"], "bytes_differ": 0}
    assert every["summary"] == {**diff["summary"], "changed": 2, "mtime_only": 0}


def test_profile_show_json(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    cas = tmp_path / "cas"
    digest = _json("pack", tree, "--cas", cas)["digest"]
    records = [
        AccessRecord("bin/tool", 0.01, 18, "fetch", 0.25),
        AccessRecord("lib/pkg/__init__.py", 0.02, 6, "cache"),
    ]

    async def save() -> None:
        store = LocalCAS(cas)
        await add_run(store, "tool", Trace(digest, 1_700_000_000.0, records))
        await store.aclose()

    trio.run(save)
    shown = _json("profile", "show", "tool", "--cas", cas)
    manifest_files = [
        json.loads(line)
        for line in run_cli("ls", digest, "-R", "--json", "--cas", cas).stdout.splitlines()
    ]
    assert shown["runs"] == 1 and shown["executable"] == digest
    assert shown["files"] == sum(e["kind"] == "file" for e in manifest_files)
    assert shown["bytes"] == sum(e["size"] for e in manifest_files if e["kind"] == "file")
    assert [h["path"] for h in shown["hot"]] == ["bin/tool", "lib/pkg/__init__.py"]
    assert (shown["hot_files"], shown["hot_bytes"], shown["bytes_read"]) == (2, 18 + 6, 24)
    assert shown["first_reads"] == {"cache": 1, "prefetch": 0, "fetch": 1}
    assert shown["wait_seconds"] == [0.25]


# -- through the daemon (a host cache on Btrfs) ---------------------------------------------
def test_materialize_and_pin_json(host: Host, btrfs_dir: Path, tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    cas = tmp_path / "cas"
    digest = _json("pack", tree, "--cas", cas)["digest"]
    entries = walk(tree)
    sizes = _file_sizes(tree)
    pinned = _json("cache", "pin", digest, "--cas", cas, host=host)
    blobs = _manifest(cas, digest).blobs()
    assert pinned["digest"] == digest and pinned["pins"] == 1
    assert (pinned["blobs"], pinned["bytes"]) == (len(blobs), sum(blobs.values()))
    assert pinned["blobs_fetched"] == len(blobs)  # a cold cache
    again = _json("cache", "pin", digest, "--cas", cas, host=host)
    assert (again["pins"], again["blobs_fetched"]) == (2, 0)  # all cached already

    target = btrfs_dir / f"copy-{os.getpid()}"
    done = _json("materialize", digest, target, "--cas", cas, host=host)
    kinds = [st.st_mode & 0o170000 for st in entries.values()]
    assert done["target"] == str(target) and done["digest"] == digest
    assert done["files"] == len(sizes) and done["bytes"] == sum(sizes.values())
    assert done["dirs"] == kinds.count(0o040000)
    assert done["symlinks"] == kinds.count(0o120000)
    assert done["files"] + done["hardlinks"] == kinds.count(0o100000)
    assert done["reflinked"] + done["copied"] == done["files"]
    assert done["reflinked"] == done["files"]  # the target shares the cache's Btrfs
