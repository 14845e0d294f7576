"""The host cache's LMDB index on a full disk: errors, never a dead process."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, require

# Each step is a process of its own, as the daemon and the mounts are: a write through LMDB's
# lock-file mapping that the disk cannot take kills the process with SIGBUS (returncode -7).
_STEP = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from lazycaf.core.digest import Digest
    from lazycaf.core.errors import CacheFull
    from lazycaf.host.index import Index

    path, role = Path(sys.argv[1]), sys.argv[2]
    index = Index(path, readonly=role == "reader")
    for _ in range(100):  # every read transaction writes its reader slot
        assert index.get(Digest.of(b"first")).size == 5
    if role == "writer":
        try:
            for i in range(2000):
                index.put(Digest.of(str(i).encode()), i)
            index.sync()
            print("stored")
        except CacheFull as exc:
            print("full:", exc)
    index.close()
    print("ok")
    """
)


def _step(path: Path, role: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-X", "faulthandler", "-c", _STEP, str(path), role]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60, cwd=REPO)


def _fill(directory: Path) -> None:
    """Write incompressible data until the filesystem refuses more, then flush everything, so
    the index's pages are clean (written back) and a write to one must find new space."""
    with open(directory / "filler", "wb") as f:
        try:
            while True:
                f.write(os.urandom(1 << 20))
                f.flush()
        except OSError:
            pass
    os.sync()


@pytest.mark.root
@pytest.mark.parametrize("role", ["writer", "reader"])
def test_a_full_btrfs_fails_index_writes_without_killing_the_process(
    small_btrfs: Path, role: str
) -> None:
    from lazycaf.core.digest import Digest
    from lazycaf.host.index import Index

    path = small_btrfs / "index"
    index = Index(path)
    index.put(Digest.of(b"first"), 5)
    index.sync()
    index.close()
    _fill(small_btrfs)
    for _ in range(2):  # the second run finds the pages the first one dirtied written back
        proc = _step(path, role)
        assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
        assert proc.stdout.endswith("ok\n"), proc.stdout
        os.sync()


def test_the_lock_file_lives_off_the_disk_and_an_old_one_moves_when_no_one_uses_it(
    tmp_path: Path,
) -> None:
    require(os.geteuid() == 0, "the index lock moves off the cache disk for root only")
    import lmdb

    from lazycaf.core.digest import Digest
    from lazycaf.host.index import Index
    from lazycaf.host.indexlock import LOCK_DIR, LOCK_SIZE, lock_target

    path = tmp_path / "index"
    old = lmdb.open(str(path), max_dbs=3)  # a cache made before: a regular lock.mdb
    old.close()
    assert (path / "lock.mdb").is_file() and not (path / "lock.mdb").is_symlink()
    # a reader keeps it open in another process: the writer must leave the file where it is
    with _holder(path):
        index = Index(path)
        assert not (path / "lock.mdb").is_symlink()
        index.put(Digest.of(b"kept"), 4)
        index.close()
    index = Index(path)  # alone now: the lock file moves to root's directory under /run
    target = lock_target(path)
    try:
        link = path / "lock.mdb"
        assert link.is_symlink() and Path(os.readlink(link)) == target
        assert target.parent == LOCK_DIR and (LOCK_DIR.stat().st_mode & 0o777) == 0o700
        st = target.stat()  # written in full: no page of it waits for space
        assert st.st_size >= LOCK_SIZE and st.st_blocks * 512 >= st.st_size
        assert index.get(Digest.of(b"kept")) is not None
        with _holder(path):  # a reader follows the link
            pass
    finally:
        index.close()
        target.unlink()


def test_a_copied_cache_gets_a_lock_file_of_its_own(tmp_path: Path) -> None:
    """A copy's link names the original's lock file: the copy's daemon points it at its
    own without touching the original's (in use here), and a reader refuses it first."""
    require(os.geteuid() == 0, "the index lock moves off the cache disk for root only")
    import shutil

    from lazycaf.core.digest import Digest
    from lazycaf.host.index import Index
    from lazycaf.host.indexlock import LockElsewhere, lock_target

    original, copy = tmp_path / "a" / "index", tmp_path / "b" / "index"
    index = Index(original)
    try:
        index.put(Digest.of(b"a"), 1)
        index.sync()
        shutil.copytree(original, copy, symlinks=True)
        assert os.readlink(copy / "lock.mdb") == str(lock_target(original))
        with pytest.raises(LockElsewhere, match=r"disk remounted\): start its fetcher daemon"):
            Index(copy, readonly=True)
        theirs = Index(copy)  # the copy's writer
        try:
            assert os.readlink(copy / "lock.mdb") == str(lock_target(copy))
            theirs.put(Digest.of(b"b"), 2)
            assert index.get(Digest.of(b"b")) is None and theirs.get(Digest.of(b"a")) is not None
        finally:
            theirs.close()
        index.put(Digest.of(b"c"), 3)
        assert index.get(Digest.of(b"a")) is not None
    finally:
        index.close()
        for p in (original, copy):
            lock_target(p).unlink(missing_ok=True)


def test_after_a_reboot_a_reader_alone_makes_the_lock_file_again(tmp_path: Path) -> None:
    require(os.geteuid() == 0, "the index lock moves off the cache disk for root only")
    from lazycaf.host.index import Index
    from lazycaf.host.indexlock import LOCK_SIZE, lock_target

    path = tmp_path / "index"
    Index(path).close()
    target = lock_target(path)
    target.unlink()  # what a reboot does to /run
    with _holder(path):  # `cache status` with no daemon running
        assert target.stat().st_size >= LOCK_SIZE
    target.unlink()


def test_a_reader_never_locks_apart_from_a_running_daemon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the daemon holds fetcher.lock, a reader that does not see the daemon's lock
    file (another /run: a container, a removed directory) refuses instead of making one,
    once it has waited for a daemon that may be opening the index."""
    require(os.geteuid() == 0, "the index lock moves off the cache disk for root only")
    import fcntl

    from lazycaf.host import indexlock
    from lazycaf.host.index import Index
    from lazycaf.host.indexlock import LockElsewhere, lock_target

    monkeypatch.setattr(indexlock, "_DAEMON_WAIT", 0.3)

    cache = tmp_path / "cache"
    path = cache / "index.lmdb"
    Index(path).close()
    target = lock_target(path)
    with open(cache / "fetcher.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # the daemon
        target.unlink()
        with pytest.raises(LockElsewhere, match="does not see it using the lock file"):
            Index(path, readonly=True)
        assert not target.exists()
        target.write_bytes(b"")  # a file of its own that nobody uses
        with pytest.raises(LockElsewhere, match="does not see it using the lock file"):
            Index(path, readonly=True)
    target.unlink()


@pytest.mark.parametrize("old_target", ["gone", "unused", "in use"])
def test_a_reader_alone_follows_a_renumbered_disk(tmp_path: Path, old_target: str) -> None:
    """The link names another lock file (a reboot or a remount gave the disk another device
    number): with no daemon running and nobody using that file, a reader points the link
    right itself; a file in use (the original of a copy) it leaves alone and refuses."""
    require(os.geteuid() == 0, "the index lock moves off the cache disk for root only")
    from lazycaf.host.index import Index
    from lazycaf.host.indexlock import LOCK_DIR, LockElsewhere, lock_target

    path = tmp_path / "cache" / "index.lmdb"
    Index(path).close()
    lock_target(path).unlink()
    old = LOCK_DIR / f"index-0-{os.getpid():x}.lock"
    (path / "lock.mdb").unlink()
    (path / "lock.mdb").symlink_to(old)
    try:
        if old_target == "gone":
            old.unlink(missing_ok=True)
        else:
            old.write_bytes(bytes(64 << 10))
        if old_target == "in use":  # another process holds it as LMDB does: byte 0
            code = (
                "import fcntl, sys; f = open(sys.argv[1], 'r+b'); "
                "fcntl.lockf(f, fcntl.LOCK_SH, 1, 0); print('held', flush=True); "
                "sys.stdin.readline()"
            )
            cmd = [sys.executable, "-c", code, str(old)]
            holder = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            try:
                assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
                with pytest.raises(LockElsewhere, match="start its fetcher daemon first"):
                    Index(path, readonly=True)
            finally:
                holder.communicate(b"\n", timeout=30)
            return
        with _holder(path):
            assert os.readlink(path / "lock.mdb") == str(lock_target(path))
    finally:
        old.unlink(missing_ok=True)
        lock_target(path).unlink(missing_ok=True)


def test_the_same_index_by_two_paths_is_one_index(tmp_path: Path) -> None:
    from lazycaf.core.errors import Unavailable
    from lazycaf.host.index import Index

    path = tmp_path / "index"
    (tmp_path / "alias").symlink_to(path.name)
    index = Index(path)
    try:
        with pytest.raises(Unavailable, match="already open in this process"):
            Index(tmp_path / "alias", readonly=True)
    finally:
        index.close()


def test_one_index_of_a_path_at_a_time_in_a_process(tmp_path: Path) -> None:
    from lazycaf.core.errors import Unavailable
    from lazycaf.host.index import Index

    path = tmp_path / "index"
    index = Index(path)
    try:
        with pytest.raises(Unavailable, match="already open in this process"):
            Index(path, readonly=True)
    finally:
        index.close()
    Index(path, readonly=True).close()  # once closed, it opens again


@contextlib.contextmanager
def _holder(path: Path) -> Iterator[None]:
    """Another process holding the index open read-only, as a mount does."""
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(path)],
        stdout=subprocess.PIPE,
        stdin=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"open\n"
        yield
    finally:
        holder.communicate(b"\n", timeout=30)
    assert holder.returncode == 0


# opens the index read-only (a mount) and holds it until told to stop on stdin
_HOLD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from lazycaf.host.index import Index

    index = Index(Path(sys.argv[1]), readonly=True)
    print("open", flush=True)
    sys.stdin.readline()
    index.close()
    """
)


