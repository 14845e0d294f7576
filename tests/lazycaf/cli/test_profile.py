"""Traces, profiles and prefetch end to end: the real CLI, mounts, daemon and CAS."""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import py_compile
import re
import shutil
import subprocess
import time
from pathlib import Path

from lazycaf.core.digest import Digest
from tests.conftest import CasServer, Host, require, run_cli
from tests.helpers import make_tree, wait_for
from tests.slowproxy import slow_proxy

IMPORT_NUMPY = ["-c", "import numpy"]


def show(host: Host, name: str, cas: Path | str) -> list[str]:
    return (
        host.cli("profile", "show", name, "--cas", cas, "--top", "200").stdout.decode().splitlines()
    )


def served_from(lines: list[str]) -> dict[str, int]:
    (line,) = [x for x in lines if x.startswith("newest run, first reads served from:")]
    pairs = line.split(":", 1)[1].split(",")
    return {k: int(v) for k, v in (p.split() for p in pairs)}


def test_record_show_and_prefetch(host: Host, sample_tree: Path, tmp_path: Path) -> None:
    tree = tmp_path / "exe"
    shutil.copytree(sample_tree, tree, symlinks=True)
    site = tree / "lib/python3.11/site-packages"
    (site / "unusedpkg").mkdir()
    (site / "unusedpkg/__init__.py").write_text("raise SystemExit('never imported')\n")
    (site / "unusedpkg/_native.cpython-311-x86_64-linux-gnu.so").write_bytes(os.urandom(5000))
    cas = tmp_path / "cas"
    run_cli("pack", tree, "--cas", cas, "--tag", "trainer:v1")

    proc = host.cli(
        "profile",
        "record",
        "--name",
        "trainer",
        "trainer:v1",
        "--cas",
        cas,
        "--",
        "{mnt}/bin/python3",
        *IMPORT_NUMPY,
    )
    assert b"into profile 'trainer'" in proc.stderr
    lines = show(host, "trainer", cas)
    assert lines[0].startswith("profile 'trainer': 1 run(s)")
    assert "MB of" in lines[1] and "MB read" in lines[1]
    hot = [x.split()[-1] for x in lines if x.startswith("  ") and " s  " in x]
    # the files the run opened, in the order it opened them: the interpreter first
    assert hot[0] == "bin/python3.11" and hot[1] == "lib/libpython3.11.so.1.0"
    assert "lib/python3.11/site-packages/numpy/__init__.py" in hot or any(
        "numpy/__pycache__/__init__" in p for p in hot
    )
    assert hot.index("lib/libpython3.11.so.1.0") < min(i for i, p in enumerate(hot) if "numpy" in p)
    untouched = lines[lines.index(next(x for x in lines if x.startswith("packages no run"))) :]
    assert any(x.strip().endswith("site-packages/unusedpkg") for x in untouched)
    assert any("unusedpkg/_native" in x for x in lines if "MB" in x)
    first = served_from(lines)  # no profile yet: on demand, plus directory prefetch
    (bundle,) = [x for x in lines if x.startswith("hot-set bundle:")]
    words = bundle.split()  # the run saved its hot set as a bundle of a few parts
    bundled, parts = int(words[2]), int(words[7])
    assert bundled > 100 and parts > 1 and "planned on executable" in bundle, bundle
    assert first["fetch"] > 10 and first["cache"] + first["fetch"] + first["prefetch"] > 100

    # a cold host with the profile: the hot set arrives before the run asks for most of it
    host.cli("fetcher", "stop")
    shutil.rmtree(host.cache)
    mnt = host.mountpoint()
    host.cli("mount", "trainer:v1", mnt, "--cas", cas)

    def hot_set_under_way() -> bool:  # during the job's own start-up
        stats = host.stats()
        return stats["prefetched"] > 0 and stats["prefetch_queued"] == 0

    wait_for(hot_set_under_way, "prefetch to take up the profile's hot set", timeout=60)
    subprocess.run([mnt / "bin/python3", *IMPORT_NUMPY], check=True, timeout=120)
    stats = host.stats()
    assert stats["prefetched"] > 100
    # the hot set came in one request a part (a read may have taken a few blobs first)
    assert stats["bundle_parts_fetched"] >= parts - 1, stats
    assert stats["blobs_from_bundles"] > 0.9 * bundled, stats
    host.cli("umount", mnt)
    sources = served_from(show(host, "trainer", cas))
    assert sources["cache"] + sources["prefetch"] > 0.9 * sum(sources.values())

    # the next version (one changed package file) is prefetched by path from the v1 profile
    init = site / "numpy/__init__.py"
    init.write_text(init.read_text() + "\n# v2\n")
    py_compile.compile(str(init), cfile=str(site / "numpy/__pycache__/__init__.cpython-311.pyc"))
    run_cli("pack", tree, "--cas", cas, "--tag", "trainer:v2")
    before = host.stats()
    mnt2 = host.mountpoint("v2")
    host.cli("mount", "trainer:v2", mnt2, "--cas", cas)
    wait_for(
        lambda: host.stats()["prefetch_queued"] == 0, "the v2 prefetch queue to drain", timeout=30
    )
    subprocess.run([mnt2 / "bin/python3", *IMPORT_NUMPY], check=True, timeout=120)
    after = host.stats()
    assert after["prefetched"] - before["prefetched"] >= 1  # the changed file's new blob
    assert after["misses"] - before["misses"] <= 3  # everything else was already cached
    host.cli("umount", mnt2)
    assert show(host, "trainer", cas)[0].startswith("profile 'trainer': 3 run(s)")


