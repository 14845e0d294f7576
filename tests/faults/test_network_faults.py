"""Network faults, through the doors a user uses (a real mount, `lazycaf cat`, the peer API).

Faults injected (each asserts the exit code or errno and the one-line message, that no byte
read differs from the source, a bound on time, and that the mount stays alive):

- the HTTP CAS killed in the middle of a run (SIGKILL), 200 reads against the dead CAS, then
  the CAS restarted on the same port (the circuit breaker fails fast and recovers);
- `lazycaf cat` against a dead CAS;
- a CAS behind a proxy that trickles every answer, and one that holds answers altogether
  (a hanging CAS) until released;
- a CAS that serves a corrupted blob (a byte flipped, or the stored file truncated), whole
  and as one chunk of a chunked file, through the mount and `lazycaf cat`;
- a lying peer (right length, wrong bytes), a hanging peer (never answers) and a truncating
  peer (closes halfway through the body): a small HTTP server on 127.0.0.1 that is the home
  of about half the blobs;
- hostile bodies to the peer API (JSON nested 100,000 deep, 1,025 digests), a peer request of
  1,024 blobs whose CAS is dead (one log line, not 1,024), and a peer listener on loopback
  without a token (a warning).
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from fetcher.peers.peerset import rendezvous_order
from lazycaf.core.digest import Digest
from tests.badpeer import serve_bad_peer
from tests.conftest import CasServer, Host, run_cli, stop
from tests.helpers import wait_for
from tests.slowproxy import slow_proxy

MiB = 1 << 20
REF = "faults:1"


# -- trees, packing, reading -------------------------------------------------------------------
def small_tree(root: Path, files: int, *, seed: int = 13) -> Path:
    """``files`` small files of distinct random bytes in a few directories, and one file of
    three 1 MiB chunks (``big.bin``)."""
    rng = random.Random(seed)
    for i in range(files):
        path = root / f"pkg{i % 4}" / f"mod{i}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(1000 + 37 * i))
    (root / "big.bin").write_bytes(rng.randbytes(2 * MiB + 12345))
    return root


def files_of(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def pack_http(tree: Path, cas: CasServer) -> str:
    out = run_cli("pack", tree, "--cas", cas.url, "--tag", REF, env=token_env(cas))
    digest = out.stdout.decode().strip()
    assert len(digest) == 64, digest
    return digest


def token_env(cas: CasServer) -> dict[str, str]:
    return {"LAZYCAF_CAS_TOKEN": cas.token}


def read_or_errno(path: Path) -> bytes | int:
    try:
        return path.read_bytes()
    except OSError as exc:
        return exc.errno or -1


def blobs_of(tree: Path, rel: str) -> list[Digest]:
    """The blobs a packed file is stored as: itself, or its 1 MiB chunks."""
    data = (tree / rel).read_bytes()
    if len(data) <= MiB:
        return [Digest.of(data)]
    return [Digest.of(data[i : i + MiB]) for i in range(0, len(data), MiB)]


def stored_blob(cas: CasServer, digest: Digest) -> Path:
    (path,) = (cas.root / "blobs" / digest.hex[:2]).glob(digest.hex + "*")
    return path


def log_lines(path: Path) -> list[str]:
    return path.read_text(errors="replace").splitlines() if path.exists() else []


def mount(host: Host, ref: str, url: str, *extra: str) -> Path:
    mnt = host.mountpoint(f"mnt-{secrets.token_hex(3)}")
    host.cli("mount", ref, mnt, "--cas", url, *extra)
    return mnt


def alive(mnt: Path, tree: Path) -> bool:
    """The mount answers metadata as the source has it (the FUSE process is alive)."""
    return sorted(os.listdir(mnt)) == sorted(os.listdir(tree))


def serve_cas_on(root: Path, token_file: Path, port: int) -> subprocess.Popen[bytes]:
    """`lazycaf cas serve` on a given port (a CAS that comes back where it was)."""
    args = ["cas", "serve", "--root", root, "--listen", f"127.0.0.1:{port}"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "lazycaf", *map(str, args), "--token-file", str(token_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    if "http://" not in line:
        stop(proc)
        raise AssertionError(f"CAS server did not come back on port {port}: {line!r}")
    return proc


# -- a CAS that dies --------------------------------------------------------------------------
def test_dead_cas_fails_reads_fast_logs_little_and_recovers(
    host: Host, cas_server: CasServer, tmp_path: Path
) -> None:
    """Defect 8: once the CAS died, 200 reads fail with EIO at once (a circuit breaker), the
    daemon's log grows by a handful of lines, and reads work again soon after the CAS is back."""
    tree = small_tree(tmp_path / "tree", 210)
    pack_http(tree, cas_server)
    paths = [p for p in files_of(tree) if p != "big.bin"]
    mnt = mount(host, REF, cas_server.url, "--no-prefetch", "--fetch-timeout", "20")
    warm = paths[:10]
    for rel in warm:
        assert (mnt / rel).read_bytes() == (tree / rel).read_bytes()

    daemon_log = host.cache / "fetcher.log"
    before = len(log_lines(daemon_log))
    cas_server.proc.send_signal(signal.SIGKILL)  # died mid-run
    cas_server.proc.wait(10)
    start = time.monotonic()
    results = {rel: read_or_errno(mnt / rel) for rel in paths[10:]}
    elapsed = time.monotonic() - start
    assert len(results) == 200
    assert set(results.values()) == {errno.EIO}, {r: v for r, v in results.items() if v != 5}
    # Without the breaker each read cost ~1 s (client retries, then the kernel's retry).
    assert elapsed < 60, f"200 reads against a dead CAS took {elapsed:.0f} s"
    assert alive(mnt, tree)
    for rel in warm:  # what the cache holds still reads right
        assert (mnt / rel).read_bytes() == (tree / rel).read_bytes()
    dead_phase = log_lines(daemon_log)[before:]
    assert len(dead_phase) <= 12, "\n".join(dead_phase[-20:])
    assert any("failing fetches at once" in line for line in dead_phase), dead_phase

    port = int(cas_server.url.rpartition(":")[2])
    back = serve_cas_on(cas_server.root, cas_server.token_file, port)
    try:
        first = paths[10]
        wait_for(
            lambda: read_or_errno(mnt / first) == (tree / first).read_bytes(),
            "a read to succeed once the CAS is back",
            timeout=30,
            interval=0.2,
        )
        for rel in paths[10:]:
            assert (mnt / rel).read_bytes() == (tree / rel).read_bytes(), rel
        assert any("answers again" in line for line in log_lines(daemon_log)[before:])
        host.cli("umount", mnt)
    finally:
        stop(back)


