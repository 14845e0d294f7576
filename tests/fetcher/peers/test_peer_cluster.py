"""Several real fetcher daemons on loopback, each with its own cache on Btrfs and its own peer
port, all mounting one executable from one HTTP CAS: through the CLI, the mounts and the peer
HTTP API, as an operator would run them."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from fetcher.peers.peerset import rendezvous_order
from lazycaf.core.digest import Digest
from lazycaf.host.client import socket_answers
from tests.badpeer import MODES, serve_bad_peer
from tests.conftest import CasServer, _fuse_available, _is_mountpoint, require, run_cli
from tests.helpers import wait_for

REF = "trainer:1"


# -- the executable ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 small files in three packages and three files of several 1 MiB chunks; pandas
    and one native library compress (the CAS stores them as zstd frames), the rest not."""
    root = tmp_path_factory.mktemp("peer-tree") / "exe"
    rng = random.Random(5)
    for pkg in ("numpy", "pandas", "scipy"):
        (root / "lib" / pkg).mkdir(parents=True)
        for i in range(20):
            size = 2000 + 97 * i
            data = (f"def f{i}(x):\n    return x\n" * size)[:size].encode()
            head = rng.randbytes(32)  # every file distinct
            body = data if pkg == "pandas" else rng.randbytes(size)
            (root / "lib" / pkg / f"mod{i}.py").write_bytes(head + body)
    for i in range(3):
        size = (2 << 20) + 4096 * i + 1
        units = (b"\x90" * 4000 + rng.randbytes(96) for _ in range(size // 4096 + 1))
        data = b"".join(units)[:size] if i == 0 else rng.randbytes(size)
        (root / "lib" / f"native{i}.so").write_bytes(data)
    return root


def file_hashes(root: Path, paths: list[str]) -> dict[str, str]:
    return {p: hashlib.sha256((root / p).read_bytes()).hexdigest() for p in paths}


def all_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def pack(tree: Path, cas: CasServer) -> None:
    run_cli("pack", tree, "--cas", cas.url, "--tag", REF, env={"LAZYCAF_CAS_TOKEN": cas.token})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# -- the cluster -------------------------------------------------------------------------------
@dataclass
class Daemon:
    name: str
    cache: Path
    address: str
    proc: subprocess.Popen[bytes]
    log: Path
    mounts: list[Path] = field(default_factory=list)

    def get(self, path: str) -> Any:
        return httpx.get(f"http://{self.address}{path}", timeout=10).json()

    def stats(self) -> dict[str, int]:
        result: dict[str, int] = self.get("/v1/stats")
        return result

    def cached(self) -> set[Digest]:
        return {Digest.parse(p.name) for p in (self.cache / "blobs").glob("*/*")}


class Cluster:
    def __init__(self, base: Path, cas: CasServer, peers_file: Path) -> None:
        self.base = base
        self.cas = cas
        self.peers_file = peers_file
        self.daemons: list[Daemon] = []

    def start(
        self,
        name: str,
        *,
        timeout: float = 5.0,
        port: int | None = None,
        token_file: Path | None = None,
    ) -> Daemon:
        cache = self.base / f"cache-{name}"
        run_cli("cache", "init", cache)
        address = f"127.0.0.1:{port or free_port()}"
        log = self.base / f"daemon-{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "lazycaf",
                    "fetcher",
                    "serve",
                    "--cache",
                    str(cache),
                    "--cas",
                    self.cas.url,
                    "--peer-listen",
                    address,
                    "--peers",
                    str(self.peers_file),
                    "--peer-timeout",
                    str(timeout),
                    *(["--peer-token-file", str(token_file)] if token_file else []),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "LAZYCAF_CAS_TOKEN": self.cas.token},  # profiles are saved
            )
        daemon = Daemon(name, cache, address, proc, log)
        self.daemons.append(daemon)

        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"daemon {name} exited:\n{log.read_text()}")
            return socket_answers(cache / "fetcher.sock") and _listens(address)

        wait_for(up, f"daemon {name} to start", timeout=30)
        return daemon

    def write_peers(self, addresses: list[str]) -> None:
        tmp = self.peers_file.with_suffix(".tmp")
        tmp.write_text("# test cluster\n" + "".join(a + "\n" for a in addresses))
        os.replace(tmp, self.peers_file)  # atomic, as an operator's tooling should

    def mount(self, daemon: Daemon, *extra: str) -> Path:
        mnt = self.base / f"mnt-{daemon.name}-{len(daemon.mounts)}"
        mnt.mkdir()
        daemon.mounts.append(mnt)
        run_cli("mount", REF, mnt, "--cache", daemon.cache, "--cas", self.cas.url, *extra)
        return mnt

    def close(self) -> None:
        for daemon in self.daemons:
            for mnt in daemon.mounts:
                if _is_mountpoint(mnt):
                    subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
        for daemon in self.daemons:
            if daemon.proc.poll() is None:
                daemon.proc.send_signal(signal.SIGTERM)
        for daemon in self.daemons:
            try:
                daemon.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                daemon.proc.kill()
                daemon.proc.wait()
            shutil.rmtree(daemon.cache, ignore_errors=True)


