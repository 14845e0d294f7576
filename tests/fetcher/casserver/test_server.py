"""The CAS HTTP API (v1) of ``fetcher/server.py``, spoken raw (httpx, plain sockets) to the real
``lazycaf cas serve`` process; plus the CLI's behaviour against an unreachable or guarded CAS.

Most tests share one server per module (a server start costs ~0.5 s); each test uses fresh
random content, so they do not see each other's blobs. Tests that stop the server get their own.
The group-commit tests run ``CasApp`` in process (hypercorn in the test's trio loop), where they
can hold a commit round open and watch PUTs gather behind it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import zstandard

from fetcher.casserver.app import MAX_MISSING, CasApp
from fetcher.casserver.groupcommit import GroupCommitter
from fetcher.casserver.served import ServedDir
from fetcher.web import asgi
from fetcher.web.asgi import bind_socket, serve_app
from lazycaf.cas import casdir
from lazycaf.cas.batch import unpack_batch
from lazycaf.cas.bundle import MAX_BUNDLE_BLOBS
from lazycaf.cas.bundlepart import unpack_part
from lazycaf.cas.casdir import CasDir, Staged
from lazycaf.cas.http import MISSING_BATCH
from lazycaf.core import framing
from lazycaf.core.digest import Digest
from lazycaf.core.errors import CasUnavailable
from tests.conftest import CasServer, run_cli, start_cas_server, stop
from tests.helpers import wait_for_async

MiB = 1 << 20


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CasServer]:
    base = tmp_path_factory.mktemp("server")
    srv = start_cas_server(base / "root", base)
    try:
        yield srv
    finally:
        stop(srv.proc)


@pytest.fixture
def client(server: CasServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=10) as c:
        yield c


def auth(server: CasServer) -> dict[str, str]:
    return {"authorization": f"Bearer {server.token}"}


def unique(label: str = "blob", repeat: int = 1) -> bytes:
    return f"{label}:{secrets.token_hex(16)}\n".encode() * repeat


def compressible(size: int = MiB) -> bytes:
    line = unique("line")
    return (line * (size // len(line) + 1))[:size]


def stored_files(root: Path) -> list[Path]:
    """Every file under blobs/ and tmp/: a refused write must leave no trace in either."""
    return sorted(p for sub in ("blobs", "tmp") for p in (root / sub).rglob("*") if p.is_file())


def blob_files(root: Path, digest: Digest) -> list[Path]:
    base = root / "blobs" / digest.hex[:2] / digest.hex
    return [p for p in (base, base.with_suffix(".zst")) if p.exists()]


def get_raw(client: httpx.Client, path: str, **headers: str) -> tuple[httpx.Response, bytes]:
    """GET without httpx's content decoding: the bytes exactly as the server sent them."""
    with client.stream("GET", path, headers=headers) as response:
        return response, b"".join(response.iter_raw())


def put(client: httpx.Client, server: CasServer, data: bytes) -> Digest:
    digest = Digest.of(data)
    r = client.put(f"/v1/blobs/{digest.hex}", content=data, headers=auth(server))
    assert r.status_code in (200, 201), r.text
    return digest


def split_frames(payload: bytes) -> list[bytes]:
    frames = []
    while payload:
        dobj = zstandard.ZstdDecompressor().decompressobj()
        dobj.decompress(payload)
        assert dobj.eof, "truncated zstd frame"
        rest = dobj.unused_data
        frames.append(payload[: len(payload) - len(rest)])
        payload = rest
    return frames


def zstd_one_frame(data: bytes, *, window_log: int, content_size: bool = True) -> bytes:
    params = zstandard.ZstdCompressionParameters.from_level(
        3, window_log=window_log, write_content_size=content_size
    )
    cctx = zstandard.ZstdCompressor(compression_params=params)
    if content_size:
        return cctx.compress(data)
    cobj = cctx.compressobj()  # streaming: no content size, the window descriptor rules
    return cobj.compress(data) + cobj.flush()


