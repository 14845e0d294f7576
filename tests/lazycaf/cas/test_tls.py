"""TLS and read auth end to end: a CA and a server certificate for 127.0.0.1 made here with
``openssl``, a real ``lazycaf cas serve`` over https with a read token, the real CLI, and a
pair of daemons that serve each other over https."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import require, run_cli, stop
from tests.fetcher.peers.test_peer_cluster import _listens, free_port
from tests.helpers import make_tree, wait_for

pytestmark = pytest.mark.slow


@dataclass
class Pki:
    ca: Path
    cert: Path
    key: Path
    other_ca: Path  # a CA that signed nothing here


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


def _make_ca(d: Path, name: str) -> tuple[Path, Path]:
    key, cert = d / f"{name}.key", d / f"{name}.pem"
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", key, "-out", cert, "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    require(shutil.which("openssl") is not None, "openssl makes the test certificates")
    d = tmp_path_factory.mktemp("pki")
    ca, ca_key = _make_ca(d, "test-ca")
    other_ca, _ = _make_ca(d, "other-ca")
    key, csr, cert, ext = d / "server.key", d / "server.csr", d / "server.pem", d / "ext.cnf"
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1",
    )  # fmt: skip
    ext.write_text(
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
        "keyUsage=digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\n"
        "authorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n"
    )
    _openssl(
        "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
        "-out", cert, "-days", "2", "-extfile", ext,
    )  # fmt: skip
    return Pki(ca, cert, key, other_ca)


def _token_file(path: Path, token: str) -> Path:
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path


@dataclass
class TlsCas:
    url: str
    write_token: str
    read_token: str


def _env(**extra: str) -> dict[str, str]:
    """The environment without the variables that choose a CA or a token, plus ``extra``."""
    drop = {"SSL_CERT_FILE", "SSL_CERT_DIR", "LAZYCAF_CAS_TOKEN", "LAZYCAF_CAS_TOKEN_FILE"}
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **extra}


def _cli(*args: str | Path, env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "lazycaf", *map(str, args)],
        capture_output=True,
        env=env,
        timeout=120,
    )


@pytest.fixture
def tls_cas(pki: Pki, tmp_path: Path) -> Iterator[TlsCas]:
    write = _token_file(tmp_path / "write-token", "w-secret")
    read = _token_file(tmp_path / "read-token", "r-secret")
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "lazycaf", "cas", "serve", "--root", str(tmp_path / "cas"),
            "--listen", "127.0.0.1:0", "--token-file", str(write),
            "--read-token-file", str(read),
            "--tls-cert", str(pki.cert), "--tls-key", str(pki.key),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert "https://" in line, line + proc.communicate(timeout=10)[1].decode()
        yield TlsCas(line.split(" on ", 1)[1].strip(), "w-secret", "r-secret")
    finally:
        stop(proc)


def test_ls_over_https_verifies_with_ssl_cert_file_or_cacert(
    pki: Pki, tls_cas: TlsCas, tmp_path: Path
) -> None:
    tree = make_tree(tmp_path / "tree")
    writer = _env(SSL_CERT_FILE=str(pki.ca), LAZYCAF_CAS_TOKEN=tls_cas.write_token)
    packed = _cli("pack", tree, "--cas", tls_cas.url, "--tag", "t:1", env=writer)
    assert packed.returncode == 0, packed.stderr.decode()

    reader = _env(SSL_CERT_FILE=str(pki.ca), LAZYCAF_CAS_TOKEN=tls_cas.read_token)
    listed = _cli("ls", "t:1", "--cas", tls_cas.url, env=reader)
    assert listed.returncode == 0, listed.stderr.decode()
    assert "bin" in listed.stdout.decode()

    token_env = _env(LAZYCAF_CAS_TOKEN_FILE=str(tmp_path / "read-token"))
    with_cacert = _cli("ls", "t:1", "--cas", tls_cas.url, "--cacert", pki.ca, env=token_env)
    assert with_cacert.returncode == 0, with_cacert.stderr.decode()
    assert with_cacert.stdout == listed.stdout

    # the system's store does not hold the test CA; neither does another CA
    for env, extra in (
        (_env(LAZYCAF_CAS_TOKEN=tls_cas.read_token), []),
        (_env(LAZYCAF_CAS_TOKEN=tls_cas.read_token), ["--cacert", str(pki.other_ca)]),
        (_env(LAZYCAF_CAS_TOKEN=tls_cas.read_token, SSL_CERT_FILE=str(pki.other_ca)), []),
    ):
        refused = _cli("ls", "t:1", "--cas", tls_cas.url, *extra, env=env)
        err = refused.stderr.decode()
        assert refused.returncode == 3, err
        assert err.startswith(
            f"lazycaf: error: TLS: certificate verify failed for {tls_cas.url}: "
        ), err
        assert len(err.strip().splitlines()) == 1, err


def test_reads_need_the_read_token_or_the_write_token(
    pki: Pki, tls_cas: TlsCas, tmp_path: Path
) -> None:
    tree = make_tree(tmp_path / "tree")
    ca = {"SSL_CERT_FILE": str(pki.ca)}
    packed = _cli(
        "pack", tree, "--cas", tls_cas.url, "--tag", "t:1",
        env=_env(**ca, LAZYCAF_CAS_TOKEN=tls_cas.write_token),
    )  # fmt: skip
    assert packed.returncode == 0, packed.stderr.decode()
    for env in (_env(**ca), _env(**ca, LAZYCAF_CAS_TOKEN="wrong")):
        refused = _cli("ls", "t:1", "--cas", tls_cas.url, env=env)
        err = refused.stderr.decode()
        assert refused.returncode == 5, err
        assert "reads need a valid bearer token" in err and len(err.strip().splitlines()) == 1
    for token in (tls_cas.read_token, tls_cas.write_token):
        listed = _cli("ls", "t:1", "--cas", tls_cas.url, env=_env(**ca, LAZYCAF_CAS_TOKEN=token))
        assert listed.returncode == 0, listed.stderr.decode()
    # the read token does not write
    denied = _cli(
        "pack", tree, "--cas", tls_cas.url, "--tag", "t:2",
        env=_env(**ca, LAZYCAF_CAS_TOKEN=tls_cas.read_token),
    )  # fmt: skip
    assert denied.returncode == 5, denied.stderr.decode()


def test_a_read_token_file_others_can_read_is_refused(pki: Pki, tmp_path: Path) -> None:
    loose = _token_file(tmp_path / "read-token", "r")
    loose.chmod(0o644)
    proc = _cli("cas", "serve", "--root", tmp_path / "cas", "--read-token-file", loose, env=_env())
    assert proc.returncode == 2
    assert "--read-token-file" in proc.stderr.decode() and "chmod 600" in proc.stderr.decode()


def test_tls_files_that_do_not_load_are_one_line(pki: Pki, tmp_path: Path) -> None:
    proc = _cli(
        "cas", "serve", "--root", tmp_path / "cas", "--listen", "127.0.0.1:0",
        "--tls-cert", pki.cert, "--tls-key", pki.ca, env=_env(),
    )  # fmt: skip
    err = proc.stderr.decode()
    assert proc.returncode == 2 and len(err.strip().splitlines()) == 1, err
    assert "--tls-cert" in err


def test_a_daemon_pair_over_tls_serves_blobs_to_each_other(
    pki: Pki, tls_cas: TlsCas, tmp_path: Path
) -> None:
    tree = make_tree(tmp_path / "tree")
    ca = {"SSL_CERT_FILE": str(pki.ca)}
    packed = _cli(
        "pack", tree, "--cas", tls_cas.url, "--tag", "t:1",
        env=_env(**ca, LAZYCAF_CAS_TOKEN=tls_cas.write_token),
    )  # fmt: skip
    assert packed.returncode == 0, packed.stderr.decode()
    base = Path(f"/tmp/tls-{os.getpid()}")  # short: AF_UNIX paths
    base.mkdir()
    addresses = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    peers_file = tmp_path / "peers"
    peers_file.write_text("".join(f"https://{a}\n" for a in addresses))
    procs: list[subprocess.Popen[bytes]] = []
    env = _env(LAZYCAF_CAS_TOKEN=tls_cas.read_token)  # the CA only through --cacert
    try:
        for name, address in zip("ab", addresses, strict=True):
            cache = base / name
            run_cli("cache", "init", cache)
            cmd = [
                sys.executable, "-m", "lazycaf", "fetcher", "serve",
                "--cache", str(cache), "--cas", tls_cas.url, "--cacert", str(pki.ca),
                "--peer-listen", address, "--peers", str(peers_file), "--peer-tls",
                "--tls-cert", str(pki.cert), "--tls-key", str(pki.key),
            ]  # fmt: skip
            with open(base / f"{name}.log", "wb") as log:
                procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env))
            wait_for(lambda a=address: _listens(a), f"daemon {name} to listen", timeout=30)
        pinned = _cli("cache", "pin", "t:1", "--cache", base / "a", "--cas", tls_cas.url, env=env)
        assert pinned.returncode == 0, pinned.stderr.decode()
        stats = json.loads(
            _cli("stats", "--cache", base / "b", "--json", env=env).stdout.decode() or "{}"
        )
        log_a = (base / "a.log").read_text()
        assert stats.get("blobs_to_peers", 0) > 0, (stats, log_a)
        assert "certificate verify failed" not in log_a
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(base, ignore_errors=True)