def _listens(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture
def cluster(btrfs_dir: Path, cas_server: CasServer, tmp_path: Path) -> Iterator[Cluster]:
    require(_fuse_available(), "/dev/fuse, fusermount3 and pyfuse3 are needed for mounts")
    base = btrfs_dir / f"cl-{secrets.token_hex(3)}"  # short: the daemons' sockets live here
    base.mkdir()
    peers_file = tmp_path / "peers"
    peers_file.write_text("")
    c = Cluster(base, cas_server, peers_file)
    try:
        yield c
    finally:
        c.close()
        shutil.rmtree(base, ignore_errors=True)


def read_everything(mnt: Path, paths: list[str]) -> dict[str, str]:
    return file_hashes(mnt, paths)


# -- the CAS sends each blob once ------------------------------------------------------------
def test_daemons_mounting_at_once_fetch_each_blob_from_the_cas_once(
    cluster: Cluster, tree: Path
) -> None:
    pack(tree, cluster.cas)
    ports = [free_port() for _ in range(4)]
    cluster.write_peers([f"127.0.0.1:{p}" for p in ports])
    daemons = [cluster.start(f"h{i}", port=p) for i, p in enumerate(ports)]
    before = cluster.cas.stats()
    paths = all_files(tree)
    want = file_hashes(tree, paths)
    with ThreadPoolExecutor(len(daemons)) as pool:  # every host mounts and reads at once
        mounts = list(pool.map(cluster.mount, daemons))
        got = list(pool.map(lambda m: read_everything(m, paths), mounts))
    assert all(g == want for g in got)

    blobs = len(_blob_digests(tree)) + 1  # and the manifest
    cas_gets = cluster.cas.stats()["blob_gets"] - before["blob_gets"]
    assert blobs <= cas_gets <= blobs * 1.1 + 1, (cas_gets, blobs)
    stats = [d.stats() for d in daemons]
    assert sum(s["blobs_from_cas"] for s in stats) == cas_gets
    assert all(s["blobs_from_peers"] > 0 and s["blobs_to_peers"] > 0 for s in stats)
    assert all(s["fetch_failures"] == 0 for s in stats)
    # directory prefetch crossed the wire as prefetch, reads as demand
    assert sum(s["requests_prefetch"] for s in stats) > 0
    assert sum(s["requests_demand"] for s in stats) > 0

    # homes forward the CAS's zstd frames of compressible blobs instead of decoded bytes
    wire = sum(s["wire_bytes_to_peers"] for s in stats)
    assert 0 < wire < 0.9 * sum(s["bytes_to_peers"] for s in stats)

    out = run_cli("stats", "--cache", daemons[0].cache).stdout.decode()
    for key in ("bytes_from_cache", "bytes_from_peers", "bytes_from_cas", "bytes_to_peers"):
        assert key in out


def _blob_digests(tree: Path) -> set[Digest]:
    out: set[Digest] = set()
    for p in tree.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            if len(data) <= 1 << 20:
                out.add(Digest.of(data))
            else:
                out.update(Digest.of(data[i : i + (1 << 20)]) for i in range(0, len(data), 1 << 20))
    return out


def test_peers_with_a_token_refuse_requests_without_it(
    cluster: Cluster, tree: Path, tmp_path: Path
) -> None:
    pack(tree, cluster.cas)
    token = tmp_path / "peer-token"
    token.write_text("s3cret\n")
    token.chmod(0o600)
    ports = [free_port(), free_port()]
    cluster.write_peers([f"127.0.0.1:{p}" for p in ports])
    a, b = (cluster.start(n, port=p, token_file=token) for n, p in zip("ab", ports, strict=True))
    paths = all_files(tree)
    assert read_everything(cluster.mount(a, "--no-prefetch"), paths) == file_hashes(tree, paths)
    refused = httpx.get(f"http://{b.address}/v1/stats", timeout=10)
    assert refused.status_code == 401 and "bearer token" in refused.text
    wrong = httpx.get(
        f"http://{b.address}/v1/stats", headers={"authorization": "Bearer nope"}, timeout=10
    )
    assert wrong.status_code == 401
    ok = httpx.get(
        f"http://{b.address}/v1/stats", headers={"authorization": "Bearer s3cret"}, timeout=10
    )
    assert ok.status_code == 200 and ok.json()["blobs_to_peers"] > 0  # B served A


# -- bad peers ---------------------------------------------------------------------------------
@pytest.fixture
def bad_peers() -> Iterator[list[str]]:
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(serve_bad_peer(mode)) for mode in MODES]


