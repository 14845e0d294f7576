"""`lazycaf materialize`: reflinked full trees on Btrfs, copies elsewhere."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from lazycaf.core.digest import Digest
from tests.conftest import Host, run_cli
from tests.helpers import make_tree, walk


def exclusive_bytes(path: Path) -> int:
    subprocess.run(["sync"], check=True)
    out = (
        subprocess.run(
            ["btrfs", "filesystem", "du", "-s", "--raw", str(path)],
            check=True,
            capture_output=True,
            text=True,
        )
        .stdout.splitlines()[-1]
        .split()
    )
    return int(out[1])  # Total, Exclusive, Set shared, Filename


def test_materialize_reflinks_on_btrfs(host: Host, btrfs_dir: Path, tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    with open(tree / "lib/big.bin", "wb") as f:
        for _ in range(5):
            f.write(os.urandom(1 << 20))
        f.write(b"tail")
    cas = tmp_path / "cas"
    digest = run_cli("pack", tree, "--cas", cas).stdout.decode().strip()
    target = btrfs_dir / f"mat-{os.getpid()}"
    out = host.cli("materialize", digest, target, "--cas", cas)
    assert b"0 copied" in out.stdout and out.stderr == b""
    try:
        source, copy = walk(tree), walk(target)
        assert sorted(source) == sorted(copy)
        for path, st in source.items():
            c = copy[path]
            assert (c.st_mode, c.st_mtime_ns) == (st.st_mode, st.st_mtime_ns), path
            if os.path.islink(tree / path):
                assert os.readlink(target / path) == os.readlink(tree / path)
            elif os.path.isfile(tree / path):
                assert c.st_nlink == st.st_nlink, path
                assert (target / path).read_bytes() == (tree / path).read_bytes(), path
        # every data extent is shared with the cache: no byte was copied. Btrfs keeps blobs
        # under 2 KiB inline in metadata, which cannot be shared: a small file, or the short
        # last chunk of a big one, may cost one block; nothing else may.
        files = [p for p in source if os.path.isfile(tree / p) and not os.path.islink(tree / p)]
        assert exclusive_bytes(target) <= 4096 * len(files)
        for p in files:
            assert exclusive_bytes(target / p) <= 4096, p
        assert exclusive_bytes(target / "lib/pkg/sub/data.bin") < 3 << 20
        # writing into the copy changes only the copy
        rec = json.loads(run_cli("ls", digest, "bin/tool", "--json", "--cas", cas).stdout)
        blob = host.cache / "blobs" / rec["digest"][:2] / rec["digest"]
        (target / "bin/tool").chmod(0o644)
        with open(target / "bin/tool", "r+b") as f:
            f.write(b"#!/bin/false")
        assert Digest.of(blob.read_bytes()).hex == rec["digest"]
        assert (tree / "bin/tool").read_bytes() != (target / "bin/tool").read_bytes()
        # a second materialize of the same executable shares the same extents
        target2 = btrfs_dir / f"mat2-{os.getpid()}"
        host.cli("materialize", digest, target2, "--cas", cas)
        assert exclusive_bytes(target2 / "lib/big.bin") <= 4096
        subprocess.run(["rm", "-rf", str(target2)], check=True)
        # --copy: the same tree, sharing no extent with the cache, and no note about it
        target3 = btrfs_dir / f"mat3-{os.getpid()}"
        out = host.cli("materialize", digest, target3, "--cas", cas, "--copy")
        assert b" 0 reflinked" in out.stdout and out.stderr == b""
        assert (target3 / "lib/big.bin").read_bytes() == (tree / "lib/big.bin").read_bytes()
        assert exclusive_bytes(target3 / "lib/big.bin") >= 5 << 20
        subprocess.run(["rm", "-rf", str(target3)], check=True)
    finally:
        subprocess.run(["rm", "-rf", str(target)], check=True)


def test_materialize_elsewhere_copies_and_says_so(host: Host, tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    cas = tmp_path / "cas"
    digest = run_cli("pack", tree, "--cas", cas).stdout.decode().strip()
    target = tmp_path / "copy"  # not on the cache's Btrfs
    proc = host.cli("materialize", digest, target, "--cas", cas)
    notes = proc.stderr.decode().strip().splitlines()
    assert len(notes) == 1 and "copied, not reflinked" in notes[0]
    assert (target / "lib/pkg/sub/data.bin").read_bytes() == (
        tree / "lib/pkg/sub/data.bin"
    ).read_bytes()
    proc = host.cli("materialize", digest, target, "--cas", cas, check=False)
    assert proc.returncode == 2 and b"not an empty directory" in proc.stderr
