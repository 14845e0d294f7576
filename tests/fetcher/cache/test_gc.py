"""GC of the host cache: the eviction policy (pure), and the real daemon, CLI and mounts
keeping a cache on Btrfs under its budget."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from fetcher.cache.policy import GcPolicy, plan_eviction
from lazycaf.core.digest import Digest
from lazycaf.core.errors import UsageError
from lazycaf.core.sizes import format_size, parse_size
from lazycaf.host.index import BlobRecord
from tests.conftest import Host, _fuse_available, require, run_cli
from tests.helpers import wait_for

MiB = 1 << 20


# -- the policy (pure) ---------------------------------------------------------------------
def d(i: int) -> Digest:
    return Digest.of(str(i).encode())


def recs(*spec: tuple[int, int, int]) -> list[tuple[Digest, BlobRecord]]:
    """(id, size, last access) -> index records."""
    return [(d(i), BlobRecord(size, access)) for i, size, access in spec]


def test_nothing_to_evict_at_or_below_the_low_watermark() -> None:
    records = recs((1, 40, 1), (2, 40, 2))
    assert plan_eviction(records, 100, 0.8, set(), set()) == []
    assert plan_eviction([], 100, 0.8, set(), set()) == []


def test_least_recently_used_go_first_down_to_the_low_watermark() -> None:
    records = recs((1, 30, 5), (2, 30, 1), (3, 30, 3), (4, 30, 4))  # 120 of 100
    assert plan_eviction(records, 100, 0.8, set(), set()) == [d(2), d(3)]  # 120 -> 60
    assert plan_eviction(records, 100, 0.9, set(), set()) == [d(2)]  # 120 -> 90


def test_hot_blobs_go_after_every_cold_one() -> None:
    records = recs((1, 30, 1), (2, 30, 2), (3, 30, 3), (4, 30, 4))
    hot = {d(1), d(2)}  # the oldest, but in a live profile's hot set
    assert plan_eviction(records, 100, 0.6, hot, set()) == [d(3), d(4)]
    assert plan_eviction(records, 100, 0.2, hot, set()) == [d(3), d(4), d(1), d(2)]


def test_pinned_blobs_are_never_evicted() -> None:
    records = recs((1, 50, 1), (2, 50, 2), (3, 50, 3))
    assert plan_eviction(records, 100, 0.8, set(), {d(1)}) == [d(2), d(3)]
    # pins alone above the budget: everything else goes, and that is all
    assert plan_eviction(records, 40, 0.8, set(), {d(1), d(2)}) == [d(3)]


def test_room_for_an_arriving_blob_is_made_too() -> None:
    records = recs((1, 40, 1), (2, 40, 2))  # 80 of 100: at the low watermark
    assert plan_eviction(records, 100, 0.8, set(), set()) == []
    assert plan_eviction(records, 100, 0.8, set(), set(), room=30) == [d(1)]


def test_ties_break_by_digest_so_plans_are_deterministic() -> None:
    records = recs((1, 10, 7), (2, 10, 7), (3, 10, 7))
    plan = plan_eviction(records, 10, 1.0, set(), set())
    assert plan == sorted(plan) and len(plan) == 2


def test_policy_watermarks() -> None:
    p = GcPolicy(1000)
    assert (p.high_bytes, p.low_bytes) == (900, 800)
    assert not p.needs_collection(900) and p.needs_collection(901)
    for bad in ((0, 0.9, 0.8), (100, 0.7, 0.8), (100, 1.1, 0.8), (100, 0.9, 0)):
        with pytest.raises(UsageError):
            GcPolicy(*bad)


def test_sizes() -> None:
    assert parse_size("2G") == 2 << 30
    assert parse_size("500M") == 500 * MiB
    assert parse_size("1.5k") == 1536
    assert parse_size("4096") == 4096
    assert parse_size("2GiB") == parse_size("2gb") == 2 << 30
    for bad in ("", "x", "-1M", "0", "2Q"):
        with pytest.raises(UsageError):
            parse_size(bad)
    assert format_size(512) == "512 B"
    assert format_size(3 * MiB // 2) == "1.5 MiB"


# -- the real thing ------------------------------------------------------------------------
def make_exe(root: Path, seed: int, files: int = 3, size: int = 4 * MiB) -> Path:
    """An executable of ``files`` files of ``size`` random (incompressible) bytes."""
    root.mkdir(parents=True)
    for i in range(files):
        (root / f"f{i}.bin").write_bytes(os.urandom(size))
    (root / "small.txt").write_text(f"executable {seed}\n")
    return root


def pack(tree: Path, cas: Path, tag: str) -> str:
    return run_cli("pack", tree, "--cas", cas, "--tag", tag).stdout.decode().strip()


def status(host: Host) -> dict[str, object]:
    result: dict[str, object] = json.loads(host.cli("cache", "status", "--json").stdout)
    return result


def blob_files(host: Host) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in (host.cache / "blobs").glob("*/*")}


def assert_within_budget(host: Host, budget: int) -> dict[str, object]:
    st = status(host)
    assert st["budget"] == budget
    usage = st["usage"]
    assert isinstance(usage, int)
    assert usage <= budget + MiB, st  # plus one in-flight blob at most
    assert sum(blob_files(host).values()) <= budget + MiB
    return st


def read_all(mnt: Path, tree: Path) -> None:
    for f in sorted(tree.iterdir()):
        assert (mnt / f.name).read_bytes() == f.read_bytes(), f.name


def test_budget_smaller_than_two_executables(host: Host, tmp_path: Path) -> None:
    cas = tmp_path / "cas"
    trees = [make_exe(tmp_path / f"exe{i}", i) for i in range(2)]  # 12 MiB each
    for i, tree in enumerate(trees):
        pack(tree, cas, f"exe{i}:v1")
    budget = 20 * MiB
    mnt = host.mountpoint()
    for step in range(4):  # A, B, A, B: each evicts the other
        i = step % 2
        out = host.cli("mount", f"exe{i}:v1", mnt, "--cas", cas, "--cache-size", "20M")
        assert b"ignored" not in out.stderr  # the running daemon has that budget already
        read_all(mnt, trees[i])
        assert_within_budget(host, budget)
        host.cli("umount", mnt)
        assert_within_budget(host, budget)
    stats = host.stats()
    assert stats["gc_evicted"] > 0 and stats["fetch_failures"] == 0
    out = host.cli("mount", "exe0:v1", mnt, "--cas", cas, "--cache-size", "30M")
    assert b"--cache-size ignored" in out.stderr and b"20.0 MiB" in out.stderr
    host.cli("umount", mnt)
    st = status(host)
    assert st["budget_source"] == "configured"
    assert st["executables"] >= 1
    # index and files agree after all that eviction, and after the daemon's last flush of
    # access times (which runs as it stops)
    host.cli("fetcher", "stop")
    assert blob_files(host).keys() == set(json.loads(_index_dump(host)))


def _index_dump(host: Host) -> str:
    code = (
        "import json, sys; from pathlib import Path; from lazycaf.host.index import Index; "
        "i = Index(Path(sys.argv[1]), readonly=True); "
        "print(json.dumps([d.hex for d, _ in i.items()]))"
    )
    return subprocess.run(
        [sys.executable, "-c", code, str(host.cache / "index.lmdb")],
        check=True,
        capture_output=True,
        text=True,
    ).stdout


def test_open_file_keeps_reading_after_its_blobs_are_evicted(host: Host, tmp_path: Path) -> None:
    cas = tmp_path / "cas"
    a = make_exe(tmp_path / "a", 1, files=1, size=12 * MiB)
    b = make_exe(tmp_path / "b", 2)
    pack(a, cas, "a:1")
    pack(b, cas, "b:1")
    mnt_a, mnt_b = host.mountpoint("mnt-a"), host.mountpoint("mnt-b")
    opts = ["--cas", cas, "--cache-size", "16M", "--no-prefetch", "--eager-share", "0"]
    host.cli("mount", "a:1", mnt_a, *opts)
    host.cli("mount", "b:1", mnt_b, *opts)
    expected = (a / "f0.bin").read_bytes()
    got = bytearray()
    errors: list[BaseException] = []
    half = threading.Event()
    resume = threading.Event()

    def long_reader() -> None:  # one open file, read slowly across the eviction
        try:
            with open(mnt_a / "f0.bin", "rb", buffering=0) as f:
                while chunk := f.read(256 << 10):
                    got.extend(chunk)
                    if len(got) == 6 * MiB:
                        half.set()
                        resume.wait(60)
        except BaseException as exc:
            errors.append(exc)
            half.set()

    thread = threading.Thread(target=long_reader)
    thread.start()
    assert half.wait(60)
    first_half = set(blob_files(host))
    read_all(mnt_b, b)  # 12 MiB more: most of a's chunks must go
    host.cli("cache", "gc")
    evicted = first_half - set(blob_files(host))
    assert evicted, "nothing of a was evicted"
    resume.set()
    thread.join(60)
    assert not errors and bytes(got) == expected
    assert_within_budget(host, 16 * MiB)
    # and a fresh read of the evicted file fetches it again, correctly
    assert (mnt_a / "f0.bin").read_bytes() == expected
    host.cli("umount", mnt_a)
    host.cli("umount", mnt_b)


def test_pin_keeps_blobs_through_gc(host: Host, tmp_path: Path) -> None:
    cas = tmp_path / "cas"
    a = make_exe(tmp_path / "a", 1)
    b = make_exe(tmp_path / "b", 2)
    digest_a = pack(a, cas, "a:1")
    pack(b, cas, "b:1")
    mnt = host.mountpoint()
    host.cli("mount", "b:1", mnt, "--cas", cas, "--cache-size", "20M")
    out = host.cli("cache", "pin", "a:1", "--cas", cas).stdout.decode()
    assert "pinned a:1" in out and "1 pin(s)" in out
    pinned = set(blob_files(host))
    st = status(host)
    assert [p["digest"] for p in st["pinned"]] == [digest_a]  # type: ignore[index]
    assert st["pinned"][0]["refs"] == ["a:1"]  # type: ignore[index]
    assert st["pinned"][0]["cached_bytes"] == 12 * MiB + len("executable 1\n")  # type: ignore[index]
    read_all(mnt, b)  # 12 + 12 > 20 MiB: b's own blobs make room
    host.cli("cache", "gc")
    a_digests = file_digests(a)
    assert a_digests <= pinned
    assert a_digests <= set(blob_files(host)), "a pinned blob was evicted"
    assert_within_budget(host, 20 * MiB)
    # text output lists it
    text = host.cli("cache", "status").stdout.decode()
    assert "pinned       1" in text and "a:1" in text
    # unpinned, a is fair game again: reading c evicts a (least recently used) first
    host.cli("cache", "pin", "a:1", "--unpin", "--cas", cas)
    assert status(host)["pinned"] == []
    c = make_exe(tmp_path / "c", 3, files=1)
    pack(c, cas, "c:1")
    host.cli("umount", mnt)
    host.cli("mount", "c:1", mnt, "--cas", cas)
    read_all(mnt, c)
    host.cli("cache", "gc")
    assert not a_digests <= set(blob_files(host))
    assert file_digests(c) <= set(blob_files(host))
    assert_within_budget(host, 20 * MiB)
    host.cli("umount", mnt)
    proc = host.cli("cache", "pin", "a:1", "--unpin", "--cas", cas, check=False)
    assert proc.returncode == 2 and b"not pinned" in proc.stderr
    host.cli("fetcher", "stop")
    # without a daemon, `cache gc` runs on the cache itself (holding the daemon's lock)
    out = host.cli("cache", "gc").stdout.decode()
    assert "by this process" in out
    assert_within_budget(host, 20 * MiB)


def file_digests(tree: Path) -> set[str]:
    """The blob digests of a tree's files: 1 MiB chunks above the chunk size."""
    out = set()
    for f in tree.iterdir():
        data = f.read_bytes()
        if len(data) <= MiB:
            out.add(Digest.of(data).hex)
        else:
            out.update(Digest.of(data[i : i + MiB]).hex for i in range(0, len(data), MiB))
    return out