def test_forget_lock_removes_the_lock_file_of_a_cache_being_deleted(tmp_path: Path) -> None:
    require(os.geteuid() == 0, "the index lock moves off the cache disk for root only")
    from lazycaf.host.index import Index
    from lazycaf.host.indexlock import forget_lock

    path = tmp_path / "index"
    Index(path).close()
    target = Path(os.readlink(path / "lock.mdb"))
    assert target.exists()
    forget_lock(path)
    assert not target.exists()
    forget_lock(path)  # twice, or an index without one: nothing to do
    forget_lock(tmp_path / "nothing")
    elsewhere = tmp_path / "elsewhere.lock"  # never a file outside the lock directory
    elsewhere.write_bytes(b"")
    (path / "lock.mdb").unlink()
    (path / "lock.mdb").symlink_to(elsewhere)
    forget_lock(path)
    assert elsewhere.exists()


def test_another_users_index_keeps_its_lock_file_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """logind deletes a regular user's runtime files at logout."""
    from lazycaf.core.digest import Digest
    from lazycaf.host.index import Index

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    path = tmp_path / "index"
    index = Index(path)
    index.put(Digest.of(b"x"), 1)
    index.close()
    lock = path / "lock.mdb"
    assert lock.is_file() and not lock.is_symlink()