def test_demand_reads_jump_the_prefetch_queue(
    host: Host, tmp_path: Path, cas_server: CasServer
) -> None:
    tree = tmp_path / "tree"
    (tree / "hot").mkdir(parents=True)
    for i in range(400):
        (tree / "hot" / f"f{i:03d}").write_bytes(os.urandom(32 << 10))
    (tree / "cold-file").write_bytes(b"needed now\n" * 1000)
    env = {"LAZYCAF_CAS_TOKEN": cas_server.token}
    host.env.update(env)  # the daemon writes the profile to the CAS
    run_cli("pack", tree, "--cas", cas_server.url, "--tag", "big:v1", env=env)
    # a profile whose hot set is every file under hot/
    mnt = host.mountpoint()
    host.cli("mount", "big:v1", mnt, "--cas", cas_server.url, "--eager-share", "0")
    for i in range(400):
        (mnt / "hot" / f"f{i:03d}").read_bytes()
    host.cli("umount", mnt)
    host.cli("fetcher", "stop")
    shutil.rmtree(host.cache)

    with slow_proxy(cas_server.url, delay=0.1) as proxy:
        host.cli("mount", "big:v1", mnt, "--cas", proxy.url, "--eager-share", "0")
        wait_for(lambda: host.stats()["prefetched"] > 0, "the first prefetched blob")
        assert (mnt / "cold-file").read_bytes() == b"needed now\n" * 1000
        stats = host.stats()
        # the read was served while most of the hot set was still on its way (through the
        # profile's bundle), and the bundle went on to its end
        assert stats["prefetched"] < 300, stats

        def arrived() -> int:
            stats = host.stats()
            return int(stats["blobs_from_bundles"] + stats["misses"])

        wait_for(lambda: arrived() >= 400, "the bundle's end", timeout=60)
        stats = host.stats()
        assert stats["bundle_parts_fetched"] > 1, stats
        assert stats["fetch_failures"] == 0  # misses: manifest, profile, cold-file
        assert stats["blobs_from_bundles"] + stats["misses"] >= 400, stats
        host.cli("umount", mnt)