@pytest.mark.parametrize("prefetch", [True, False], ids=["prefetch", "demand-only"])
def test_corrupt_hanging_and_dying_peers_never_cost_correct_bytes(
    cluster: Cluster, tree: Path, bad_peers: list[str], prefetch: bool
) -> None:
    pack(tree, cluster.cas)
    port = free_port()
    me = f"127.0.0.1:{port}"
    cluster.write_peers([me, *bad_peers])
    daemon = cluster.start("a", port=port, timeout=1.0)
    mnt = cluster.mount(daemon, *([] if prefetch else ["--no-prefetch"]))
    paths = all_files(tree)
    start = time.monotonic()
    assert read_everything(mnt, paths) == file_hashes(tree, paths)
    elapsed = time.monotonic() - start
    # Bounded: each bad peer costs at most a timeout before it is backed off, and its
    # back-off doubles on every further failure (a hang without bound would take minutes).
    assert elapsed < 60, elapsed
    stats = daemon.stats()
    assert stats["fetch_failures"] == 0
    assert stats["blobs_from_peers"] == 0  # nothing a bad peer sent was accepted
    status = {s["address"]: s for s in daemon.get("/v1/peers")}
    for address in bad_peers:
        assert status[address]["failures"] >= 1, status[address]
    errors = " ".join(status[a]["last_error"] for a in bad_peers)
    assert "does not verify" in errors, errors
    assert "within 1 s" in errors  # the hanging one


# -- membership changes ----------------------------------------------------------------------
def test_adding_and_removing_peers_moves_only_the_blobs_whose_home_changed(
    cluster: Cluster, tree: Path
) -> None:
    pack(tree, cluster.cas)
    ports = {n: free_port() for n in ("a", "b", "c")}
    addr = {n: f"127.0.0.1:{p}" for n, p in ports.items()}
    cluster.write_peers([addr["a"], addr["b"]])
    a, b = cluster.start("a", port=ports["a"]), cluster.start("b", port=ports["b"])
    mnt = cluster.mount(a, "--no-prefetch")
    paths = all_files(tree)
    want = file_hashes(tree, paths)
    thirds = [paths[0::3], paths[1::3], paths[2::3]]

    def phase(files: list[str], members: list[str]) -> dict[str, int]:
        """Read files on A; return, per member, how many of A's new blobs it served."""
        served = {n: d.stats()["blobs_to_peers"] for n, d in live.items()}
        cached = a.cached()
        assert file_hashes(mnt, files) == {p: want[p] for p in files}
        new = a.cached() - cached
        homes = [rendezvous_order(members, d)[0] for d in new]
        for n, d in live.items():
            if n != "a":
                assert d.stats()["blobs_to_peers"] - served[n] == homes.count(addr[n]), n
        return {n: homes.count(addr[n]) for n in live}

    live = {"a": a, "b": b}
    first = phase(thirds[0], [addr["a"], addr["b"]])
    assert first["a"] > 0 and first["b"] > 0

    live["c"] = cluster.start("c", port=ports["c"])
    cluster.write_peers([addr["a"], addr["b"], addr["c"]])
    wait_for(lambda: addr["c"] in _members(a), "A to read the new peer list")
    second = phase(thirds[1], [addr["a"], addr["b"], addr["c"]])
    assert second["c"] > 0

    cluster.write_peers([addr["a"], addr["c"]])
    wait_for(lambda: addr["b"] not in _members(a), "A to drop B")
    third = phase(thirds[2], [addr["a"], addr["c"]])
    assert third["b"] == 0 and third["c"] > 0
    # B and C only served peers: their own mounts' counters stay at zero
    for daemon in (b, live["c"]):
        stats = daemon.stats()
        assert stats["blobs_to_peers"] > 0
        assert stats["hits"] == stats["misses"] == stats["bytes_from_cache"] == 0, stats