def raw_request(url: str, request: bytes) -> bytes:
    """Send bytes as they are (httpx would normalise ``..`` away) and read the whole answer."""
    host, _, port = url.removeprefix("http://").rpartition(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(request)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


# -- auth ----------------------------------------------------------------------------------
def test_put_without_token_is_401_and_stores_nothing(
    server: CasServer, client: httpx.Client
) -> None:
    data = unique("no-token")
    digest = Digest.of(data)
    before = stored_files(server.root)
    r = client.put(f"/v1/blobs/{digest.hex}", content=data)
    assert r.status_code == 401
    assert stored_files(server.root) == before
    assert client.head(f"/v1/blobs/{digest.hex}").status_code == 404
    r = client.put("/v1/refs/no-token", content=digest.hex.encode())
    assert r.status_code == 401


@pytest.mark.parametrize(
    "header",
    [
        "Bearer wrong",
        "Bearer",
        "bearer {token}x",
        "Bearer {token}x",
        "Bearer {short}",
        "Basic {token}",
        "{token}",
    ],
)
def test_put_with_wrong_token_is_401(server: CasServer, client: httpx.Client, header: str) -> None:
    data = unique("wrong-token")
    digest = Digest.of(data)
    value = header.format(token=server.token, short=server.token[:-1])
    before = stored_files(server.root)
    r = client.put(f"/v1/blobs/{digest.hex}", content=data, headers={"authorization": value})
    assert r.status_code == 401
    assert stored_files(server.root) == before


def test_reads_need_no_token_and_writes_with_token_work(
    server: CasServer, client: httpx.Client
) -> None:
    data = unique("open-read")
    digest = Digest.of(data)
    r = client.put(f"/v1/blobs/{digest.hex}", content=data, headers=auth(server))
    assert r.status_code == 201
    r = client.put(f"/v1/blobs/{digest.hex}", content=data, headers=auth(server))
    assert r.status_code == 200  # idempotent
    assert client.get(f"/v1/blobs/{digest.hex}").content == data
    name = f"open-read-{secrets.token_hex(4)}"
    assert client.put(
        f"/v1/refs/{name}", content=digest.hex.encode(), headers=auth(server)
    ).is_success
    r = client.get(f"/v1/refs/{name}")
    assert r.status_code == 200
    assert r.text.strip() == digest.hex


# -- writes that must not store --------------------------------------------------------------
@pytest.mark.parametrize("encoding", ["identity", "zstd"])
def test_put_wrong_digest_is_4xx_and_stores_nothing(
    server: CasServer, client: httpx.Client, encoding: str
) -> None:
    claimed = compressible(300_000)
    digest = Digest.of(claimed)
    sent = claimed[:-1] + b"X"
    body = sent if encoding == "identity" else framing.encode(sent)[1]
    headers = {**auth(server), "content-encoding": encoding}
    before = stored_files(server.root)
    r = client.put(f"/v1/blobs/{digest.hex}", content=body, headers=headers)
    assert 400 <= r.status_code < 500, r.text
    assert stored_files(server.root) == before
    assert blob_files(server.root, digest) == []
    assert client.head(f"/v1/blobs/{digest.hex}").status_code == 404


def test_put_ref_to_missing_blob_or_bad_digest_is_4xx(
    server: CasServer, client: httpx.Client
) -> None:
    name = f"dangling-{secrets.token_hex(4)}"
    missing = Digest.of(unique("missing"))
    r = client.put(f"/v1/refs/{name}", content=missing.hex.encode(), headers=auth(server))
    assert 400 <= r.status_code < 500
    for body in (b"zz", missing.hex.upper().encode(), b"", b"\xff" * 64):
        r = client.put(f"/v1/refs/{name}", content=body, headers=auth(server))
        assert 400 <= r.status_code < 500, body
    assert client.get(f"/v1/refs/{name}").status_code == 404
    assert not (server.root / "refs" / name).exists()


# -- paths that are not digests -----------------------------------------------------------------
@pytest.fixture(scope="module")
def secret_outside_root(server: CasServer) -> bytes:
    """A file next to the store: no request may ever serve its bytes."""
    secret = b"TOP-SECRET-" + secrets.token_hex(8).encode()
    (server.root.parent / "secret").write_bytes(secret)
    (server.root / "secret").write_bytes(secret)
    return secret


BAD_BLOB_PATHS = [
    "/v1/blobs/zz",
    "/v1/blobs/",
    "/v1/blobs/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/v1/blobs/%2e%2e%2fsecret",
    "/v1/blobs/..%2f..%2fsecret",
    "/v1/blobs/%2fetc%2fpasswd",
    "/v1/blobs/" + "A" * 64,
    "/v1/blobs/" + "0" * 63,
    "/v1/blobs/" + "0" * 65,
    "/v1/blobs/" + "0" * 64 + ".zst",
    "/v1/blobs/" + "0" * 64 + "/x",
    "/v1/refs/..%2f..%2fetc%2fpasswd",
    "/v1/refs/..%2fsecret",
    "/v1/refs/%2fetc%2fpasswd",
]


@pytest.mark.parametrize("path", BAD_BLOB_PATHS)
def test_get_path_not_a_digest_is_4xx(
    server: CasServer, client: httpx.Client, secret_outside_root: bytes, path: str
) -> None:
    for method in ("GET", "HEAD"):
        r = client.request(method, path)
        assert 400 <= r.status_code < 500, (method, path, r.status_code)
        assert secret_outside_root not in r.content
        assert b"root:" not in r.content


def test_uppercase_hex_of_a_stored_blob_is_not_served(
    server: CasServer, client: httpx.Client
) -> None:
    data = unique("upper")
    digest = put(client, server, data)
    r = client.get(f"/v1/blobs/{digest.hex.upper()}")
    assert r.status_code == 400
    assert data not in r.content


@pytest.mark.parametrize(
    "target",
    [
        b"/v1/blobs/../../etc/passwd",
        b"/v1/blobs/../secret",
        b"/v1/blobs/../../secret",
        b"/v1/refs/../../etc/passwd",
        b"/v1/refs/../secret",
        b"/v1/blobs/./../../secret",
    ],
)
def test_raw_dot_dot_paths_never_serve_files(
    server: CasServer, secret_outside_root: bytes, target: bytes
) -> None:
    answer = raw_request(
        server.url, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    status = int(answer.split(b" ", 2)[1])
    assert 400 <= status < 500, answer[:200]
    assert secret_outside_root not in answer
    assert b"root:" not in answer


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/"),
        ("GET", "/v1"),
        ("GET", "/v1/blobs"),
        ("GET", "/v1/nope"),
        ("GET", "/v2/blobs/" + "0" * 64),
        ("GET", "/v1/blobs:missing"),
        ("GET", "/v1/stats/x"),
        ("POST", "/v1/stats"),
    ],
)
def test_unknown_endpoint_is_404(client: httpx.Client, method: str, path: str) -> None:
    assert client.request(method, path).status_code == 404


