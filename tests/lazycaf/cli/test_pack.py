"""`lazycaf pack / ls / cat / diff` driven through the real CLI, against both CAS backends."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import time
from pathlib import Path

import pytest

from lazycaf.core.digest import Digest
from tests.conftest import CasServer, require, run_cli
from tests.helpers import make_tree, pack, walk


@pytest.fixture(params=["local", pytest.param("http", marks=pytest.mark.slow)])
def cas(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A CAS to pack into: a local directory, or a CAS server process (slow tier)."""
    if request.param == "local":
        return str(tmp_path / "local-cas")
    server: CasServer = request.getfixturevalue("cas_server")
    os.environ["LAZYCAF_CAS_TOKEN"] = server.token
    request.addfinalizer(lambda: os.environ.pop("LAZYCAF_CAS_TOKEN", None))
    return server.url


@pytest.mark.slow
def test_round_trip_every_entry_kind(tmp_path: Path, cas: str) -> None:
    tree = make_tree(tmp_path / "tree")
    digest = pack(tree, cas, "--tag", "demo:v1")
    listing = [
        json.loads(line)
        for line in run_cli("ls", "demo:v1", "-R", "--json", "--cas", cas).stdout.splitlines()
    ]
    by_path = {r["path"]: r for r in listing}
    source = walk(tree)
    assert set(by_path) == set(source)
    inode_first: dict[int, str] = {}
    for path in sorted(source):
        st, rec = source[path], by_path[path]
        assert rec["mtime_ns"] == st.st_mtime_ns, path
        if stat.S_ISLNK(st.st_mode):
            assert rec["kind"] == "symlink" and rec["target"] == os.readlink(tree / path)
            continue
        assert rec["mode"] == stat.S_IMODE(st.st_mode), path
        if stat.S_ISDIR(st.st_mode):
            assert rec["kind"] == "dir"
            continue
        assert rec["nlink"] == st.st_nlink, path
        if st.st_ino in inode_first:
            assert rec["kind"] == "hardlink" and rec["target"] == inode_first[st.st_ino]
        else:
            inode_first[st.st_ino] = path
            assert rec["kind"] == "file"
        data = run_cli("cat", digest, path, "--cas", cas).stdout
        assert data == (tree / path).read_bytes(), path
        assert rec["digest"] == Digest.of(data).hex, path  # lib/pkg/empty: the empty blob's
    assert by_path["lib/pkg/empty"]["size"] == 0
    # cat follows symlinks inside the tree, like cat(1)
    assert run_cli("cat", digest, "bin/tool-link", "--cas", cas).stdout == b"#!/bin/sh\necho hi\n"
    # ls -l style output names the entries of a directory
    text = run_cli("ls", digest, "bin", "--cas", cas).stdout.decode()
    assert "-rwxr-xr-x" in text and "tool-link -> tool" in text


def test_determinism_same_tree_and_copy(tmp_path: Path, cas: str) -> None:
    tree = make_tree(tmp_path / "tree")
    first = pack(tree, cas)
    assert pack(tree, cas) == first
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(tree, copy, symlinks=True, copy_function=shutil.copy2)
    # copytree breaks hard links; restore them the way cp -a would
    for name in ("lib/pkg/hardlink.py", "bin/hardlink2"):
        (copy / name).unlink()
        os.link(copy / "lib/pkg/__init__.py", copy / name)
    shutil.copystat(tree, copy)
    for sub in ("lib/pkg", "bin"):
        shutil.copystat(tree / sub, copy / sub)
    assert pack(copy, cas) == first


@pytest.mark.slow
def test_setid_bits_dropped_unless_asked(tmp_path: Path) -> None:
    tree = tmp_path / "t"
    tree.mkdir()
    (tree / "suid").write_text("x")
    (tree / "suid").chmod(0o4755)
    cas = str(tmp_path / "cas")
    rec = json.loads(run_cli("ls", pack(tree, cas), "suid", "--json", "--cas", cas).stdout)
    assert rec["mode"] == 0o755
    kept = pack(tree, cas, "--keep-setid")
    assert json.loads(run_cli("ls", kept, "suid", "--json", "--cas", cas).stdout)["mode"] == 0o4755