def _members(daemon: Daemon) -> set[str]:
    return {s["address"] for s in daemon.get("/v1/peers")}


def test_a_list_entry_that_is_this_daemon_is_recognised_and_dropped(
    cluster: Cluster, tree: Path
) -> None:
    pack(tree, cluster.cas)
    ports = [free_port(), free_port()]
    alias = f"localhost:{ports[0]}"  # A advertises itself as 127.0.0.1:<port>
    cluster.write_peers([alias, f"127.0.0.1:{ports[1]}"])
    a = cluster.start("a", port=ports[0])
    cluster.start("b", port=ports[1])
    assert alias in _members(a)
    paths = all_files(tree)
    assert read_everything(cluster.mount(a, "--no-prefetch"), paths) == file_hashes(tree, paths)
    assert _members(a) == {a.address, f"127.0.0.1:{ports[1]}"}  # A stopped asking itself
    assert a.stats()["fetch_failures"] == 0
    assert "is this daemon" in a.log.read_text()


# -- placement ---------------------------------------------------------------------------------
def test_affinity_ranks_hosts_by_the_hot_set_they_hold(cluster: Cluster, tree: Path) -> None:
    pack(tree, cluster.cas)
    ports = [free_port() for _ in range(2)]
    addresses = [f"127.0.0.1:{p}" for p in ports]
    cluster.write_peers(addresses[:1])  # separate caches: B learns nothing from A
    a = cluster.start("a", port=ports[0])
    b = cluster.start("b", port=ports[1])
    mnt = cluster.mount(a, "--no-prefetch")
    hot = [p for p in all_files(tree) if p.startswith("lib/numpy/")]
    file_hashes(mnt, hot)
    run_cli("profile", "save", mnt)
    unreachable = f"127.0.0.1:{free_port()}"
    peers_arg = ",".join([addresses[1], unreachable, addresses[0]])
    out = run_cli("affinity", REF, "--peers", peers_arg, "--cas", cluster.cas.url, "--json")
    result = json.loads(out.stdout)
    rows = result["peers"]
    assert [r["peer"] for r in rows] == [a.address, b.address, unreachable]
    assert result["profile"] == "trainer"
    warm, cold = rows[0], rows[1]
    assert warm["hot_bytes"] > 0 and warm["hot_held_bytes"] == warm["hot_bytes"]
    assert cold["hot_held_bytes"] == 0 and cold["held_bytes"] < warm["held_bytes"]
    assert warm["bytes"] == sum((tree / p).stat().st_size for p in all_files(tree))
    assert "error" in rows[2]

    text = run_cli("affinity", REF, "--peers", peers_arg, "--cas", cluster.cas.url)
    lines = text.stdout.decode().splitlines()
    assert lines[2].startswith(a.address) and "100.0%" in lines[2]
    assert "unreachable" in lines[-1]

    bad = run_cli("affinity", REF, "--peers", unreachable, "--cas", cluster.cas.url, check=False)
    assert bad.returncode == 3 and b"no peer answered" in bad.stderr
    bad = run_cli("affinity", REF, "--peers", "nonsense", "--cas", cluster.cas.url, check=False)
    assert bad.returncode == 2 and b"not a peer address" in bad.stderr