def test_cat_against_a_dead_cas_is_one_line_exit_3(cas_server: CasServer, tmp_path: Path) -> None:
    tree = small_tree(tmp_path / "tree", 3)
    pack_http(tree, cas_server)
    stop(cas_server.proc)
    start = time.monotonic()
    proc = run_cli("cat", REF, "pkg0/mod0.py", "--cas", cas_server.url, check=False, timeout=60)
    assert time.monotonic() - start < 30
    assert proc.returncode == 3, proc.stderr
    err = proc.stderr.decode().strip()
    assert err.startswith("lazycaf: error:") and "\n" not in err and "unavailable" in err, err
    assert proc.stdout == b""


# -- a CAS that trickles or hangs -------------------------------------------------------------
def test_trickling_cas_gives_right_bytes_and_a_hanging_one_eio_then_recovers(
    host: Host, cas_server: CasServer, tmp_path: Path
) -> None:
    tree = small_tree(tmp_path / "tree", 8)
    pack_http(tree, cas_server)
    with slow_proxy(cas_server.url, delay=0.02) as proxy:
        mnt = mount(host, REF, proxy.url, "--no-prefetch", "--fetch-timeout", "3")
        # trickling: every 64 KiB piece of every answer waits; the bytes still arrive whole
        start = time.monotonic()
        assert (mnt / "big.bin").read_bytes() == (tree / "big.bin").read_bytes()
        assert (mnt / "pkg0/mod0.py").read_bytes() == (tree / "pkg0/mod0.py").read_bytes()
        assert time.monotonic() - start < 60
        cat = run_cli("cat", REF, "pkg1/mod1.py", "--cas", proxy.url, timeout=60)
        assert cat.stdout == (tree / "pkg1/mod1.py").read_bytes()

        # hanging: the CAS answers nothing; the read fails after --fetch-timeout, not later
        proxy.hold()
        start = time.monotonic()
        assert read_or_errno(mnt / "pkg2/mod2.py") == errno.EIO
        assert time.monotonic() - start < 20
        assert alive(mnt, tree)
        proxy.release()
        got = wait_for(
            lambda: read_or_errno(mnt / "pkg2/mod2.py") == (tree / "pkg2/mod2.py").read_bytes(),
            "the read to succeed once the CAS answers again",
            timeout=30,
            interval=0.2,
        )
        assert got
        for rel in files_of(tree):
            assert (mnt / rel).read_bytes() == (tree / rel).read_bytes(), rel
        host.cli("umount", mnt)


