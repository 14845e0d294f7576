"""`lazycaf mount --offline` with the CAS gone: refuses clearly when blobs are missing,
mounts and reads everything when the cache holds it all. Real CLI, daemon, FUSE, Btrfs."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from tests.conftest import CasServer, Host, run_cli, stop
from tests.helpers import make_tree, wait_for

MiB = 1 << 20


def pack_http(tree: Path, server: CasServer, tag: str) -> str:
    env = {"LAZYCAF_CAS_TOKEN": server.token}
    out = run_cli("pack", tree, "--cas", server.url, "--tag", tag, env=env)
    return out.stdout.decode().strip()


def read_tree(root: Path) -> dict[str, bytes]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = Path(dirpath, name)
            if not p.is_symlink():
                out[str(p.relative_to(root))] = p.read_bytes()
    return out


def one_line_failure(host: Host, *args: str | Path, code: int) -> str:
    proc = host.cli(*args, check=False)
    lines = proc.stderr.decode().strip().splitlines()
    assert proc.returncode == code, proc.stderr
    assert len(lines) == 1, lines
    return lines[0]


def test_offline_refuses_when_blobs_are_missing(
    host: Host, tmp_path: Path, cas_server: CasServer
) -> None:
    tree = make_tree(tmp_path / "tree")  # data.bin: 4 chunks; 6 blobs in all
    digest = pack_http(tree, cas_server, "tool:1")
    mnt = host.mountpoint()
    host.cli("mount", "tool:1", mnt, "--cas", cas_server.url, "--no-prefetch", "--eager-share", "0")
    assert (mnt / "bin/tool").read_bytes() == b"#!/bin/sh\necho hi\n"
    host.cli("umount", mnt)
    stop(cas_server.proc)
    host.cli("fetcher", "stop")  # the next daemon starts with the CAS gone

    offline = ("--offline", "--cas", cas_server.url)
    err = one_line_failure(host, "mount", *offline, "tool:1", mnt, code=3)
    m = re.search(r"offline: (\d+) of (\d+) blobs \((\S+ \S+) of", err)
    assert m and int(m[1]) == int(m[2]) - 1 and "tool:1" in err, err  # all but bin/tool
    assert m[3] == "3.0 MiB"  # data.bin, mostly
    assert not any(mnt.iterdir())
    # by digest too, and a ref this cache never resolved is refused as unknown
    err = one_line_failure(host, "mount", *offline, digest, mnt, code=3)
    assert f"{m[1]} of {m[2]} blobs" in err
    err = one_line_failure(host, "mount", *offline, "other:1", mnt, code=1)
    assert "other:1" in err and "offline" in err
    err = one_line_failure(host, "mount", *offline, "ab" * 32, mnt, code=3)
    assert "not in the cache" in err


def test_offline_mount_works_when_everything_is_cached(
    host: Host, tmp_path: Path, cas_server: CasServer
) -> None:
    tree = make_tree(tmp_path / "tree")
    (tree / "lib/text.txt").write_bytes(b"compressible text, line after line\n" * 100_000)
    pack_http(tree, cas_server, "tool:2")
    out = host.cli("cache", "pin", "tool:2", "--cas", cas_server.url).stdout.decode()
    assert "pinned tool:2" in out
    stop(cas_server.proc)
    host.cli("fetcher", "stop")

    mnt = host.mountpoint()
    out = host.cli("mount", "--offline", "tool:2", mnt, "--cas", cas_server.url).stdout.decode()
    assert "mounted tool:2" in out
    assert read_tree(mnt) == read_tree(tree)
    assert os.readlink(mnt / "bin/tool-link") == "tool"
    stats = host.stats()
    assert stats["fetches"] == 0 and stats["fetch_failures"] == 0
    # the pin's daemon stopped before compressing what it wrote; this one does it
    wait_for(lambda: host.stats()["compressed_later_blobs"] > 0, "the compactor", timeout=30)
    host.cli("umount", mnt)

    st = json.loads(host.cli("cache", "status", "--json").stdout)
    assert st["pinned"][0]["refs"] == ["tool:2"]
    comp = st["compression"]
    assert comp["method"] in ("compsize", "tree-search"), comp
    assert comp["ratio"] > 1.5, comp  # zstd on the Btrfs cache: the text compresses
    text = host.cli("cache", "status").stdout.decode()
    assert "compression" in text and "x (" in text