def test_incremental_uploads_only_changes(tmp_path: Path, cas_server: CasServer) -> None:
    env = {"LAZYCAF_CAS_TOKEN": cas_server.token}
    tree = make_tree(tmp_path / "tree")
    big = tree / "lib/big.bin"
    with open(big, "wb") as f:
        for _ in range(100):
            f.write(os.urandom(1 << 20))

    def pack_count() -> tuple[str, int]:
        before = cas_server.stats()["blobs_stored"]
        out = run_cli("pack", tree, "--cas", cas_server.url, env=env).stdout.decode().strip()
        return out, cas_server.stats()["blobs_stored"] - before

    first, stored = pack_count()
    assert stored > 100
    again, stored = pack_count()
    assert (again, stored) == (first, 0)

    (tree / "lib/pkg/__init__.py").write_text("x = 2\n")
    changed, stored = pack_count()
    assert changed != first and stored == 2  # the file's blob and the manifest

    with open(big, "r+b") as f:
        f.seek(57 * (1 << 20) + 8192)
        f.write(os.urandom(4096))
    _, stored = pack_count()
    assert stored == 2  # one 1 MiB chunk and the manifest

    diff = run_cli("diff", changed, _, "--cas", cas_server.url).stdout.decode()
    assert "M lib/big.bin" in diff and "1048576 differ" in diff


@pytest.mark.slow
def test_diff_added_removed_changed(tmp_path: Path) -> None:
    cas = str(tmp_path / "cas")
    tree = make_tree(tmp_path / "tree")
    a = pack(tree, cas)
    (tree / "bin/new").write_text("new file\n")
    (tree / "lib/pkg/empty").unlink()
    (tree / "bin/tool").chmod(0o700)
    b = pack(tree, cas)
    lines = run_cli("diff", a, b, "--cas", cas).stdout.decode().splitlines()
    assert "+ bin/new (9 bytes)" in lines
    assert "- lib/pkg/empty (0 bytes)" in lines
    assert any(line.startswith("M bin/tool (mode 755->700") for line in lines)
    assert lines[-1].startswith("1 added (9 bytes), 1 removed (0 bytes), ")


@pytest.mark.slow
def test_unknown_ref_and_path(tmp_path: Path) -> None:
    cas = str(tmp_path / "cas")
    tree = make_tree(tmp_path / "tree")
    digest = pack(tree, cas)
    proc = run_cli("ls", "no-such:ref", "--cas", cas, check=False)
    assert proc.returncode == 1
    assert proc.stderr.decode().strip().splitlines() == [
        f"lazycaf: error: unknown ref 'no-such:ref' in {cas}"
    ]
    proc = run_cli("cat", digest, "no/such/file", "--cas", cas, check=False)
    assert proc.returncode == 1 and b"no/such/file" in proc.stderr
    missing = "ab" * 32
    proc = run_cli("ls", missing, "--cas", cas, check=False)
    assert proc.returncode == 1 and missing.encode() in proc.stderr


@pytest.mark.slow
def test_tampered_blob_and_manifest_are_integrity_errors(tmp_path: Path) -> None:
    cas = tmp_path / "cas"
    tree = make_tree(tmp_path / "tree")
    digest = pack(tree, str(cas))
    # flip a byte in the stored manifest
    (mpath,) = [p for p in (cas / "blobs" / digest[:2]).iterdir() if p.name.startswith(digest)]
    data = bytearray(mpath.read_bytes())
    data[len(data) // 2] ^= 0xFF
    mpath.write_bytes(bytes(data))
    proc = run_cli("ls", digest, "--cas", cas, check=False)
    assert proc.returncode == 4 and digest.encode() in proc.stderr
    assert b"Traceback" not in proc.stderr

    tree2 = tmp_path / "tree2"
    tree2.mkdir()
    (tree2 / "f").write_bytes(b"precious bytes" * 10)
    d2 = pack(tree2, str(cas))
    rec = json.loads(run_cli("ls", d2, "f", "--json", "--cas", cas).stdout)
    (bpath,) = [
        p for p in (cas / "blobs" / rec["digest"][:2]).iterdir() if p.name.startswith(rec["digest"])
    ]
    bpath.write_bytes(b"evil bytes" * 14)
    proc = run_cli("cat", d2, "f", "--cas", cas, check=False)
    assert proc.returncode == 4 and rec["digest"].encode() in proc.stderr
    assert proc.stdout == b""  # nothing unverified reached the user


@pytest.mark.slow
def test_refuses_fifo_socket_and_bad_names(tmp_path: Path) -> None:
    cas = str(tmp_path / "cas")
    tree = tmp_path / "t"
    tree.mkdir()
    (tree / "ok").write_text("ok")
    os.mkfifo(tree / "fifo")
    proc = run_cli("pack", tree, "--cas", cas, check=False)
    assert proc.returncode == 2 and b"fifo" in proc.stderr and b"Traceback" not in proc.stderr
    (tree / "fifo").unlink()
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(tree / "sock"))
        proc = run_cli("pack", tree, "--cas", cas, check=False)
    assert proc.returncode == 2 and b"socket" in proc.stderr
    (tree / "sock").unlink()
    os.close(os.open(os.fsencode(tree) + b"/bad-\xff-name", os.O_CREAT | os.O_WRONLY))
    proc = run_cli("pack", tree, "--cas", cas, check=False)
    assert proc.returncode == 2 and b"UTF-8" in proc.stderr
    proc = run_cli("pack", tmp_path / "does-not-exist", "--cas", cas, check=False)
    assert proc.returncode == 2 and b"does-not-exist" in proc.stderr