# -- reads ---------------------------------------------------------------------------------
def test_head_present_missing_and_size(server: CasServer, client: httpx.Client) -> None:
    data = unique("head", repeat=50)
    digest = put(client, server, data)
    r = client.head(f"/v1/blobs/{digest.hex}")
    assert r.status_code == 200
    assert r.content == b""
    # the module docstring promises "200 with its size"
    assert r.headers.get("content-length") == str(len(data)), r.headers
    missing = Digest.of(unique("absent"))
    assert client.head(f"/v1/blobs/{missing.hex}").status_code == 404


@pytest.fixture(scope="module")
def ranged(server: CasServer) -> tuple[Digest, bytes]:
    """A 1000-byte incompressible blob (stored raw) for the Range tests."""
    data = os.urandom(1000)
    with httpx.Client(base_url=server.url) as c:
        return put(c, server, data), data


@pytest.mark.parametrize(
    ("header", "start", "end"),
    [
        ("bytes=0-9", 0, 10),
        ("bytes=10-", 10, 1000),
        ("bytes=-5", 995, 1000),
        ("bytes=0-0", 0, 1),
        ("bytes=999-", 999, 1000),
        ("bytes=990-5000", 990, 1000),
        ("bytes=-5000", 0, 1000),
        ("bytes=0-", 0, 1000),
    ],
)
def test_range_requests(
    client: httpx.Client, ranged: tuple[Digest, bytes], header: str, start: int, end: int
) -> None:
    digest, data = ranged
    r, body = get_raw(
        client, f"/v1/blobs/{digest.hex}", range=header, **{"accept-encoding": "identity"}
    )
    assert r.status_code == 206
    assert r.headers["content-range"] == f"bytes {start}-{end - 1}/{len(data)}"
    assert int(r.headers["content-length"]) == end - start
    assert "content-encoding" not in r.headers
    assert body == data[start:end]


@pytest.mark.parametrize("header", ["bytes=1000-", "bytes=5000-6000", "bytes=-0"])
def test_unsatisfiable_range_is_416(
    client: httpx.Client, ranged: tuple[Digest, bytes], header: str
) -> None:
    digest, data = ranged
    r = client.get(f"/v1/blobs/{digest.hex}", headers={"range": header})
    assert r.status_code == 416
    assert data not in r.content


def test_range_on_a_zstd_stored_blob_returns_plain_bytes(
    server: CasServer, client: httpx.Client
) -> None:
    data = compressible(3 * framing.FRAME_DATA + 123)
    digest = Digest.of(data)
    r = client.put(
        f"/v1/blobs/{digest.hex}",
        content=framing.encode(data)[1],
        headers={**auth(server), "content-encoding": "zstd"},
    )
    assert r.status_code == 201
    start, end = framing.FRAME_DATA - 7, 2 * framing.FRAME_DATA + 9  # spans frames
    r, body = get_raw(
        client,
        f"/v1/blobs/{digest.hex}",
        range=f"bytes={start}-{end - 1}",
        **{"accept-encoding": "zstd"},
    )
    assert r.status_code == 206
    assert r.headers.get("content-encoding", "identity") == "identity"
    assert r.headers["content-range"] == f"bytes {start}-{end - 1}/{len(data)}"
    assert body == data[start:end]