def test_eager_mode_fetches_the_rest(host: Host, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    for i in range(20):
        (tree / f"f{i:02d}").write_bytes(os.urandom(100 << 10))
    cas = tmp_path / "cas"
    digest = run_cli("pack", tree, "--cas", cas).stdout.decode().strip()
    mnt = host.mountpoint()
    host.cli("mount", digest, mnt, "--cas", cas, "--eager-share", "0.3")
    for i in range(7):  # 35% of the tree
        (mnt / f"f{i:02d}").read_bytes()
    wait_for(lambda: host.stats()["blobs_cached"] >= 21, "the eager fetch of the rest")
    stats = host.stats()
    assert stats["blobs_cached"] == 21  # 20 files + the manifest
    assert stats["prefetched"] >= 13
    host.cli("umount", mnt)


def test_eager_mode_from_the_profile_waits_for_the_hot_set(
    host: Host, tmp_path: Path, cas_server: CasServer
) -> None:
    tree = tmp_path / "tree"
    for d in ("hot", "cold"):
        (tree / d).mkdir(parents=True)
    for i in range(10):
        (tree / "hot" / f"f{i}").write_bytes(os.urandom(100 << 10))
    for i in range(15):
        (tree / "cold" / f"f{i}").write_bytes(os.urandom(100 << 10))
    env = {"LAZYCAF_CAS_TOKEN": cas_server.token}
    host.env.update(env)  # the daemon writes the profile to the CAS
    run_cli("pack", tree, "--cas", cas_server.url, "--tag", "eg:v1", env=env)
    mnt = host.mountpoint()
    host.cli("mount", "eg:v1", mnt, "--cas", cas_server.url, "--eager-share", "0")
    for i in range(10):  # the profile: hot/ only, 40% of the tree
        (mnt / "hot" / f"f{i}").read_bytes()
    host.cli("umount", mnt)
    host.cli("fetcher", "stop")
    shutil.rmtree(host.cache)

    with slow_proxy(cas_server.url, delay=0.05) as proxy:
        host.cli("mount", "eg:v1", mnt, "--cas", proxy.url, "--eager-share", "0.3")
        hot = [host.cache / "blobs" / d[:2] / d for d in _digests(tree / "hot")]
        cold = [host.cache / "blobs" / d[:2] / d for d in _digests(tree / "cold")]

        def hot_set_in() -> bool:
            # observed first, then checked against the hot set: if it is still not all in
            # now, it was not when these were taken either
            stats = host.stats()
            cold_seen = any(p.exists() for p in cold)
            if all(p.exists() for p in hot):
                return True
            # the rest is queued only once the hot set is in
            assert stats["prefetch_queued"] + stats["prefetched"] <= 10, stats
            assert not cold_seen
            return False

        wait_for(hot_set_in, "the hot set", timeout=60)
        wait_for(lambda: all(p.exists() for p in cold), "the rest after it", timeout=60)
        host.cli("umount", mnt)


def _digests(directory: Path) -> list[str]:
    return [Digest.of(p.read_bytes()).hex for p in sorted(directory.iterdir())]


def test_profile_save_and_errors(host: Host, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "a").write_text("a")
    cas = tmp_path / "cas"
    run_cli("pack", tree, "--cas", cas, "--tag", "small:v1")
    mnt = host.mountpoint()
    host.cli("mount", "small:v1", mnt, "--cas", cas)
    assert (mnt / "a").read_text() == "a"
    host.cli("profile", "save", mnt)
    wait_for(
        lambda: run_cli("profile", "show", "small", "--cas", cas, check=False).returncode == 0,
        "the saved profile in the CAS",
    )
    assert show(host, "small", cas)[0].startswith("profile 'small': 1 run(s)")
    host.cli("umount", mnt)
    assert show(host, "small", cas)[0].startswith("profile 'small': 1 run(s)")  # saved once

    proc = host.cli("profile", "show", "nope", "--cas", cas, check=False)
    assert proc.returncode == 1 and b"no profile 'nope'" in proc.stderr
    proc = host.cli("profile", "save", tmp_path, check=False)
    assert proc.returncode == 2 and b"no lazycaf mount" in proc.stderr
    proc = host.cli("profile", "record", "--name", "x", "small:v1", "--cas", cas, check=False)
    assert proc.returncode == 2 and b"needs a command" in proc.stderr


def test_without_a_profile_a_miss_prefetches_its_directory(host: Host, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    for d in ("pkg", "other"):
        (tree / d).mkdir(parents=True)
        for i in range(10):
            (tree / d / f"m{i}.py").write_bytes(os.urandom(2000))
    (tree / "pkg" / "big.so").write_bytes(os.urandom(3000))  # another kind: not prefetched
    cas = tmp_path / "cas"
    digest = run_cli("pack", tree, "--cas", cas).stdout.decode().strip()
    mnt = host.mountpoint()
    host.cli("mount", digest, mnt, "--cas", cas, "--eager-share", "0")
    assert (mnt / "pkg/m0.py").read_bytes() == (tree / "pkg/m0.py").read_bytes()
    wait_for(lambda: host.stats()["prefetched"] >= 9, "the directory's prefetch")
    stats = host.stats()
    assert stats["prefetched"] == 9  # pkg's other .py files, not big.so, nothing of other/
    assert [(mnt / "pkg" / f"m{i}.py").read_bytes() for i in range(10)] == [
        (tree / "pkg" / f"m{i}.py").read_bytes() for i in range(10)
    ]
    assert host.stats()["misses"] == stats["misses"]  # all nine were already there
    host.cli("umount", mnt)


def test_without_a_profile_the_crowd_hot_set_is_prefetched(host: Host, tmp_path: Path) -> None:
    """A new executable (another manifest, no profile of its own) sharing files with one whose
    runs were recorded: the files those runs read are prefetched by digest, the rest not."""
    alpha = tmp_path / "alpha"
    for d in ("pkg", "cold"):
        (alpha / d).mkdir(parents=True)
        for i in range(20):
            (alpha / d / f"m{i}.py").write_bytes(os.urandom(2000))
    cas = tmp_path / "cas"
    run_cli("pack", alpha, "--cas", cas, "--tag", "alpha:v1")
    mnt = host.mountpoint()
    host.cli("mount", "alpha:v1", mnt, "--cas", cas, "--no-prefetch")
    hot = [f"pkg/m{i}.py" for i in range(0, 20, 2)]
    for rel in hot:
        assert (mnt / rel).read_bytes() == (alpha / rel).read_bytes()
    host.cli("umount", mnt)  # the run's trace becomes profile 'alpha'

    beta = tmp_path / "beta"
    shutil.copytree(alpha, beta)
    (beta / "pkg" / "new.py").write_bytes(os.urandom(2000))  # another executable
    digest = run_cli("pack", beta, "--cas", cas).stdout.decode().strip()
    for crowd in (False, True):
        host.cli("fetcher", "stop")
        shutil.rmtree(host.cache)  # a cold host
        mnt = host.mountpoint(f"beta-{crowd}")
        extra = [] if crowd else ["--no-crowd"]
        host.cli("mount", digest, mnt, "--cas", cas, "--eager-share", "0", *extra)
        if crowd:
            wait_for(lambda: host.stats()["prefetched"] >= len(hot), "the crowd prefetch")
            time.sleep(0.5)  # nothing more arrives
            before = host.stats()
            assert before["prefetched"] == len(hot)  # the hot files, nothing cold
            for rel in hot:
                assert (mnt / rel).read_bytes() == (alpha / rel).read_bytes()
            assert host.stats()["misses"] == before["misses"]  # all there already
        else:
            time.sleep(1.0)
            assert host.stats()["prefetched"] == 0
        host.cli("umount", mnt)


def _resident_pages(path: Path) -> tuple[int, int]:
    """(pages of ``path`` in the page cache, pages in all), by mincore(2)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int]
    libc.mmap.argtypes += [ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    with open(path, "rb") as f:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, f.fileno(), 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        try:
            vec = ctypes.create_string_buffer(pages)
            assert libc.mincore(addr, size, vec) == 0, os.strerror(ctypes.get_errno())
            return sum(b & 1 for b in vec.raw), pages
        finally:
            libc.munmap(addr, size)


def test_a_cached_hot_set_is_read_into_the_page_cache(host: Host, tmp_path: Path) -> None:
    require(os.geteuid() == 0, "dropping the page cache needs root")
    tree = tmp_path / "tree"
    (tree / "hot").mkdir(parents=True)
    for i in range(6):
        (tree / "hot" / f"f{i}").write_bytes(os.urandom(300 << 10))
    cas = tmp_path / "cas"
    run_cli("pack", tree, "--cas", cas, "--tag", "warm:v1")
    mnt = host.mountpoint()
    host.cli("mount", "warm:v1", mnt, "--cas", cas, "--eager-share", "0")
    for i in range(6):  # the profile: every file, all cached now
        (mnt / "hot" / f"f{i}").read_bytes()
    host.cli("umount", mnt)
    blobs = [host.cache / "blobs" / d[:2] / d for d in _digests(tree / "hot")]

    def dropped() -> bool:  # a blob the daemon still writes is dirty until it is done
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3")
        return sum(_resident_pages(b)[0] for b in blobs) < len(blobs)  # a stray page at most

    wait_for(dropped, "the cached blobs to leave the page cache", interval=0.5)
    host.cli("mount", "warm:v1", mnt, "--cas", cas, "--eager-share", "0")
    # nothing reads the mount: only the daemon's warming brings the blobs back
    wait_for(
        lambda: all(n == total for n, total in map(_resident_pages, blobs)),
        "the daemon to read the hot set into the page cache",
    )
    host.cli("umount", mnt)


def _fuse_requests(host: Host) -> list[dict[str, int]]:
    """The FUSE request counts each mount of ``host`` logged at its end, oldest first."""
    text = "".join(p.read_text() for p in sorted((host.cache / "logs").glob("mount*.log")))
    return [json.loads(m) for m in re.findall(r"FUSE requests by opcode: (\{.*\})", text)]


def test_the_hot_paths_are_looked_up_ahead_and_the_run_still_records_its_reads(
    host: Host, tmp_path: Path
) -> None:
    """A mount with a profile looks its hot paths up through the kernel as soon as it is
    up (the run then finds them in the dentry cache), and only looks them up: the run's
    reads still reach the mount and its trace, so the profile keeps learning."""
    tree = make_tree(tmp_path / "tree")
    cas = tmp_path / "cas"
    run_cli("pack", tree, "--cas", cas, "--tag", "warm:v1")
    hot = ["bin/tool", "lib/pkg/__init__.py", "lib/pkg/sub/data.bin", "lib/pkg/ünïcode.txt"]
    mnt = host.mountpoint()
    host.cli("mount", "warm:v1", mnt, "--cas", cas)
    for p in hot:
        assert (mnt / p).read_bytes() == (tree / p).read_bytes()
    host.cli("umount", mnt)  # the profile 'warm' now holds the four files

    host.cli("mount", "warm:v1", mnt, "--cas", cas, "--no-record")
    log = host.cache / "logs"
    wait_for(
        lambda: "looked up ahead of the run: 4" in "".join(p.read_text() for p in log.iterdir()),
        "the hot paths looked up",
    )
    host.cli("umount", mnt)  # nothing but the mount itself looked anything up
    assert _fuse_requests(host)[-1].get("lookup", 0) >= 6  # bin, tool, lib, pkg, sub, ...
    host.cli("mount", "warm:v1", mnt, "--cas", cas, "--no-record", "--no-prefetch")
    host.cli("umount", mnt)
    assert _fuse_requests(host)[-1].get("lookup", 0) == 0  # no profile asked: none ahead

    host.cli("mount", "warm:v1", mnt, "--cas", cas)  # records its run
    for p in hot:
        assert (mnt / p).read_bytes() == (tree / p).read_bytes()
    host.cli("umount", mnt)
    assert _fuse_requests(host)[-1]["read"] >= len(hot)  # the reads reached the mount
    lines = show(host, "warm", cas)
    assert lines[0].startswith("profile 'warm': 2 run(s)")
    assert sum(served_from(lines).values()) == len(hot)  # every read is in the trace