# -- a CAS that serves a corrupted blob -------------------------------------------------------
def corrupt(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0x40
    else:
        del data[len(data) // 2 :]
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_corrupted_blob_from_the_cas_is_never_served(
    host: Host, cas_server: CasServer, tmp_path: Path, how: str
) -> None:
    tree = small_tree(tmp_path / "tree", 6)
    manifest = pack_http(tree, cas_server)
    bad = "pkg1/mod1.py"
    (bad_blob,) = blobs_of(tree, bad)
    corrupt(stored_blob(cas_server, bad_blob), how)
    second = blobs_of(tree, "big.bin")[1]  # the first chunk of big.bin stays readable
    corrupt(stored_blob(cas_server, second), how)

    cat = run_cli("cat", manifest, bad, "--cas", cas_server.url, check=False, timeout=60)
    assert cat.returncode == 4, cat.stderr
    err = cat.stderr.decode().strip()
    assert err.startswith("lazycaf: error:") and "\n" not in err, err
    assert cat.stdout == b""
    cat = run_cli("cat", manifest, "big.bin", "--cas", cas_server.url, check=False, timeout=60)
    assert cat.returncode == 4, cat.stderr
    source_big = (tree / "big.bin").read_bytes()
    assert source_big.startswith(cat.stdout) and len(cat.stdout) <= MiB  # no wrong byte

    mnt = mount(host, manifest, cas_server.url, "--no-prefetch", "--fetch-timeout", "10")
    for _ in range(2):  # asked twice: the CAS is not written off (it answered)
        assert read_or_errno(mnt / bad) == errno.EIO
    with open(mnt / "big.bin", "rb") as f:
        assert os.pread(f.fileno(), 4096, 1000) == source_big[1000:5096]
        with pytest.raises(OSError) as info:
            os.pread(f.fileno(), 4096, MiB + 1000)
        assert info.value.errno == errno.EIO
    for rel in files_of(tree):
        if rel not in (bad, "big.bin"):
            assert (mnt / rel).read_bytes() == (tree / rel).read_bytes(), rel
    assert alive(mnt, tree)
    for digest in (bad_blob, second):
        assert not (host.cache / "blobs" / digest.hex[:2] / digest.hex).exists()
    assert "failing fetches at once" not in (host.cache / "fetcher.log").read_text()
    host.cli("umount", mnt)


# -- lying, hanging and truncating peers ------------------------------------------------------
@dataclass
class PeerDaemon:
    proc: subprocess.Popen[bytes]
    address: str
    log: Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def fake_peer(request: pytest.FixtureRequest) -> Iterator[tuple[str, list[str]]]:
    """A peer that lies (``corrupt``), hangs or truncates (``die``): ``tests.badpeer``."""
    seen: list[str] = []
    with serve_bad_peer(request.param, requests=seen, hang_seconds=20) as address:
        yield address, seen


def start_peer_daemon(
    host: Host, cas_url: str, peers: list[str], address: str, *extra: str
) -> PeerDaemon:
    """`lazycaf fetcher serve` with a peer listener for ``host``'s cache (mounts use it)."""
    peers_file = host.base / "peers"
    peers_file.write_text("".join(p + "\n" for p in peers))
    log = host.base / f"daemon-{secrets.token_hex(3)}.log"
    with open(log, "wb") as out:
        args = ["fetcher", "serve", "--cache", host.cache, "--cas", cas_url]
        args += ["--peer-listen", address, "--peers", peers_file, "--peer-timeout", "1", *extra]
        proc = subprocess.Popen(
            [sys.executable, "-m", "lazycaf", *map(str, args)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **host.env},
        )
    daemon = PeerDaemon(proc, address, log)

    def listening() -> bool:
        assert proc.poll() is None, log.read_text()
        try:
            return httpx.get(f"http://{address}/v1/stats", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(listening, f"the daemon to serve peers on {address}", timeout=30)
    return daemon


@pytest.mark.parametrize("fake_peer", ["corrupt", "hang", "die"], indirect=True)
def test_bad_peer_never_costs_a_right_byte_nor_the_mount(
    host: Host, cas_server: CasServer, tmp_path: Path, fake_peer: tuple[str, list[str]]
) -> None:
    tree = small_tree(tmp_path / "tree", 40)
    pack_http(tree, cas_server)
    peer, seen = fake_peer
    me = f"127.0.0.1:{free_port()}"
    members = [me, peer]
    daemon = start_peer_daemon(host, cas_server.url, members, me)
    try:
        mnt = mount(host, REF, cas_server.url, "--fetch-timeout", "20")
        paths = files_of(tree)
        blobs = [d for p in paths for d in blobs_of(tree, p)]
        homed = [d for d in blobs if rendezvous_order(members, d)[0] == peer]
        assert homed, "the bad peer is the home of no blob: the test would prove nothing"
        start = time.monotonic()
        for rel in paths:
            got = hashlib.sha256((mnt / rel).read_bytes()).digest()
            assert got == hashlib.sha256((tree / rel).read_bytes()).digest(), rel
        # bounded: the bad peer costs at most --peer-timeout per request before its back-off
        assert time.monotonic() - start < 60
        assert seen, "the bad peer was never asked"
        assert alive(mnt, tree)
        stats = httpx.get(f"http://{me}/v1/stats", timeout=10).json()
        assert stats["blobs_from_peers"] == 0 and stats["fetch_failures"] == 0, stats
        status = {s["address"]: s for s in httpx.get(f"http://{me}/v1/peers", timeout=10).json()}
        assert status[peer]["failures"] >= 1, status[peer]
        host.cli("umount", mnt)
    finally:
        stop(daemon.proc)


# -- hostile requests to the peer API ---------------------------------------------------------
def closed_port_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


def test_peer_api_refuses_hostile_bodies_and_logs_a_dead_cas_once(host: Host) -> None:
    """Defects 7, 8 and 10 at the peer API: 400 for JSON nested 100,000 deep, 413 beyond
    1,024 digests, one log line for a request of 1,024 blobs the dead CAS cannot give, and a
    warning for a loopback listener without a token."""
    me = f"127.0.0.1:{free_port()}"
    daemon = start_peer_daemon(host, closed_port_url(), [me], me)
    try:
        url = f"http://{me}/v1/blobs:get"
        deep = b'{"digests": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        r = httpx.post(url, content=deep, timeout=30)
        assert r.status_code == 400 and "nested too deeply" in r.text, (r.status_code, r.text)
        many = {"digests": [Digest.of(b"%d" % i).hex for i in range(1025)]}
        r = httpx.post(url, json=many, timeout=30)
        assert r.status_code == 413 and "at most 1024 digests" in r.text, (r.status_code, r.text)

        before = len(log_lines(daemon.log))
        absent = {"digests": [Digest.of(b"absent %d" % i).hex for i in range(1024)]}
        r = httpx.post(url, json=absent, timeout=60)
        assert r.status_code == 200 and r.content == b""  # nothing could be fetched
        assert httpx.get(f"http://{me}/v1/stats", timeout=10).status_code == 200  # still serving
        lines = log_lines(daemon.log)
        assert len(lines[before:]) <= 3, "\n".join(lines[before:][:10])
        text = "\n".join(lines)
        assert "Traceback" not in text, text[-3000:]
        assert "without --peer-token-file: every local user" in text, text[-3000:]
    finally:
        stop(daemon.proc)


def test_peer_token_file_others_can_read_is_refused(host: Host, tmp_path: Path) -> None:
    token = tmp_path / "peer-token"
    token.write_text("s3cret\n")
    token.chmod(0o644)
    me = f"127.0.0.1:{free_port()}"
    peers = tmp_path / "peers"
    peers.write_text(me + "\n")
    args = ["fetcher", "serve", "--cache", host.cache, "--cas", closed_port_url()]
    args += ["--peer-listen", me, "--peers", peers, "--peer-token-file", token]
    proc = subprocess.Popen(
        [sys.executable, "-m", "lazycaf", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **host.env},
    )
    try:
        _, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:  # it started serving: the check is gone
        stop(proc)
        pytest.fail("the daemon started with a token file others can read")
    assert proc.returncode == 2, stderr
    err = stderr.decode().strip()
    assert err == (
        f"lazycaf: error: --peer-token-file {token} has mode 0644: a token file must not be "
        f"accessible by group or others (chmod 600 {token})"
    ), err