@pytest.mark.parametrize("upload", ["identity", "zstd"])
def test_get_zstd_frames_when_accepted(
    server: CasServer, client: httpx.Client, upload: str
) -> None:
    """The design: blobs are zstd frames on the wire and at rest (raw only when they do not
    compress), whatever encoding the uploader happened to use."""
    data = compressible(MiB + 5)
    digest = Digest.of(data)
    body = data if upload == "identity" else framing.encode(data)[1]
    r = client.put(
        f"/v1/blobs/{digest.hex}",
        content=body,
        headers={**auth(server), "content-encoding": upload},
    )
    assert r.status_code == 201
    r, payload = get_raw(client, f"/v1/blobs/{digest.hex}", **{"accept-encoding": "zstd"})
    assert r.status_code == 200
    assert r.headers.get("content-encoding") == "zstd", r.headers
    assert len(payload) < len(data) // 4
    assert framing.decode("zstd", payload) == data
    frames = split_frames(payload)
    assert len(frames) == -(-len(data) // framing.FRAME_DATA)
    for frame in frames:
        params = zstandard.get_frame_parameters(frame)
        assert params.content_size <= framing.FRAME_DATA
        assert params.window_size <= framing.FRAME_DATA
    for accept in ("identity", "gzip, deflate"):
        r, plain = get_raw(client, f"/v1/blobs/{digest.hex}", **{"accept-encoding": accept})
        assert r.status_code == 200
        assert "content-encoding" not in r.headers
        assert plain == data


def test_incompressible_blob_is_identity_even_when_zstd_accepted(
    server: CasServer, client: httpx.Client
) -> None:
    data = os.urandom(200_000)
    digest = put(client, server, data)
    r, payload = get_raw(client, f"/v1/blobs/{digest.hex}", **{"accept-encoding": "zstd"})
    assert r.headers.get("content-encoding", "identity") == "identity"
    assert payload == data


# -- encoded writes ------------------------------------------------------------------------------
def test_put_zstd_encoded_is_verified_and_stored(server: CasServer, client: httpx.Client) -> None:
    data = compressible(2 * MiB + 77)
    digest = Digest.of(data)
    encoding, payload = framing.encode(data)
    assert encoding == "zstd"
    r = client.put(
        f"/v1/blobs/{digest.hex}",
        content=payload,
        headers={**auth(server), "content-encoding": "zstd"},
    )
    assert r.status_code == 201, r.text
    assert [p.suffix for p in blob_files(server.root, digest)] == [".zst"]
    r, plain = get_raw(client, f"/v1/blobs/{digest.hex}", **{"accept-encoding": "identity"})
    assert plain == data


@pytest.mark.parametrize(
    "case", ["oversized-window", "oversized-window-no-size", "corrupt", "truncated", "unknown"]
)
def test_bad_encoded_put_is_rejected(server: CasServer, client: httpx.Client, case: str) -> None:
    data = bytes(8 * MiB)  # zeros: a few hundred bytes of zstd expand to 8 MiB
    data = data[:-16] + secrets.token_bytes(16)
    digest = Digest.of(data)
    encoding = "zstd"
    if case == "oversized-window":
        body = zstd_one_frame(data, window_log=23)
    elif case == "oversized-window-no-size":
        body = zstd_one_frame(data, window_log=27, content_size=False)
    elif case == "corrupt":
        good = framing.encode(data)[1]
        body = good[:40] + bytes(b ^ 0xFF for b in good[40:60]) + good[60:]
    elif case == "truncated":
        body = framing.encode(data)[1][:-10]
    else:
        body, encoding = data, "br"
    assert len(body) < MiB or case == "unknown"
    before = stored_files(server.root)
    r = client.put(
        f"/v1/blobs/{digest.hex}",
        content=body,
        headers={**auth(server), "content-encoding": encoding},
    )
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert stored_files(server.root) == before
    assert client.get("/v1/stats").status_code == 200  # still serving


def test_put_zstd_frame_holding_more_than_128k_is_not_stored_as_is(
    server: CasServer, client: httpx.Client
) -> None:
    """One frame with a 128 KiB window but 1 MiB of content passes the window check; a cache
    that writes frames as Btrfs extents (<= 128 KiB each) must never receive it."""
    data = compressible(MiB)
    digest = Digest.of(data)
    body = zstd_one_frame(data, window_log=17)
    r = client.put(
        f"/v1/blobs/{digest.hex}",
        content=body,
        headers={**auth(server), "content-encoding": "zstd"},
    )
    if 400 <= r.status_code < 500:
        return  # refusing it is fine
    assert r.status_code == 201
    r, payload = get_raw(client, f"/v1/blobs/{digest.hex}", **{"accept-encoding": "zstd"})
    if r.headers.get("content-encoding") == "zstd":
        for frame in split_frames(payload):
            assert zstandard.get_frame_parameters(frame).content_size <= framing.FRAME_DATA


# -- missing and stats -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"",
        b"\xff\xfe",
        b"[]",
        b"null",
        b"{}",
        b'{"nope": []}',
        b'{"digests": "abc"}',
        b'{"digests": [1, 2]}',
        b'{"digests": ["zz"]}',
        b'{"digests": null}',
        b'{"digests": ["' + b"A" * 64 + b'"]}',
    ],
)
def test_missing_with_bad_json_is_400(client: httpx.Client, body: bytes) -> None:
    r = client.post("/v1/blobs:missing", content=body)
    assert r.status_code == 400, (body, r.status_code, r.text)


def test_missing_answers_the_missing_ones(server: CasServer, client: httpx.Client) -> None:
    present = put(client, server, unique("present"))
    absent = [Digest.of(unique("absent")) for _ in range(3)]
    query = [absent[0], present, absent[1], absent[0], absent[2]]
    r = client.post("/v1/blobs:missing", json={"digests": [d.hex for d in query]})
    assert r.status_code == 200
    assert set(r.json()["missing"]) == {d.hex for d in absent}
    r = client.post("/v1/blobs:missing", json={"digests": []})
    assert r.json() == {"missing": []}


