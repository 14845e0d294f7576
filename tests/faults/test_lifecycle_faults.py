"""Faults in the life of a host: mounts and daemons that die or are unmounted mid-fetch, and a
host cache whose blobs rot. Driven through the CLI and the mount, as a user would.

Faults injected (issue 13, defects 9 and 11):

- ``lazycaf umount`` while a read waits on a CAS that trickles (its answers held at a proxy,
  the reader killed): umount returns within a bound, the mount process is gone, the run's
  trace is in its profile (one fault);
- kill -9 of the fetcher daemon at 3 points of a cold run, and of the mount at 3 points
  (fixed seed, 5 ms to 1 s after the run starts): every byte read before is right, a dead
  mount's mountpoint refuses a new mount with one line until ``lazycaf umount`` clears it, a
  new mount then reads every file right, and ``cache verify`` finds no blob that reads wrong
  (six faults);
- a durable blob file changed on disk, with the daemon running and without one:
  ``lazycaf cache verify`` reports and drops it (exit 4, one line), the next read through a
  mount fetches it again (two faults).

A full cache disk (reads fail with EIO, the mount stays alive and reads again once GC freed
space, nothing half-written stays) is injected by
``tests/fetcher/cache/test_gc.py::test_full_disk_fails_reads_cleanly_and_gc_recovers``.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lazycaf.core.digest import Digest
from tests.conftest import CasServer, Host, run_cli
from tests.helpers import pack, wait_for
from tests.slowproxy import slow_proxy

MiB = 1 << 20
BOUND = 30.0  # "no hang": generous, far above what each step takes


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (not gone, not a zombie waiting to be reaped)."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):  # gone, or reaped between open and read
        return False
    return stat_line.rpartition(")")[2].split()[0] not in ("Z", "X")


def _mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


def _daemon_pid(host: Host) -> int:
    return int((host.cache / "fetcher.lock").read_text())


def _mount_pid(mnt: Path) -> int:
    from lazycaf.mount.root import mount_pid

    pid = mount_pid(mnt)
    assert pid is not None, f"no mount process for {mnt}"
    return pid


def _one_line_error(proc: subprocess.CompletedProcess[bytes]) -> str:
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lazycaf: error: "), lines
    return lines[0]


@pytest.fixture
def gone_on_exit() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test started: killed and reaped however the test ends."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(10)
        for stream in (p.stdout, p.stderr):
            if stream is not None:
                stream.close()


# -- defect 9: umount while a read waits on a trickling CAS --------------------------------
def test_umount_is_bounded_while_a_read_waits_on_the_cas(
    host: Host, cas_server: CasServer, tmp_path: Path, gone_on_exit: list[subprocess.Popen[bytes]]
) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "small.txt").write_bytes(b"read before the fault\n")
    (tree / "big.bin").write_bytes(os.urandom(8 * MiB))  # one 8 MiB blob: >= 128 pieces
    host.env["LAZYCAF_CAS_TOKEN"] = cas_server.token  # the daemon saves the profile
    out = host.cli("pack", tree, "--cas", cas_server.url, "--chunk-size", str(8 * MiB))
    digest = out.stdout.decode().strip()
    mnt = host.mountpoint()
    # every piece of every answer waits 1 s: the big blob takes minutes, a profile save
    # (three small exchanges) a few seconds
    with slow_proxy(cas_server.url, delay=1.0) as proxy:
        opts = ["--cas", proxy.url, "--profile", "trickle", "--no-prefetch"]
        host.cli("mount", digest, mnt, *opts, "--eager-share", "0", "--fetch-timeout", "600")
        pid = _mount_pid(mnt)
        assert (mnt / "small.txt").read_bytes() == b"read before the fault\n"  # in the trace
        proxy.hold()
        reader = subprocess.Popen(["head", "-c", "4096", str(mnt / "big.bin")])
        gone_on_exit.append(reader)
        wait_for(proxy.held, "the big blob's answer, held at the proxy")
        assert reader.poll() is None, "the read did not wait for the CAS"
        # the reader gives up; its read's request stays in the mount, waiting on the fetch
        reader.kill()
        assert reader.wait(BOUND) == -signal.SIGKILL
        start = time.monotonic()
        umount = subprocess.Popen(
            [sys.executable, "-m", "lazycaf", "umount", str(mnt)],
            env={**os.environ, **host.env},
            stderr=subprocess.PIPE,
        )
        gone_on_exit.append(umount)
        wait_for(lambda: not _mounted(mnt), "the kernel to unmount", timeout=BOUND)
        proxy.release()  # the trickle goes on: the fetch in flight still needs minutes
        try:
            code = umount.wait(BOUND)
        except subprocess.TimeoutExpired:
            pytest.fail(f"lazycaf umount still waits after {BOUND:g} s")
        assert umount.stderr is not None
        assert code == 0 and umount.stderr.read() == b""
        assert time.monotonic() - start < BOUND
        assert not _running(pid), "the mount process outlived umount"
    show = host.cli("profile", "show", "trickle", "--cas", cas_server.url)
    assert show.stdout.decode().startswith("profile 'trickle': 1 run(s)")
    log = next((host.cache / "logs").iterdir()).read_text()
    assert "cancelling the requests in flight" in log


# -- kill -9 of the daemon or of the mount during a cold run --------------------------------
_READER = """
import json, sys
from pathlib import Path
mnt, src = Path(sys.argv[1]), Path(sys.argv[2])
out = {"ok": [], "wrong": [], "errors": {}}
for rel in json.loads(sys.argv[3]):
    try:
        data = (mnt / rel).read_bytes()
    except OSError as exc:
        out["errors"][rel] = exc.errno
        continue
    out["ok" if data == (src / rel).read_bytes() else "wrong"].append(rel)
