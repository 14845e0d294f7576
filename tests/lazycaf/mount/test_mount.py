"""`lazycaf mount` end to end: the real CLI, the real FUSE mount, the real daemon, a cache on
a real Btrfs loop image."""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

from lazycaf.core.digest import Digest
from tests.conftest import CasServer, Host, run_cli, stop
from tests.helpers import make_tree, pack, wait_for, walk
from tests.slowproxy import slow_proxy

MiB = 1 << 20


def test_sample_python_runs_from_the_mount(host: Host, sample_tree: Path, tmp_path: Path) -> None:
    cas = tmp_path / "cas"
    pack(sample_tree, cas, "--tag", "sample:latest")
    mnt = host.mountpoint()
    out = host.cli("mount", "sample:latest", mnt, "--cas", cas).stdout.decode()
    assert "mounted sample:latest" in out and "log:" in out
    code = "import json, sqlite3, ssl, numpy; print(numpy.__file__)"
    proc = subprocess.run(
        [mnt / "bin/python3", "-v", "-c", code], capture_output=True, timeout=120, cwd="/"
    )
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert proc.stdout.decode().strip() == f"{mnt}/lib/python3.11/site-packages/numpy/__init__.py"
    log = proc.stderr.decode()
    # the packed .pyc files are used: none is stale, none is (re)written
    assert "code object from" in log and ".pyc" in log
    assert "bytecode is stale" not in log and "bad mtime" not in log
    assert "could not create" not in log and "# wrote" not in log
    stats = host.stats()
    assert stats["fetches"] > 0 and stats["fetch_failures"] == 0
    host.cli("umount", mnt)
    assert not any(mnt.iterdir())