def test_bundles_are_built_here_need_the_write_token_and_bound_their_list(
    server: CasServer, client: httpx.Client
) -> None:
    data = [compressible(100_000), unique("raw")]
    blobs = [put(client, server, x) for x in data]
    absent = Digest.of(unique("absent"))
    body = {"digests": [d.hex for d in (blobs[1], absent, blobs[0])]}
    assert client.post("/v1/bundles", json=body).status_code == 401
    before = server.stats()
    r = client.post("/v1/bundles", json=body, headers=auth(server))
    assert r.status_code == 200, r.text
    answer = r.json()
    (part,) = answer["parts"]  # two small blobs: one part
    assert part["blobs"] == [blobs[1].hex, blobs[0].hex]  # the store lacks the other
    _, raw = get_raw(client, f"/v1/blobs/{part['digest']}", **{"accept-encoding": "identity"})
    assert len(raw) == part["bytes"] and Digest.of(raw).hex == part["digest"]
    records = unpack_part(raw)  # compressed together, each record its blob's own bytes
    assert [(d, enc) for d, enc, _ in records] == [(blobs[1], "identity"), (blobs[0], "identity")]
    assert records[0][2] == data[1] and records[1][2] == data[0]
    # the same list again: the bundle built lately, not a second build
    again = client.post("/v1/bundles", json=body, headers=auth(server))
    assert again.json() == answer
    assert server.stats()["blobs_stored"] - before["blobs_stored"] == 1
    many = {"digests": [Digest.of(str(i).encode()).hex for i in range(MAX_BUNDLE_BLOBS + 1)]}
    r = client.post("/v1/bundles", json=many, headers=auth(server))
    assert r.status_code == 413 and f"at most {MAX_BUNDLE_BLOBS}" in r.text


def test_stats_counters_move(server: CasServer, client: httpx.Client) -> None:
    before = server.stats()
    data = compressible(200_000)
    digest = put(client, server, data)
    put(client, server, data)  # already there: a put, nothing stored
    client.head(f"/v1/blobs/{digest.hex}")
    get_raw(client, f"/v1/blobs/{digest.hex}", **{"accept-encoding": "identity"})
    client.post("/v1/blobs:missing", json={"digests": [digest.hex]})
    after = server.stats()
    delta = {k: after[k] - before[k] for k in before}
    assert delta["blob_puts"] == 2
    assert delta["blobs_stored"] == 1
    assert delta["bytes_received"] == 2 * len(data)
    assert delta["blob_heads"] == 1
    assert delta["blob_gets"] == 1
    assert delta["bytes_sent"] == len(data)
    assert delta["missing_queries"] == 1
    assert json.loads(client.get("/v1/stats").content) == server.stats()


# -- process and CLI ------------------------------------------------------------------------------
def test_server_stops_cleanly_on_sigterm(cas_server: CasServer) -> None:
    assert httpx.get(f"{cas_server.url}/v1/stats", timeout=5).status_code == 200
    cas_server.proc.terminate()
    code = cas_server.proc.wait(timeout=10)
    assert cas_server.proc.stderr is not None
    err = cas_server.proc.stderr.read().decode(errors="replace")
    assert "Traceback" not in err, err
    assert code == 0, err


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# A refused connection is known at once: the CLI may retry briefly, but must give up well
# before the 5 s a connection attempt may take (and far before the subprocess's own timeout).
FAILS_FAST_S = 5.0


def test_cli_with_unreachable_cas_fails_fast_with_one_line() -> None:
    url = closed_port_url()
    started = time.monotonic()
    proc = run_cli("ls", "x", "--cas", url, check=False, timeout=60)
    elapsed = time.monotonic() - started
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode != 0
    assert elapsed < FAILS_FAST_S, f"the CLI took {elapsed:.1f} s to give up on {url}"
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert url in lines[0]


def make_tree(root: Path) -> Path:
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "small.txt").write_bytes(unique("small"))
    (root / "pkg" / "big.bin").write_bytes(compressible(MiB + 4096))
    return root


NO_TOKEN = {"LAZYCAF_CAS_TOKEN": "", "LAZYCAF_CAS_TOKEN_FILE": ""}


def test_pack_with_token_from_env(server: CasServer, tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    proc = run_cli(
        "pack", tree, "--cas", server.url, env={**NO_TOKEN, "LAZYCAF_CAS_TOKEN": server.token}
    )
    digest = Digest.parse(proc.stdout.decode().strip())
    assert blob_files(server.root, digest)
    listing = run_cli("ls", digest.hex, "pkg", "--cas", server.url, env=NO_TOKEN).stdout.decode()
    assert "small.txt" in listing
    assert "big.bin" in listing


@pytest.mark.parametrize("token", ["", "wrong-token"])
def test_pack_without_or_with_wrong_token_is_refused(
    server: CasServer, tmp_path: Path, token: str
) -> None:
    tree = make_tree(tmp_path / "tree")
    before = stored_files(server.root)
    proc = run_cli(
        "pack",
        tree,
        "--cas",
        server.url,
        "--tag",
        "refused:latest",
        check=False,
        env={**NO_TOKEN, "LAZYCAF_CAS_TOKEN": token},
    )
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode != 0
    assert proc.stdout == b""
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "refused" in lines[0]
    assert server.url in lines[0]
    assert stored_files(server.root) == before
    assert not (server.root / "refs" / "refused:latest").exists()


def test_server_refuses_to_start_on_a_busy_port(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        proc = run_cli(
            *("cas", "serve", "--root", tmp_path / "root", "--listen", f"127.0.0.1:{port}"),
            check=False,
            timeout=15,
        )
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 2, err
    assert "Traceback" not in err
    assert str(port) in err


# -- group commit (in process) -------------------------------------------------------------------
@contextlib.asynccontextmanager
async def inprocess(store: CasDir) -> AsyncIterator[tuple[CasApp, httpx.AsyncClient]]:
    sock = bind_socket("127.0.0.1:0")
    port = sock.getsockname()[1]
    app = CasApp(ServedDir(store))
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_app, app, sock)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=20) as client:
            yield app, client
        nursery.cancel_scope.cancel()
    with contextlib.suppress(OSError):  # hypercorn closed the fd it was handed
        sock.close()