def test_a_record_keeps_its_synced_and_plain_flags_and_older_records_read(tmp_path: Path) -> None:
    import lmdb

    from lazycaf.core.digest import Digest
    from lazycaf.host.index import BlobRecord, Index

    a, b, old = (Digest.of(x) for x in (b"a", b"b", b"written by an older version"))
    index = Index(tmp_path / "index")
    try:
        index.put_many([(a, BlobRecord(10, 1, 0, False, True)), (b, BlobRecord(20, 2))])
        assert index.get(a) == BlobRecord(10, 1, 0, False, True)
        assert index.get(b) == BlobRecord(20, 2, 0, True, False)
        index.mark_synced([a])
        index.mark_compressed([a, b])
        assert index.get(a) == BlobRecord(10, 1, 0, True, False)
    finally:
        index.close()
    env = lmdb.open(str(tmp_path / "index"), max_dbs=8, subdir=True)
    with env.begin(write=True) as txn:  # size, last access, pins, synced as 0 or 1
        txn.put(old.raw, (30).to_bytes(8, "little") + (3).to_bytes(8, "little") + bytes(4) + b"\1")
    env.close()
    index = Index(tmp_path / "index")
    try:
        assert index.get(old) == BlobRecord(30, 3, 0, True, False)
    finally:
        index.close()