def test_full_walk_matches_source(host: Host, tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    digest = pack(tree, tmp_path / "cas")
    mnt = host.mountpoint()
    host.cli("mount", digest, mnt, "--cas", tmp_path / "cas")
    source, mounted = walk(tree), walk(mnt)
    assert sorted(source) == sorted(mounted)
    for path, st in source.items():
        m = mounted[path]
        assert stat.S_IFMT(m.st_mode) == stat.S_IFMT(st.st_mode), path
        assert m.st_mtime_ns == st.st_mtime_ns, path
        if stat.S_ISLNK(st.st_mode):
            assert os.readlink(mnt / path) == os.readlink(tree / path)
            continue
        assert stat.S_IMODE(m.st_mode) == stat.S_IMODE(st.st_mode), path
        assert m.st_nlink == st.st_nlink, path
        if stat.S_ISDIR(st.st_mode):
            assert sorted(os.listdir(mnt / path)) == sorted(os.listdir(tree / path))
        else:
            assert m.st_size == st.st_size
            assert (mnt / path).read_bytes() == (tree / path).read_bytes(), path
    # hard links share an inode in the mount too
    assert (mnt / "lib/pkg/hardlink.py").stat().st_ino == (
        mnt / "lib/pkg/__init__.py"
    ).stat().st_ino
    assert sorted(os.listdir(mnt)) == sorted(os.listdir(tree))
    # read-only: writes are refused
    with pytest.raises(OSError) as info, open(mnt / "bin/tool", "r+b"):
        pass
    assert info.value.errno in (errno.EROFS, errno.EACCES)
    host.cli("umount", mnt)


def test_reads_fetch_only_what_they_touch(host: Host, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "small-a").write_bytes(b"a" * 1000)
    (tree / "small-b").write_bytes(b"b" * 2000)
    with open(tree / "huge.bin", "wb") as f:  # 1 GiB, every chunk distinct
        for i in range(1024):
            f.write(i.to_bytes(8, "little") * (MiB // 8))
    cas = tmp_path / "cas"
    digest = pack(tree, cas)
    mnt = host.mountpoint()
    # --no-prefetch: without a profile a mount would also fetch a missed file's siblings
    host.cli("mount", digest, mnt, "--cas", cas, "--no-prefetch")
    base = host.stats()

    assert (mnt / "small-a").read_bytes() == b"a" * 1000
    after = host.stats()
    assert after["fetches"] - base["fetches"] == 1
    assert after["bytes_fetched"] - base["bytes_fetched"] == 1000

    with open(mnt / "huge.bin", "rb") as f:
        f.seek(700 * MiB)
        data = f.read(4096)
    assert data == (700).to_bytes(8, "little") * 512
    huge = host.stats()
    # one 1 MiB chunk (the kernel's readahead stays inside it)
    assert huge["fetches"] - after["fetches"] == 1
    assert huge["bytes_fetched"] - after["bytes_fetched"] == MiB

    # a second mount of the same executable fetches nothing it already has
    mnt2 = host.mountpoint("mnt2")
    host.cli("mount", digest, mnt2, "--cas", cas, "--no-prefetch")
    assert (mnt2 / "small-a").read_bytes() == b"a" * 1000
    with open(mnt2 / "huge.bin", "rb") as f:
        f.seek(700 * MiB)
        assert f.read(4096) == data
    assert host.stats()["fetches"] == huge["fetches"]
    host.cli("umount", mnt)
    host.cli("umount", mnt2)


def test_two_mounts_reading_one_file_download_once(host: Host, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    payload = os.urandom(8 * MiB)
    (tree / "shared.bin").write_bytes(payload)
    cas = tmp_path / "cas"
    digest = pack(tree, cas)
    mounts = [host.mountpoint(f"m{i}") for i in range(2)]
    for m in mounts:
        host.cli("mount", digest, m, "--cas", cas)
    base = host.stats()
    results: list[bytes] = []
    barrier = threading.Barrier(2)

    def reader(m: Path) -> None:
        barrier.wait()
        results.append((m / "shared.bin").read_bytes())

    threads = [threading.Thread(target=reader, args=(m,)) for m in mounts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [payload, payload]
    after = host.stats()
    assert after["fetches"] - base["fetches"] == 8  # eight 1 MiB chunks, each fetched once
    assert after["bytes_fetched"] - base["bytes_fetched"] == 8 * MiB
    for m in mounts:
        host.cli("umount", m)


def test_corrupt_blob_gives_eio_for_that_file_only(host: Host, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "good").write_bytes(b"good bytes\n" * 100)
    (tree / "bad").write_bytes(b"will be corrupted\n" * 100)
    cas = tmp_path / "cas"
    digest = pack(tree, cas)
    rec = run_cli("ls", digest, "bad", "--json", "--cas", cas).stdout
    bad_digest = __import__("json").loads(rec)["digest"]
    (blob,) = (cas / "blobs" / bad_digest[:2]).glob(bad_digest + "*")
    blob.write_bytes(b"evil" * 100)
    mnt = host.mountpoint()
    host.cli("mount", digest, mnt, "--cas", cas)
    with pytest.raises(OSError) as info:
        (mnt / "bad").read_bytes()
    assert info.value.errno == errno.EIO
    assert (mnt / "good").read_bytes() == b"good bytes\n" * 100
    log = (host.cache / "logs").glob("mount*.log")
    lines = [line for p in log for line in p.read_text().splitlines()]
    assert any("read of bad" in line and bad_digest in line for line in lines), lines[-5:]
    assert not (host.cache / "blobs" / bad_digest[:2] / bad_digest).exists()
    host.cli("umount", mnt)


def test_unreachable_cas_gives_eio_within_the_timeout(
    host: Host, tmp_path: Path, cas_server: CasServer
) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "a").write_bytes(b"x" * 5000)
    env = {"LAZYCAF_CAS_TOKEN": cas_server.token}
    digest = run_cli("pack", tree, "--cas", cas_server.url, env=env).stdout.decode().strip()
    mnt = host.mountpoint()
    host.cli("mount", digest, mnt, "--cas", cas_server.url, "--fetch-timeout", "3")
    stop(cas_server.proc)
    start = time.monotonic()
    with pytest.raises(OSError) as info:
        (mnt / "a").read_bytes()
    assert info.value.errno == errno.EIO
    assert time.monotonic() - start < 15
    assert sorted(os.listdir(mnt)) == ["a"]  # the mount keeps working
    host.cli("umount", mnt)


def test_mount_and_umount_errors_are_one_clear_line(host: Host, tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    cas = tmp_path / "cas"
    digest = pack(tree, cas)

    def fails(*args: str | Path, code: int, needle: str) -> None:
        proc = host.cli(*args, check=False)
        err = proc.stderr.decode().strip().splitlines()
        assert proc.returncode == code, (args, proc.stderr)
        assert len(err) == 1 and needle in err[0], err

    mnt = host.mountpoint()
    fails("mount", "no-such:ref", mnt, "--cas", cas, code=1, needle="no-such:ref")
    assert not any(mnt.iterdir())
    fails("mount", digest, tmp_path / "missing", "--cas", cas, code=2, needle="does not exist")
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    fails("mount", digest, full, "--cas", cas, code=2, needle="not empty")
    fails("umount", mnt, code=2, needle="not mounted")
    fails("umount", tmp_path / "missing", code=2, needle="does not exist")

    host.cli("mount", digest, mnt, "--cas", cas)
    fails("mount", digest, mnt, "--cas", cas, code=2, needle="already a mount point")
    with open(mnt / "bin/tool", "rb"):
        fails("umount", mnt, code=1, needle="busy")
    host.cli("umount", mnt)
    assert not any(mnt.iterdir())


def test_daemon_restart_reconciles_cache(host: Host, tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    cas = tmp_path / "cas"
    digest = pack(tree, cas)
    mnt = host.mountpoint()
    host.cli("mount", digest, mnt, "--cas", cas)
    assert (mnt / "lib/pkg/__init__.py").read_text() == "x = 1\n"
    host.cli("umount", mnt)
    host.cli("fetcher", "stop")
    # what a crash mid-download leaves: a partial temp file, and a wrong "blob" that never
    # went through the verified commit path must not be trusted either
    (host.cache / "tmp" / "partial.download").write_bytes(b"half a blob")
    # and manifest indexes: one whose manifest is not cached, an index build abandoned an
    # hour ago, one a mount may be writing now
    manifests = host.cache / "manifests"
    ours = manifests / f"{digest}.idx"
    assert ours.exists()
    orphan = manifests / f"{'ab' * 32}.idx"
    orphan.write_bytes(b"an index of a manifest evicted before a crash")
    abandoned, building = manifests / f".{'cd' * 32}.x1", manifests / f".{'ef' * 32}.x2"
    abandoned.write_bytes(b"half an index")
    os.utime(abandoned, (time.time() - 7200,) * 2)
    building.write_bytes(b"half an index")
    host.cli("mount", digest, mnt, "--cas", cas)
    assert not any((host.cache / "tmp").iterdir())
    assert sorted(manifests.iterdir()) == sorted([ours, building])
    assert (mnt / "lib/pkg/sub/data.bin").read_bytes() == (
        tree / "lib/pkg/sub/data.bin"
    ).read_bytes()
    host.cli("umount", mnt)


def _daemon_pid(host: Host) -> int:
    return int((host.cache / "fetcher.lock").read_text())


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (not gone, not a zombie waiting to be reaped)."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat_line.rpartition(")")[2].split()[0] not in ("Z", "X")


def test_daemon_killed_mid_download_leaves_no_bad_blob(
    host: Host, tmp_path: Path, cas_server: CasServer
) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    payload = os.urandom(4 * MiB)  # incompressible: four 1 MiB chunks
    (tree / "big.bin").write_bytes(payload)
    env = {"LAZYCAF_CAS_TOKEN": cas_server.token}
    digest = run_cli("pack", tree, "--cas", cas_server.url, env=env).stdout.decode().strip()
    with slow_proxy(cas_server.url) as proxy:
        mnt = host.mountpoint()
        host.cli("mount", digest, mnt, "--cas", proxy.url, "--no-prefetch", "--eager-share", "0")
        killed = _daemon_pid(host)
        # from now on the daemon gets about 256 KiB of what the CAS sends, the rest waits
        proxy.hold(after=256 << 10)
        result: list[bytes | BaseException] = []

        def reader() -> None:
            try:
                result.append((mnt / "big.bin").read_bytes())
            except OSError as exc:
                result.append(exc)

        thread = threading.Thread(target=reader)
        thread.start()
        # the read is in flight: the daemon is part way through the file's first chunk, and
        # the rest of it cannot reach the daemon before the kill
        wait_for(proxy.held, "the rest of the first chunk, held at the proxy")
        assert thread.is_alive() and not result
        os.kill(killed, signal.SIGKILL)
        wait_for(lambda: not _running(killed), f"the daemon (pid {killed}) to die")
        proxy.release()
        thread.join(60)
        assert not thread.is_alive(), "the read never finished"
        # the mount started a new daemon (which reconciled the cache) and it served the read
        (read,) = result
        assert not isinstance(read, BaseException), f"the read failed: {read!r}"
        assert Digest.of(read) == Digest.of(payload), "the read returned other bytes"
        restarted = _daemon_pid(host)
        assert restarted != killed and _running(restarted)
        assert host.stats()["bytes_fetched"] >= len(payload)  # the new daemon's own count
        assert not any((host.cache / "tmp").iterdir())
        for blob in (host.cache / "blobs").glob("*/*"):
            assert Digest.of(blob.read_bytes()).hex == blob.name
        host.cli("umount", mnt)


def test_the_mount_reads_ahead_a_mebibyte(host: Host, tmp_path: Path) -> None:
    """The kernel caps a FUSE mount's readahead at what the INIT answer said (128 KiB) when it
    gets that answer, which also caps every read request: the mount sets its own
    ``read_ahead_kb`` after INIT, and a sequential read then comes in 1 MiB requests."""
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "big.bin").write_bytes(bytes(range(256)) * (16 * MiB // 256))
    digest = pack(tree, tmp_path / "cas")
    mnt = host.mountpoint()
    host.cli("mount", digest, mnt, "--cas", tmp_path / "cas", "--no-prefetch")
    try:
        dev = os.stat(mnt).st_dev
        setting = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
        deadline = time.monotonic() + 5
        while setting.read_text().strip() != "1024" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert setting.read_text().strip() == "1024"
        with open(mnt / "big.bin", "rb") as f:
            while f.read(MiB):
                pass
    finally:
        host.cli("umount", mnt)
    log = (host.cache / "logs").glob("mount*.log")
    counts = [line for p in log for line in p.read_text().splitlines() if "FUSE requests" in line]
    reads = json.loads(counts[-1].partition("opcode: ")[2])["read"]
    assert reads <= 20  # 16 MiB in 1 MiB requests (128 KiB ones would be 128)