def gate_publish(
    store: CasDir, monkeypatch: pytest.MonkeyPatch
) -> tuple[list[int], threading.Event]:
    """Record each round's size; hold the first round until the returned event is set."""
    rounds: list[int] = []
    gate = threading.Event()
    publish = store.publish

    def gated(staged: Sequence[Staged]) -> list[bool]:
        rounds.append(len(staged))
        if len(rounds) == 1:
            gate.wait(10)
        return publish(staged)

    monkeypatch.setattr(store, "publish", gated)
    return rounds, gate


async def test_concurrent_puts_share_one_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = CasDir(tmp_path / "root")
    rounds, gate = gate_publish(store, monkeypatch)
    blobs = [unique(f"group{i}", repeat=200) for i in range(7)]
    blobs.append(blobs[3])  # the same blob twice in one round: one 201, one 200
    statuses: dict[int, int] = {}
    async with inprocess(store) as (app, client):

        async def put_blob(i: int) -> None:
            r = await client.put(f"/v1/blobs/{Digest.of(blobs[i]).hex}", content=blobs[i])
            statuses[i] = r.status_code

        async with trio.open_nursery() as nursery:
            nursery.start_soon(put_blob, 0)
            await wait_for_async(lambda: rounds == [1], "the first PUT's round to run")
            for i in range(1, 8):
                nursery.start_soon(put_blob, i)
            await wait_for_async(
                lambda: app.store.committer.statistics().waiting == 7, "7 PUTs behind that round"
            )
            # Staged but not committed: not visible, and nobody has an answer yet.
            assert statuses == {}
            assert not any(store.has(Digest.of(b)) for b in blobs)
            gate.set()
        stats = (await client.get("/v1/stats")).json()
    assert rounds == [1, 7]
    assert sorted(statuses.values()) == [200] + [201] * 7
    assert stats["commit_rounds"] == 2
    assert stats["blobs_stored"] == 7
    for b in blobs:
        assert store.read(Digest.of(b)) == b
    assert stored_files(store.root) == sorted(
        p for b in set(blobs) for p in blob_files(store.root, Digest.of(b))
    )  # nothing left in tmp/


async def test_failed_commit_is_503_stores_nothing_and_the_server_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = CasDir(tmp_path / "root")
    failures = [OSError(errno.EIO, "Input/output error")]
    real_syncfs = casdir.syncfs

    def syncfs(path: Any) -> None:
        if failures:
            raise failures.pop()
        real_syncfs(path)

    monkeypatch.setattr(casdir, "syncfs", syncfs)
    data = compressible(300_000)
    digest = Digest.of(data)
    async with inprocess(store) as (_, client):
        r = await client.put(f"/v1/blobs/{digest.hex}", content=data)
        assert r.status_code == 503, r.text
        assert "Input/output error" in r.text
        assert stored_files(store.root) == []
        assert (await client.head(f"/v1/blobs/{digest.hex}")).status_code == 404
        r = await client.put(f"/v1/blobs/{digest.hex}", content=data)
        assert r.status_code == 201, r.text
    assert store.read(digest) == data


async def test_committer_cancelled_finishes_its_round_and_fails_the_queued(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = CasDir(tmp_path / "root")
    rounds, gate = gate_publish(store, monkeypatch)
    blobs = [unique(f"shutdown{i}", repeat=100) for i in range(3)]
    staged = [store.stage_encoded(Digest.of(b), framing.IDENTITY, b) for b in blobs]
    committer = GroupCommitter(store)
    results: dict[int, bool | Exception] = {}

    async def wait_commit(i: int) -> None:
        entry = staged[i]
        assert entry is not None
        try:
            results[i] = await committer.commit(entry)
        except CasUnavailable as exc:
            results[i] = exc

    async with trio.open_nursery() as waiters, trio.open_nursery() as service:
        await service.start(committer.run)
        waiters.start_soon(wait_commit, 0)
        await wait_for_async(lambda: rounds == [1], "the first round to run")
        waiters.start_soon(wait_commit, 1)
        waiters.start_soon(wait_commit, 2)
        await wait_for_async(
            lambda: committer.statistics().waiting == 2, "2 commits behind that round"
        )
        service.cancel_scope.cancel()
        gate.set()
    assert results[0] is True  # the round in flight completed and was reported
    for i in (1, 2):
        assert isinstance(results[i], CasUnavailable), results[i]
    assert rounds == [1]
    assert store.has(Digest.of(blobs[0]))
    assert not store.has(Digest.of(blobs[1])) and not store.has(Digest.of(blobs[2]))
    assert list((store.root / "tmp").iterdir()) == []  # the queued blobs' files are gone


async def test_app_without_lifespan_commits_each_put_alone(tmp_path: Path) -> None:
    store = CasDir(tmp_path / "root")
    app = CasApp(ServedDir(store))
    data = unique("solo", repeat=10)
    digest = Digest.of(data)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": data, "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "PUT", "path": f"/v1/blobs/{digest.hex}", "headers": []}
    await app(scope, receive, send)
    assert sent[0]["status"] == 201
    assert store.read(digest) == data
    assert app.store.committer.statistics().rounds == 1