# -- a full disk -----------------------------------------------------------------------------
def read_with_retries(path: Path, expected: bytes) -> None:
    """Read a file until it reads whole (GC frees space in the background meanwhile); every
    failure must be EIO (a failed fetch)."""

    def read() -> bool:
        try:
            data = path.read_bytes()
        except OSError as exc:
            assert exc.errno == errno.EIO, exc
            return False
        assert data == expected, f"{path.name} read wrong bytes"
        return True

    wait_for(read, f"{path.name} to read whole", timeout=30, interval=0.3)


@pytest.mark.btrfs
@pytest.mark.fuse
@pytest.mark.root
@pytest.mark.slow
def test_full_disk_fails_reads_cleanly_and_gc_recovers(small_btrfs: Path, tmp_path: Path) -> None:
    require(_fuse_available(), "/dev/fuse, fusermount3 and pyfuse3 are needed for mounts")
    cache = small_btrfs / "cache"
    run_cli("cache", "init", cache)
    host = Host(cache, tmp_path, {"LAZYCAF_CACHE": str(cache)}, [])
    cas = tmp_path / "cas"
    tree = make_exe(tmp_path / "big", 1, files=4, size=64 * MiB)  # 256 MiB onto 200 MB
    pack(tree, cas, "big:1")
    mnt = host.mountpoint()
    try:
        # a budget larger than the disk: only the full disk can make GC run
        opts = ["--cas", cas, "--cache-size", "10G", "--no-prefetch", "--eager-share", "0"]
        host.cli("mount", "big:1", mnt, *opts)
        for f in sorted(tree.iterdir()):
            read_with_retries(mnt / f.name, f.read_bytes())
        # the disk filled up: some fetches failed (a reader saw EIO, or the kernel's
        # readahead did and its retry found the space GC had freed meanwhile)
        stats = host.stats()
        assert stats["fetch_failures"] > 0 and stats["gc_runs"] > 0, stats
        assert "disk full" in (cache / "fetcher.log").read_text()
        assert not any((cache / "tmp").iterdir())  # no temp file left behind
        host.cli("umount", mnt)
        host.cli("fetcher", "stop")
        # nothing half-written under blobs/: every file verifies, and the index agrees
        files = blob_files(host)
        for blob in (cache / "blobs").glob("*/*"):
            assert Digest.of(blob.read_bytes()).hex == blob.name
        assert set(json.loads(_index_dump(host))) == set(files)
        # a new daemon reconciles and serves the last file from the cache as it is
        host.cli("mount", "big:1", mnt, *opts)
        last = sorted(tree.iterdir())[-1]
        assert (mnt / last.name).read_bytes() == last.read_bytes()
        assert status(host)["usage"] == sum(blob_files(host).values())
        host.cli("umount", mnt)
    finally:
        if str(mnt) in Path("/proc/self/mountinfo").read_text():
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
        run_cli("fetcher", "stop", env=host.env, check=False, timeout=30)