print(json.dumps(out))
"""
_RNG = random.Random(13)
KILLS = [  # seconds after the run starts: one point in each span, a few ms to ~1 s
    (victim, round(_RNG.uniform(lo, hi), 3))
    for victim in ("daemon", "mount")
    for lo, hi in ((0.005, 0.05), (0.05, 0.3), (0.3, 1.0))
]


def _cold_tree(root: Path) -> list[str]:
    """A fixed tree: 150 small files in 10 directories and two files of three chunks."""
    rng = random.Random(7)
    files = []
    for i in range(150):
        rel = f"pkg{i % 10}/mod{i}.py"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(rng.randbytes(rng.randrange(1, 48 << 10)))
        files.append(rel)
    for i in range(2):
        (root / f"lib{i}.so").write_bytes(rng.randbytes(3 * MiB + 5))
        files.insert(40 + 50 * i, f"lib{i}.so")  # read between the small files
    return files


def _read_all(mnt: Path, src: Path, files: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", _READER, str(mnt), str(src), json.dumps(files)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _result(reader: subprocess.Popen[bytes]) -> dict[str, Any]:
    try:
        out, err = reader.communicate(timeout=BOUND * 4)
    except subprocess.TimeoutExpired:
        pytest.fail("the reader hangs")
    assert reader.returncode == 0, err.decode()
    result: dict[str, Any] = json.loads(out)
    return result


def _cache_verifies(host: Host) -> None:
    """``cache verify`` finds every cached blob right (exit 0), and says so."""
    proc = host.cli("cache", "verify", "--rate", "0", "--json", check=False)
    assert proc.returncode == 0, proc.stderr.decode()
    report = json.loads(proc.stdout)
    assert report["bad"] == 0 and report["checked"] > 0, report


@pytest.mark.parametrize(("victim", "after"), KILLS, ids=[f"{v}-{t}s" for v, t in KILLS])
def test_kill_9_during_a_cold_run(
    host: Host,
    cas_server: CasServer,
    tmp_path: Path,
    victim: str,
    after: float,
    gone_on_exit: list[subprocess.Popen[bytes]],
) -> None:
    tree = tmp_path / "tree"
    files = _cold_tree(tree)
    host.env["LAZYCAF_CAS_TOKEN"] = cas_server.token
    digest = host.cli("pack", tree, "--cas", cas_server.url).stdout.decode().strip()
    mnt = host.mountpoint()
    with slow_proxy(cas_server.url, delay=0.01) as proxy:  # a cold run of a few seconds
        opts = ["--cas", proxy.url, "--no-prefetch", "--eager-share", "0"]
        host.cli("mount", digest, mnt, *opts)
        pid = _mount_pid(mnt) if victim == "mount" else _daemon_pid(host)
        reader = _read_all(mnt, tree, files)
        gone_on_exit.append(reader)
        time.sleep(after)
        assert reader.poll() is None, "the run ended before the fault"
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not _running(pid), f"the {victim} (pid {pid}) to die")
        run = _result(reader)
        assert run["wrong"] == [], f"wrong bytes read: {run['wrong']}"
        if victim == "daemon":
            # the mount started a new daemon (which reconciled the cache) and went on
            assert set(run["errors"].values()) <= {errno.EIO}, run["errors"]
            assert _running(_daemon_pid(host)) and _mount_pid(mnt)
        else:
            assert _mounted(mnt)  # a dead mount: the kernel keeps it until unmounted
            again = host.cli("mount", digest, mnt, *opts, check=False)
            assert again.returncode == 2, again.stderr.decode()
            assert "process is gone (lazycaf umount it first)" in _one_line_error(again)
        host.cli("umount", mnt, timeout=BOUND)
        assert not _mounted(mnt)
        # a new mount of the same executable reads every file right
        host.cli("mount", digest, mnt, *opts)
        run = _result(_read_all(mnt, tree, files))
        assert run["wrong"] == [] and run["errors"] == {}, run
        assert sorted(run["ok"]) == sorted(files)
        host.cli("umount", mnt, timeout=BOUND)
    assert not any((host.cache / "tmp").iterdir())
    _cache_verifies(host)


# -- defect 11: bit rot in the host cache -----------------------------------------------------
def _rot(blob: Path) -> None:
    """Flip one byte of a cached blob file in place (size kept: only a rehash can tell)."""
    blob.chmod(0o644)
    with open(blob, "r+b") as f:
        f.seek(blob.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x40]))
    blob.chmod(0o444)


@pytest.mark.parametrize("daemon", [True, False], ids=["daemon-running", "no-daemon"])
def test_cache_verify_drops_a_rotten_blob_and_the_next_read_fetches_it_again(
    host: Host, tmp_path: Path, daemon: bool
) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    files = {f"f{i}.bin": os.urandom(100_000 + i) for i in range(8)}
    for name, data in files.items():
        (tree / name).write_bytes(data)
    cas = tmp_path / "cas"
    digest = pack(tree, cas)
    mnt = host.mountpoint()
    host.cli("mount", digest, mnt, "--cas", cas, "--no-prefetch")
    for name, data in files.items():
        assert (mnt / name).read_bytes() == data
    host.cli("umount", mnt)
    victim = Digest.of(files["f3.bin"])
    blob = host.cache / "blobs" / victim.hex[:2] / victim.hex
    wait_for(lambda: _synced(host, victim), "the blob to be durable")
    if not daemon:
        host.cli("fetcher", "stop")
    _rot(blob)
    assert Digest.of(blob.read_bytes()) != victim  # served as is before cache verify
    proc = host.cli("cache", "verify", "--json", check=False, timeout=BOUND)
    assert proc.returncode == 4, proc.stderr.decode()
    assert "1 of 9 cached blobs did not verify and were dropped" in _one_line_error(proc)
    report = json.loads(proc.stdout)
    assert report["corrupt"] == [victim.hex] and report["bad"] == 1, report
    assert report["checked"] == 9  # eight files and the manifest
    by = "the fetcher daemon" if daemon else "this process"
    assert report["by"] == by
    assert not blob.exists()
    # clean now: exit 0, and the text report says so
    proc = host.cli("cache", "verify", check=False, timeout=BOUND)
    assert proc.returncode == 0 and proc.stdout.decode().startswith("checked 8 blobs")
    assert "all verified" in proc.stdout.decode()
    # the next read through a mount fetches the blob again and returns the right bytes
    host.cli("mount", digest, mnt, "--cas", cas, "--no-prefetch")
    for name, data in files.items():
        assert (mnt / name).read_bytes() == data
    host.cli("umount", mnt)
    assert Digest.of(blob.read_bytes()) == victim


def _synced(host: Host, digest: Digest) -> bool:
    from lazycaf.host.index import Index

    index = Index(host.cache / "index.lmdb", readonly=True)
    try:
        rec = index.get(digest)
    finally:
        index.close()
    return rec is not None and rec.synced


def test_cache_verify_usage_errors(tmp_path: Path) -> None:
    proc = run_cli("cache", "verify", "--cache", tmp_path, check=False)
    assert proc.returncode == 2 and "no host cache" in _one_line_error(proc)
    proc = run_cli("cache", "verify", "--cache", tmp_path, "--rate", "fast", check=False)
    assert proc.returncode == 2 and "invalid size 'fast'" in _one_line_error(proc)