# -- POST /v1/blobs:batch ------------------------------------------------------------------
def test_batch_upload_stores_all_and_is_idempotent(server: CasServer, client: httpx.Client) -> None:
    from lazycaf.cas.batch import pack_batch

    blobs = [unique(f"batch-{i}", repeat=200) for i in range(20)] + [os.urandom(3000)]
    records = []
    for data in blobs:
        encoding, payload = framing.encode(data)
        records.append((Digest.of(data), encoding, payload))
    body = pack_batch(records)
    r = client.post("/v1/blobs:batch", content=body, headers=auth(server))
    assert r.status_code == 200 and r.json() == {"received": 21, "stored": 21}
    for data in blobs:
        got = client.get(f"/v1/blobs/{Digest.of(data).hex}")
        assert got.status_code == 200 and got.content == data
    again = client.post("/v1/blobs:batch", content=body, headers=auth(server))
    assert again.json() == {"received": 21, "stored": 0}


def test_batch_with_one_bad_blob_stores_nothing(server: CasServer, client: httpx.Client) -> None:
    from lazycaf.cas.batch import pack_batch

    good = unique("batch-good", repeat=50)
    bad = unique("batch-bad", repeat=50)
    records = [
        (Digest.of(good), "identity", good),
        (Digest.of(b"something else"), "identity", bad),
    ]
    r = client.post("/v1/blobs:batch", content=pack_batch(records), headers=auth(server))
    assert r.status_code == 400 and Digest.of(b"something else").hex in r.text
    assert client.head(f"/v1/blobs/{Digest.of(good).hex}").status_code == 404
    assert not any((server.root / "tmp").iterdir())


def test_batch_needs_the_token_and_a_wellformed_body(
    server: CasServer, client: httpx.Client
) -> None:
    from lazycaf.cas.batch import pack_batch

    data = unique("batch-token")
    body = pack_batch([(Digest.of(data), "identity", data)])
    assert client.post("/v1/blobs:batch", content=body).status_code == 401
    assert client.head(f"/v1/blobs/{Digest.of(data).hex}").status_code == 404
    for broken in (body[:10], body[:-1], body[:32] + b"\x07" + body[33:]):
        r = client.post("/v1/blobs:batch", content=broken, headers=auth(server))
        assert r.status_code == 400, broken[:40]


def test_get_many_in_one_response(server: CasServer, client: httpx.Client) -> None:

    blobs = [unique(f"getmany-{i}", repeat=100) for i in range(4)]
    digests = [put(client, server, b) for b in blobs]
    absent = Digest.of(unique("getmany-absent"))
    r = client.post("/v1/blobs:get", json={"digests": [d.hex for d in [*digests, absent]]})
    assert r.status_code == 200
    records = unpack_batch(r.content)
    assert [d for d, _, _ in records] == digests
    for (_, encoding, payload), data in zip(records, blobs, strict=True):
        assert framing.decode(encoding, payload) == data
    assert client.post("/v1/blobs:get", json={"digests": ["nope"]}).status_code == 400
    too_many = {"digests": [absent.hex] * 1025}
    refused = client.post("/v1/blobs:get", json=too_many)
    assert refused.status_code == 413 and "at most 1024 digests" in refused.text


# -- hostile bodies: depth, count, size; parsed off the event loop ------------------------------
DEEP = b'{"digests": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"


@pytest.mark.parametrize("endpoint", ["/v1/blobs:missing", "/v1/blobs:get"])
@pytest.mark.parametrize(
    "body",
    [DEEP, b"[" * 100_000, b'{"digests": [' + b'{"a":' * 50_000 + b"1" + b"}" * 50_000 + b"]}"],
    ids=["digests", "unclosed", "objects"],
)
def test_deeply_nested_json_is_400_not_500(
    client: httpx.Client, endpoint: str, body: bytes
) -> None:
    r = client.post(endpoint, content=body)
    assert r.status_code == 400, (r.status_code, r.text[:200])
    assert "nested too deeply" in r.text
    assert client.get("/v1/stats").status_code == 200  # the server goes on


async def test_deeply_nested_json_logs_no_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with inprocess(CasDir(tmp_path / "root")) as (_, client):
        r = await client.post("/v1/blobs:missing", content=DEEP)
    assert r.status_code == 400
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR], caplog.text


def hexes(n: int, label: str) -> list[str]:
    return [Digest.of(f"{label} {i}".encode()).hex for i in range(n)]


def test_missing_caps_the_digest_count_and_the_body(client: httpx.Client) -> None:
    over = {"digests": ["0" * 64] * (MAX_MISSING + 1)}  # counted before anything is parsed
    r = client.post("/v1/blobs:missing", json=over, timeout=60)
    assert r.status_code == 413
    assert r.text.strip() == f"at most {MAX_MISSING} digests per request, got {MAX_MISSING + 1}"
    padded = b'{"digests": [' + b" " * (17 << 20) + b"]}"
    r = client.post("/v1/blobs:missing", content=padded, timeout=60)
    assert r.status_code == 413 and f"at most {MAX_MISSING} digests" in r.text, r.text
    assert MISSING_BATCH <= MAX_MISSING  # the client's queries stay under the cap