def test_symlink_escaping_tree_is_stored_not_followed(tmp_path: Path) -> None:
    cas = str(tmp_path / "cas")
    secret = tmp_path / "secret"
    secret.write_text("outside the tree")
    tree = tmp_path / "t"
    tree.mkdir()
    os.symlink(secret, tree / "escape")
    os.symlink("..", tree / "up")
    digest = pack(tree, cas)
    rec = json.loads(run_cli("ls", digest, "escape", "--json", "--cas", cas).stdout)
    assert rec["kind"] == "symlink" and rec["target"] == str(secret)
    proc = run_cli("cat", digest, "escape", "--cas", cas, check=False)
    assert proc.returncode == 1 and b"outside the tree" not in proc.stdout


def test_cas_unreachable_fails_fast(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    start = time.monotonic()
    proc = run_cli("ls", "x:y", "--cas", url, check=False, timeout=60)
    assert time.monotonic() - start < 5.0  # a refused connection is known at once
    assert proc.returncode == 3
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and url in lines[0]


def test_sample_executable_packs(sample_tree: Path, tmp_path: Path) -> None:
    require(shutil.which("patchelf") is not None, "patchelf")
    cas = str(tmp_path / "cas")
    digest = pack(sample_tree, cas, "--tag", "sample:latest")
    out = run_cli("cat", "sample:latest", "bin/python3", "--cas", cas).stdout
    assert out == (sample_tree / "bin/python3.11").read_bytes()
    assert digest == pack(sample_tree, cas)


def test_a_repack_leaves_the_blobs_the_last_packs_ref_holds_alone(tmp_path: Path) -> None:
    """A re-pack does not ask the store about (nor refresh) the blobs of unchanged files
    while the ref the last pack set still names its manifest; once it does not, it asks
    about every blob again (a directory store refreshes each one's mtime)."""
    tree = make_tree(tmp_path / "tree")
    old = 1_600_000_000 * 10**9
    for path in tree.rglob("*"):
        os.utime(path, ns=(old, old), follow_symlinks=False)  # none racy for the stat cache
    cas, env = tmp_path / "cas", {"LAZYCAF_STATE": str(tmp_path / "state")}
    run_cli("pack", tree, "--cas", cas, "--tag", "app:1", env=env)

    def blobs_made_old() -> dict[Path, int]:
        files = [p for p in (cas / "blobs").rglob("*") if p.is_file()]
        for p in files:
            os.utime(p, ns=(old, old))
        return {p: old for p in files}

    before = blobs_made_old()
    (tree / "lib/pkg/__init__.py").write_text("x = 2\n")
    run_cli("pack", tree, "--cas", cas, "--tag", "app:2", env=env)
    assert {p: p.stat().st_mtime_ns for p in before} == before
    run_cli("ref", "rm", "app:2", "--cas", cas, env=env)  # the last pack's ref is gone
    before = blobs_made_old()
    run_cli("pack", tree, "--cas", cas, "--tag", "app:3", env=env)
    untouched = [p for p in before if p.stat().st_mtime_ns == old]
    assert len(untouched) == 2  # the manifests of app:1 and app:2, which the tree lacks


def test_a_stat_cache_that_cannot_be_saved_is_a_warning_not_a_failed_pack(tmp_path: Path) -> None:
    """The manifest and its ref are stored before the stat cache is saved: a state directory
    that cannot be written (here a path below a regular file) costs the next pack a re-hash,
    said in one line, and the pack still succeeds with its digest."""
    tree = make_tree(tmp_path / "tree")
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    cas = tmp_path / "cas"
    env = {"LAZYCAF_STATE": str(blocker / "state")}
    proc = run_cli("pack", tree, "--cas", cas, "--tag", "app:1", env=env)
    digest = proc.stdout.decode().strip()
    assert run_cli("ref", "ls", "--cas", cas).stdout.decode().split() == [digest, "app:1"]
    lines = [ln for ln in proc.stderr.decode().splitlines() if "stat cache" in ln]
    assert len(lines) == 1 and str(blocker / "state") in lines[0]
    assert "hashes every file" in lines[0] and "Traceback" not in proc.stderr.decode()
