"""``lazycaf cas serve --store s3://``: frontends on one bucket of a real S3 server.

Two frontend processes share a prefix of the session's SeaweedFS bucket: a tree packed
through one mounts and reads correctly through the other, ref updates sent concurrently
through both are compare-and-swaps (none is lost), and zstd frames are stored as they were
sent. The contract suite runs the whole CAS API against one such frontend (``http-s3`` in
``tests/lazycaf/cas/test_cas_contract.py``).
"""

from __future__ import annotations

import filecmp
import secrets
from collections.abc import Iterator
from pathlib import Path

import httpx
import obstore
import pytest
import trio
from obstore.store import S3Store

from lazycaf.core import framing
from lazycaf.core.digest import Digest
from tests.conftest import CasServer, Host, run_cli, start_cas_server, stop
from tests.helpers import make_tree, walk
from tests.s3server import S3Server


@pytest.fixture
def frontends(s3_server: S3Server, tmp_path: Path) -> Iterator[tuple[str, list[CasServer]]]:
    """Two ``cas serve --store`` processes on one fresh prefix: the first reads the AWS_*
    environment, the second has only the keys there and the endpoint and region from its
    config file's ``[cas-serve]`` table."""
    url = f"s3://{s3_server.bucket}/frontends-{secrets.token_hex(4)}"
    env = s3_server.env()
    config = tmp_path / "config.toml"
    config.write_text(
        f'[cas-serve]\ns3-endpoint = "{s3_server.endpoint}"\ns3-region = "us-east-1"\n'
    )
    keys_only = {k: v for k, v in env.items() if k.endswith("_KEY") or k.endswith("_KEY_ID")}
    keys_only |= {"AWS_ENDPOINT_URL": "", "AWS_REGION": "", "LAZYCAF_CONFIG": str(config)}
    servers = [start_cas_server(tmp_path / "unused", tmp_path, store=url, env=env)]
    try:
        servers.append(start_cas_server(tmp_path / "unused", tmp_path, store=url, env=keys_only))
        yield url, servers
    finally:
        for server in servers:
            stop(server.proc)


def test_a_tree_packed_through_one_frontend_mounts_through_the_other(
    host: Host, tmp_path: Path, frontends: tuple[str, list[CasServer]]
) -> None:
    _, (one, two) = frontends
    tree = make_tree(tmp_path / "tree")
    env = {"LAZYCAF_CAS_TOKEN": one.token}
    out = run_cli("pack", tree, "--cas", one.url, "--tag", "app/v1", env=env).stdout
    digest = out.decode().split()[0]
    assert run_cli("ls", "app/v1", "--cas", two.url).returncode == 0
    mnt = host.mountpoint()
    host.cli("mount", "app/v1", mnt, "--cas", two.url)
    try:
        assert walk(mnt).keys() == walk(tree).keys()
        for rel, st in walk(tree).items():
            if (tree / rel).is_file() and not (tree / rel).is_symlink():
                assert filecmp.cmp(tree / rel, mnt / rel, shallow=False), rel
                assert (mnt / rel).stat().st_size == st.st_size
    finally:
        host.cli("umount", mnt)
    assert two.stats()["blob_gets"] > 0  # the bytes came through the second frontend
    with httpx.Client(base_url=two.url) as client:
        assert client.get("/v1/refs/app/v1").text.strip() == digest


async def test_concurrent_ref_updates_through_two_frontends_lose_none(
    frontends: tuple[str, list[CasServer]],
) -> None:
    """Writers advance a counter held by one ref, each step a blob of its own, through both
    frontends at once: read the ref, store the next value, ``If-Match`` the value read. With
    last-writer-wins two writers reading the same value would both succeed and one step
    would vanish; with a compare-and-swap the successes add up to the final count."""
    _, servers = frontends
    name = "counter"
    first = b"0:start"
    won = 0
    refused = 0

    async def writer(w: int) -> None:
        nonlocal won, refused
        server = servers[w % 2]
        auth = {"authorization": f"Bearer {server.token}"}
        async with httpx.AsyncClient(base_url=server.url, headers=auth, timeout=30) as client:
            for step in range(12):
                current = Digest.parse((await client.get(f"/v1/refs/{name}")).text.strip())
                value = int((await client.get(f"/v1/blobs/{current.hex}")).content.split(b":")[0])
                nxt = f"{value + 1}:{w}:{step}".encode()
                digest = Digest.of(nxt)
                assert (await client.put(f"/v1/blobs/{digest.hex}", content=nxt)).is_success
                r = await client.put(
                    f"/v1/refs/{name}",
                    content=digest.hex,
                    headers={"if-match": f'"{current.hex}"'},
                )
                if r.status_code == 412:
                    refused += 1
                    assert r.headers["etag"].strip('"') != current.hex  # it moved
                else:
                    assert r.status_code == 200, r.text
                    won += 1

    one = servers[0]
    auth = {"authorization": f"Bearer {one.token}"}
    async with httpx.AsyncClient(base_url=one.url, headers=auth, timeout=30) as client:
        start = Digest.of(first)
        assert (await client.put(f"/v1/blobs/{start.hex}", content=first)).is_success
        r = await client.put(f"/v1/refs/{name}", content=start.hex, headers={"if-none-match": "*"})
        assert r.status_code == 200, r.text
        async with trio.open_nursery() as nursery:
            for w in range(6):
                nursery.start_soon(writer, w)
        final = Digest.parse((await client.get(f"/v1/refs/{name}")).text.strip())
        count = int((await client.get(f"/v1/blobs/{final.hex}")).content.split(b":")[0])
    assert refused > 0, "the writers never raced: the test proves nothing"
    assert won == count, f"{won} updates succeeded but the counter says {count}"


def test_zstd_frames_are_stored_as_sent(
    s3_server: S3Server, frontends: tuple[str, list[CasServer]]
) -> None:
    url, (one, _) = frontends
    data = b"".join(b"line %d of a compressible blob\n" % i for i in range(20_000))
    encoding, frames = framing.encode(data)
    assert encoding == framing.ZSTD
    digest = Digest.of(data)
    headers = {"authorization": f"Bearer {one.token}", "content-encoding": "zstd"}
    r = httpx.put(f"{one.url}/v1/blobs/{digest.hex}", content=frames, headers=headers)
    assert r.status_code == 201, r.text
    prefix = url.removeprefix(f"s3://{s3_server.bucket}/")
    raw = S3Store(
        s3_server.bucket,
        prefix=prefix,
        config=s3_server.config(),
        client_options={"allow_http": True},
    )
    stored = obstore.get(raw, f"blobs/{digest.hex[:2]}/{digest.hex}")
    assert bytes(stored.bytes()) == frames  # not recompressed
    assert stored.attributes.get("Content-Encoding") == "zstd"


def test_serve_refuses_bad_store_options(tmp_path: Path) -> None:
    for args, needle in [
        (["--store", "s3://"], "s3://BUCKET"),
        (["--root", str(tmp_path), "--s3-endpoint", "http://x"], "--store"),
        (["--root", str(tmp_path), "--store", "s3://b"], "not allowed with"),
        ([], "needs one of --root DIR and --store"),
    ]:
        proc = run_cli("cas", "serve", *args, "--listen", "127.0.0.1:0", check=False, timeout=30)
        err = proc.stderr.decode().strip().splitlines()
        assert proc.returncode == 2, (args, proc.stderr)
        assert len(err) >= 1 and needle in err[-1], (args, err)