@pytest.mark.slow
def test_missing_answers_a_query_of_the_most_digests_allowed(
    server: CasServer, client: httpx.Client
) -> None:
    present = put(client, server, unique("cap-present"))
    query = [*hexes(MAX_MISSING - 1, "cap"), present.hex]
    r = client.post("/v1/blobs:missing", json={"digests": query}, timeout=120)
    assert r.status_code == 200
    missing = r.json()["missing"]
    assert len(missing) == MAX_MISSING - 1 and present.hex not in missing


async def test_a_large_body_is_parsed_while_other_requests_are_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A blobs:missing body above the inline limit is parsed in a worker thread: park that
    parse, and a request made meanwhile is answered (a parse on the event loop would block
    it until the parse gives up waiting)."""
    entered, released = threading.Event(), threading.Event()
    parked: list[bool] = []
    parse = asgi.parse_digests

    def parked_parse(body: bytes, max_digests: int) -> list[Digest]:
        if len(body) > asgi.PARSE_INLINE:
            entered.set()
            parked.append(released.wait(10))  # False: nobody released it (the loop was stuck)
        return parse(body, max_digests)

    monkeypatch.setattr(asgi, "parse_digests", parked_parse)
    query = hexes(5000, "parked")
    answers: dict[str, httpx.Response] = {}
    async with inprocess(CasDir(tmp_path / "root")) as (_, client):

        async def big() -> None:
            answers["big"] = await client.post("/v1/blobs:missing", json={"digests": query})

        async with trio.open_nursery() as nursery:
            nursery.start_soon(big)
            assert await trio.to_thread.run_sync(entered.wait, 10)
            answers["stats"] = await client.get("/v1/stats")
            answers["small"] = await client.post("/v1/blobs:missing", json={"digests": query[:3]})
            released.set()
    assert parked == [True]
    assert answers["stats"].status_code == 200
    assert answers["small"].json() == {"missing": query[:3]}
    assert answers["big"].json() == {"missing": query}


@pytest.mark.slow
def test_big_missing_queries_do_not_stall_other_requests(server: CasServer) -> None:
    """Concurrent queries of 100,000 digests (unauthenticated, ~6.8 MB each): a stats
    request and a blob read made meanwhile never wait long (generous: before, one query of
    950,000 digests stalled every request for up to 8.75 s)."""
    blob = unique("read during a flood")
    with httpx.Client(base_url=server.url, timeout=30) as c:
        digest = put(c, server, blob)
    bodies = [json.dumps({"digests": hexes(MAX_MISSING, f"flood{i}")}) for i in range(2)]
    statuses: list[int] = []

    def flood(body: str) -> None:
        with httpx.Client(base_url=server.url, timeout=120) as c:
            statuses.append(c.post("/v1/blobs:missing", content=body).status_code)

    threads = [threading.Thread(target=flood, args=(b,)) for b in bodies]
    for t in threads:
        t.start()
    waits: list[float] = []
    with httpx.Client(base_url=server.url, timeout=30) as c:
        while any(t.is_alive() for t in threads):
            start = time.monotonic()
            assert c.get("/v1/stats").status_code == 200
            assert c.get(f"/v1/blobs/{digest.hex}").content == blob
            waits.append(time.monotonic() - start)
            time.sleep(0.02)
    for t in threads:
        t.join()
    assert statuses == [200] * 2
    assert waits and max(waits) < 3.0, max(waits)


# -- token files ------------------------------------------------------------------------------
def token_file(tmp_path: Path, mode: int, token: str = "s3cret") -> Path:
    path = tmp_path / f"token-{mode:o}"
    path.write_text(token + "\n")
    path.chmod(mode)
    return path


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620])
def test_cas_serve_refuses_a_token_file_others_can_access(tmp_path: Path, mode: int) -> None:
    path = token_file(tmp_path, mode)
    proc = run_cli(
        *("cas", "serve", "--root", tmp_path / "root", "--listen", "127.0.0.1:0"),
        *("--token-file", path),
        check=False,
        timeout=30,
    )
    err = proc.stderr.decode(errors="replace").strip()
    assert proc.returncode == 2, err
    assert err.splitlines() == [
        f"lazycaf: error: --token-file {path} has mode {mode:04o}: a token file must not be "
        f"accessible by group or others (chmod 600 {path})"
    ]


def test_token_file_from_the_environment_is_checked_too(server: CasServer, tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    loose = token_file(tmp_path, 0o644, server.token)
    env = {**NO_TOKEN, "LAZYCAF_CAS_TOKEN_FILE": str(loose)}
    proc = run_cli("pack", tree, "--cas", server.url, check=False, env=env)
    err = proc.stderr.decode(errors="replace").strip()
    assert proc.returncode == 2, err
    assert "\n" not in err and f"LAZYCAF_CAS_TOKEN_FILE {loose} has mode 0644" in err, err
    loose.chmod(0o600)
    digest = run_cli("pack", tree, "--cas", server.url, env=env).stdout.decode().strip()
    assert blob_files(server.root, Digest.parse(digest))
