"""The CAS contract, run against every backend.

One suite, four implementations of ``lazycaf.cas.api.CAS``:

- ``local``: ``LocalCAS`` over a temp directory (the embedded default);
- ``http-subprocess``: ``HttpCAS`` against the real ``lazycaf cas serve`` process (with token);
- ``http-inprocess``: ``HttpCAS`` against ``fetcher.casserver.app.CasApp`` served by hypercorn in
  the test's own trio loop (``serve_app`` + ``bind_socket``), also with a token;
- ``s3``: ``S3CAS`` on a real S3-compatible server (SeaweedFS ``weed mini``, the session's
  ``s3_server``), under a prefix of the test's own;
- ``http-s3``: ``HttpCAS`` against an in-process ``CasApp`` serving such a prefix
  (``ServedBucket``: the frontend of ``lazycaf cas serve --store s3://``).

The tamper tests corrupt what a backend stores directly (files under a ``CasDir`` root, or
the blob's object in the bucket): the contract is that no backend ever returns bytes that do
not verify.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import obstore
import pytest
import trio
from obstore.store import S3Store

from fetcher.casserver.app import CasApp
from fetcher.casserver.served import ServedBucket, ServedDir, ServedStore
from fetcher.web.asgi import bind_socket, serve_app
from lazycaf.cas.api import CAS, load_manifest, resolve
from lazycaf.cas.casdir import CasDir
from lazycaf.cas.http import MISSING_BATCH, HttpCAS
from lazycaf.cas.local import LocalCAS
from lazycaf.cas.s3 import S3CAS
from lazycaf.core import framing
from lazycaf.core.digest import Digest
from lazycaf.core.errors import (
    BlobNotFound,
    IntegrityError,
    LazyCafError,
    RefMoved,
    RefNotFound,
    Unavailable,
    UsageError,
)
from lazycaf.core.manifest import DIR, FILE, Entry, Manifest
from tests.conftest import CasServer, start_cas_server, stop
from tests.helpers import wait_for_async
from tests.s3server import S3Server

MiB = 1 << 20


@dataclass(frozen=True)
class Backend:
    kind: str
    root: Path  # the CasDir root the backend stores into
    url: str = ""
    token: str = ""
    s3: S3Server | None = None  # the server of an ``s3`` backend; ``url`` is then s3://...

    def raw_store(self) -> S3Store:
        """The ``s3`` backend's prefix, seen past ``S3CAS`` (to look at or corrupt objects)."""
        assert self.s3 is not None
        prefix = self.url.removeprefix(f"s3://{self.s3.bucket}/")
        return S3Store(
            self.s3.bucket,
            prefix=prefix,
            config=self.s3.config(),
            client_options={"allow_http": True},
        )


@pytest.fixture(scope="module")
def subprocess_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CasServer]:
    """One real server process for the module (starting one per test costs ~0.5 s each)."""
    base = tmp_path_factory.mktemp("contract-server")
    server = start_cas_server(base / "root", base)
    try:
        yield server
    finally:
        stop(server.proc)


@pytest.fixture(params=["local", "http-subprocess", "http-inprocess", "s3", "http-s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param in ("s3", "http-s3"):
        s3: S3Server = request.getfixturevalue("s3_server")
        url = f"s3://{s3.bucket}/contract-{secrets.token_hex(6)}"
        token = secrets.token_hex(8) if request.param == "http-s3" else ""
        return Backend(request.param, tmp_path / "unused", url, token, s3=s3)
    if request.param == "local":
        return Backend("local", tmp_path / "local-cas")
    if request.param == "http-subprocess":
        server: CasServer = request.getfixturevalue("subprocess_server")
        return Backend("http-subprocess", server.root, server.url, server.token)
    return Backend("http-inprocess", tmp_path / "inproc-cas", token=secrets.token_hex(8))


@pytest.fixture
async def cas(backend: Backend) -> AsyncIterator[CAS]:
    if backend.kind == "local":
        local = LocalCAS(backend.root)
        yield local
        await local.aclose()
        return
    if backend.kind == "s3":
        assert backend.s3 is not None
        s3cas = S3CAS(backend.url, config=backend.s3.config())
        yield s3cas
        await s3cas.aclose()
        return
    if backend.kind == "http-subprocess":
        client = HttpCAS(backend.url, token=backend.token)
        yield client
        await client.aclose()
        return
    served: ServedStore
    if backend.s3 is not None:  # http-s3
        served = ServedBucket(S3CAS(backend.url, config=backend.s3.config()))
    else:
        served = ServedDir(CasDir(backend.root))
    sock = bind_socket("127.0.0.1:0")
    port = sock.getsockname()[1]
    app = CasApp(served, token=backend.token)
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_app, app, sock)
        client = HttpCAS(f"http://127.0.0.1:{port}", token=backend.token)
        yield client
        await client.aclose()
        nursery.cancel_scope.cancel()
    # hypercorn closes the fd it was handed (fd://), so our close may hit EBADF.
    with contextlib.suppress(OSError):
        sock.close()


def unique(label: str = "") -> bytes:
    """Content no other test (nor an earlier run against a shared server) has stored."""
    return f"{label}:{secrets.token_hex(16)}\n".encode()


def ref_name(stem: str) -> str:
    """A ref name unique to this test: the subprocess server is shared by the module."""
    return f"t{secrets.token_hex(4)}-{stem}"


def _s3_key(digest: Digest) -> str:
    return f"blobs/{digest.hex[:2]}/{digest.hex}"


def blob_files(backend: Backend, digest: Digest) -> list[str]:
    """What the backend stores under the blob's name: files, or the object's key."""
    if backend.s3 is not None:
        try:
            obstore.head(backend.raw_store(), _s3_key(digest))
        except FileNotFoundError:
            return []
        return [_s3_key(digest)]
    base = backend.root / "blobs" / digest.hex[:2] / digest.hex
    return [str(p) for p in (base, base.with_suffix(".zst")) if p.exists()]


def tmp_files(root: Path) -> list[Path]:
    return sorted(p for p in (root / "tmp").rglob("*") if p.is_file())


async def wait_tmp_empty(backend: Backend) -> None:
    """A server may still finish PUTs the client abandoned; wait until it has (an S3 PUT is
    atomic: it leaves nothing half-written behind)."""
    if backend.s3 is not None:
        return
    root = backend.root
    await wait_for_async(lambda: not tmp_files(root), f"no temp files left under {root}")


def tamper(backend: Backend, digest: Digest, content: bytes) -> None:
    """Replace the stored blob ``digest`` by ``content`` kept raw (what a bad disk does)."""
    files = blob_files(backend, digest)
    assert files, f"blob {digest} is not stored in {backend.kind} backend"
    if backend.s3 is not None:
        obstore.put(backend.raw_store(), _s3_key(digest), content)
        return
    for p in files:
        Path(p).unlink()
    (backend.root / "blobs" / digest.hex[:2] / digest.hex).write_bytes(content)


def small_manifest(file_digest: Digest, size: int) -> Manifest:
    return Manifest(
        [
            Entry("pkg", DIR, 0o755, 0, 0),
            Entry("pkg/data", FILE, 0o644, 1_700_000_000_000_000_000, size, file_digest),
        ]
    )


# -- blobs -------------------------------------------------------------------------------------
def _blob(kind: str) -> bytes:
    if kind == "empty":
        return b""
    if kind == "small":
        return unique("small")
    if kind == "compressible-1MiB":
        line = unique("line")
        return (line * (MiB // len(line) + 1))[:MiB]
    return os.urandom(MiB)


@pytest.mark.parametrize("kind", ["empty", "small", "compressible-1MiB", "incompressible-1MiB"])
async def test_put_get_round_trip(cas: CAS, kind: str) -> None:
    data = _blob(kind)
    digest = Digest.of(data)
    await cas.put(digest, data)
    assert await cas.has(digest)
    assert await cas.get(digest) == data


async def test_put_is_idempotent(cas: CAS) -> None:
    data = unique("idem") * 1000
    digest = Digest.of(data)
    assert await cas.put(digest, data) is True
    assert await cas.put(digest, data) is False
    assert await cas.get(digest) == data


@pytest.mark.parametrize("size", [16, MiB])
async def test_put_mismatching_data_is_refused_and_not_stored(
    cas: CAS, backend: Backend, size: int
) -> None:
    claimed = unique("claimed") * (size // 40 + 1)
    digest = Digest.of(claimed)
    other = claimed[:-1] + b"?"
    with pytest.raises(LazyCafError) as excinfo:
        await cas.put(digest, other)
    if backend.kind in ("local", "s3"):
        assert isinstance(excinfo.value, IntegrityError)
    assert digest.hex in str(excinfo.value)
    assert not isinstance(excinfo.value, Unavailable)
    assert await cas.find_missing([digest]) == {digest}
    assert not await cas.has(digest)
    assert blob_files(backend, digest) == []
    with pytest.raises(BlobNotFound):
        await cas.get(digest)


async def test_put_many_mixed_new_present_and_repeated(cas: CAS, backend: Backend) -> None:
    present = unique("present")
    await cas.put(Digest.of(present), present)
    new = [unique("a"), _blob("compressible-1MiB"), os.urandom(100_000), unique("b") * 5000]
    items = [(Digest.of(b), b) for b in (present, *new, new[0])]
    assert await cas.put_many(items) == len(new)  # present and repeated blobs are not new
    for d, data in items:
        assert await cas.get(d) == data
    assert await cas.put_many(items) == 0
    assert await cas.put_many([]) == 0
    await wait_tmp_empty(backend)


async def test_put_many_of_many_small_blobs(cas: CAS) -> None:
    items = [(Digest.of(b), b) for b in (unique(f"many{i}") for i in range(300))]
    assert await cas.put_many(items) == 300
    assert await cas.find_missing([d for d, _ in items]) == set()


@pytest.mark.parametrize("where", ["first", "middle", "last"])
async def test_put_many_with_a_wrong_digest_never_stores_it(
    cas: CAS, backend: Backend, where: str
) -> None:
    """The blob that does not verify raises an IntegrityError (plain, not an exception group)
    and is never stored. The contract leaves the batch's other blobs to the backend: each is
    either absent or whole. LocalCAS and S3CAS verify the batch first and store none of it."""
    good = [(Digest.of(b), b) for b in (unique(f"good{i}") * 1000 for i in range(6))]
    claimed = unique("claimed") * 1000
    bad = Digest.of(claimed)
    items = list(good)
    items.insert({"first": 0, "middle": 3, "last": len(items)}[where], (bad, claimed + b"?"))
    with pytest.raises(IntegrityError) as excinfo:
        await cas.put_many(items)
    assert bad.hex in str(excinfo.value)
    await wait_tmp_empty(backend)
    assert not await cas.has(bad)
    assert blob_files(backend, bad) == []
    for d, data in good:
        if await cas.has(d):
            assert await cas.get(d) == data
    if backend.kind in ("local", "s3"):  # they verify the whole batch before storing any
        assert await cas.find_missing([d for d, _ in good]) == {d for d, _ in good}


async def test_has_and_find_missing_across_batches(cas: CAS) -> None:
    contents = [unique(f"present{i}") for i in range(3)]
    present = [Digest.of(c) for c in contents]
    for d, c in zip(present, contents, strict=True):
        await cas.put(d, c)
    absent = [Digest.of(unique(f"absent{i}")) for i in range(MISSING_BATCH + 300)]
    # present digests before, at and after the batch boundary; duplicates of both kinds
    query = [present[0], *absent[:MISSING_BATCH], present[1], *absent[MISSING_BATCH:], present[2]]
    query += [absent[0], absent[-1], present[1], absent[MISSING_BATCH]]
    missing = await cas.find_missing(query)
    assert missing == set(absent)
    assert await cas.find_missing(present + present) == set()
    assert await cas.find_missing([]) == set()
    for d in present:
        assert await cas.has(d)
    assert not await cas.has(absent[0])


async def test_get_missing_blob_names_the_digest(cas: CAS) -> None:
    digest = Digest.of(unique("never-stored"))
    with pytest.raises(BlobNotFound) as excinfo:
        await cas.get(digest)
    assert excinfo.value.digest == digest
    assert digest.hex in str(excinfo.value)


async def test_get_of_a_corrupted_blob_is_an_integrity_error(cas: CAS, backend: Backend) -> None:
    data = unique("corrupt-me") * 100
    digest = Digest.of(data)
    await cas.put(digest, data)
    tamper(backend, digest, data[:-1] + b"!")
    with pytest.raises(IntegrityError) as excinfo:
        await cas.get(digest)
    assert digest.hex in str(excinfo.value)


# -- refs ----------------------------------------------------------------------------------
async def _stored(cas: CAS, label: str) -> Digest:
    data = unique(label)
    digest = Digest.of(data)
    await cas.put(digest, data)
    return digest


@pytest.mark.parametrize("stem", ["trainer:latest", "v1.2_rc+local@x", "profiles/x", "a/b/c"])
async def test_ref_set_get_overwrite(cas: CAS, stem: str) -> None:
    name = ref_name(stem)
    first, second = await _stored(cas, "first"), await _stored(cas, "second")
    await cas.set_ref(name, first)
    assert await cas.get_ref(name) == first
    await cas.set_ref(name, second)
    assert await cas.get_ref(name) == second
    await cas.set_ref(name, second)  # setting the same value again is fine
    assert await cas.get_ref(name) == second


async def test_ref_compare_and_swap(cas: CAS) -> None:
    name = ref_name("profiles/cas")
    a, b, c = [await _stored(cas, x) for x in "abc"]
    await cas.set_ref(name, a, expected=None)  # must not exist yet: it does not
    with pytest.raises(RefMoved, match="moved"):
        await cas.set_ref(name, b, expected=None)  # now it does
    with pytest.raises(RefMoved) as excinfo:
        await cas.set_ref(name, b, expected=c)  # it holds a, not c
    assert a.hex in str(excinfo.value)
    assert await cas.get_ref(name) == a
    await cas.set_ref(name, b, expected=a)
    assert await cas.get_ref(name) == b


async def test_concurrent_compare_and_swap_lets_one_writer_win(cas: CAS) -> None:
    name = ref_name("profiles/race")
    base = await _stored(cas, "base")
    await cas.set_ref(name, base)
    rivals = [await _stored(cas, f"rival{i}") for i in range(6)]
    won: list[Digest] = []

    async def attempt(d: Digest) -> None:
        with contextlib.suppress(RefMoved):
            await cas.set_ref(name, d, expected=base)
            won.append(d)

    async with trio.open_nursery() as nursery:
        for d in rivals:
            nursery.start_soon(attempt, d)
    assert len(won) == 1 and await cas.get_ref(name) == won[0]


async def test_read_refs_by_prefix(cas: CAS) -> None:
    """Every ref under a prefix with its digest (crowd prefetch lists ``profiles/``);
    refs outside it are left out, a prefix with no refs gives nothing."""
    stem = ref_name("listing")
    a, b = await _stored(cas, "list-a"), await _stored(cas, "list-b")
    await cas.set_ref(f"{stem}/profiles/x", a)
    await cas.set_ref(f"{stem}/profiles/y:1", b)
    await cas.set_ref(f"{stem}/other", a)
    assert await cas.read_refs(f"{stem}/profiles/") == {
        f"{stem}/profiles/x": a,
        f"{stem}/profiles/y:1": b,
    }
    assert len(await cas.read_refs(f"{stem}/")) == 3
    assert await cas.read_refs(ref_name("none-here")) == {}
    assert {f"{stem}/other", f"{stem}/profiles/x"} <= set(await cas.list_refs())


async def test_unknown_ref_names_it(cas: CAS) -> None:
    for name in (ref_name("nope"), ref_name("profiles") + "/nope"):
        with pytest.raises(RefNotFound) as excinfo:
            await cas.get_ref(name)
        assert excinfo.value.name == name
        assert repr(name) in str(excinfo.value)


async def test_ref_prefix_of_a_nested_ref_is_not_a_ref(cas: CAS) -> None:
    name = ref_name("profiles")
    await cas.set_ref(f"{name}/x", await _stored(cas, "nested"))
    with pytest.raises(RefNotFound):
        await cas.get_ref(name)
    with pytest.raises(RefNotFound):
        await cas.get_ref(f"{name}/x/y")


@pytest.mark.parametrize("order", ["dir-then-file", "file-then-dir"])
async def test_ref_name_conflicting_with_nested_refs_is_refused_cleanly(
    cas: CAS, order: str
) -> None:
    """``p`` and ``p/x`` cannot both be refs (as in git); refusing is a usage error, not an
    outage: the CAS is fine and retrying will never help."""
    base = ref_name("p")
    digest = await _stored(cas, "conflict")
    first, second = (f"{base}/x", base) if order == "dir-then-file" else (base, f"{base}/x")
    await cas.set_ref(first, digest)
    with pytest.raises(LazyCafError) as excinfo:
        await cas.set_ref(second, digest)
    assert not isinstance(excinfo.value, Unavailable), excinfo.value
    assert await cas.get_ref(first) == digest


BAD_REF_NAMES = [
    "",
    "/abs",
    "trailing/",
    "a//b",
    "..",
    "a/../b",
    "../etc/passwd",
    ".hidden",
    "a/.b",
    "-dash",
    "with space",
    "new\nline",
    "ünïcode",
    "back\\slash",
    "q?x",
    "pct%2e",
    "x" * 201,
]


@pytest.mark.parametrize("name", BAD_REF_NAMES, ids=range(len(BAD_REF_NAMES)))
async def test_invalid_ref_names_are_usage_errors(cas: CAS, name: str) -> None:
    digest = await _stored(cas, "bad-name")
    with pytest.raises(UsageError):
        await cas.set_ref(name, digest)
    with pytest.raises(UsageError):
        await cas.get_ref(name)


async def test_ref_to_a_missing_blob_is_refused(cas: CAS) -> None:
    name = ref_name("dangling")
    missing = Digest.of(unique("not-there"))
    with pytest.raises(LazyCafError) as excinfo:
        await cas.set_ref(name, missing)
    assert missing.hex in str(excinfo.value)
    with pytest.raises(RefNotFound):
        await cas.get_ref(name)
    # an existing ref keeps its value when a dangling update is refused
    good = await _stored(cas, "good")
    await cas.set_ref(name, good)
    with pytest.raises(LazyCafError):
        await cas.set_ref(name, missing)
    assert await cas.get_ref(name) == good


async def test_resolve_hex_and_name(cas: CAS) -> None:
    digest = await _stored(cas, "resolve")
    assert await resolve(cas, digest.hex) == digest
    # a hex digest resolves without a round trip, even when nothing is stored under it
    absent = Digest.of(unique("absent"))
    assert await resolve(cas, absent.hex) == absent
    name = ref_name("exe:latest")
    await cas.set_ref(name, digest)
    assert await resolve(cas, name) == digest
    with pytest.raises(RefNotFound):
        await resolve(cas, ref_name("unknown"))
    # digests are lowercase: uppercase hex is a (valid, unknown) ref name, not a digest
    with pytest.raises(RefNotFound):
        await resolve(cas, digest.hex.upper())


# -- manifests -----------------------------------------------------------------------------
async def test_load_manifest_by_digest_and_by_ref(cas: CAS) -> None:
    content = unique("file")
    manifest = small_manifest(Digest.of(content), len(content))
    encoded = manifest.encode()
    digest = Digest.of(encoded)
    await cas.put(digest, encoded)
    got_digest, got = await load_manifest(cas, digest.hex)
    assert got_digest == digest
    assert got.encode() == encoded
    name = ref_name("exe")
    await cas.set_ref(name, digest)
    assert (await load_manifest(cas, name))[0] == digest


async def test_load_tampered_manifest_is_an_integrity_error(cas: CAS, backend: Backend) -> None:
    content = unique("file")
    encoded = small_manifest(Digest.of(content), len(content)).encode()
    digest = Digest.of(encoded)
    await cas.put(digest, encoded)
    name = ref_name("tampered")
    await cas.set_ref(name, digest)
    # a different, perfectly valid manifest under the old name
    other = small_manifest(Digest.of(content + b"x"), len(content) + 1).encode()
    tamper(backend, digest, other)
    for ref in (digest.hex, name):
        with pytest.raises(IntegrityError) as excinfo:
            await load_manifest(cas, ref)
        assert digest.hex in str(excinfo.value)


async def test_load_manifest_of_a_non_manifest_blob_names_it(cas: CAS) -> None:
    data = unique("not a manifest")
    digest = Digest.of(data)
    await cas.put(digest, data)
    with pytest.raises(IntegrityError) as excinfo:
        await load_manifest(cas, digest.hex)
    assert digest.hex in str(excinfo.value)


async def test_get_many_encoded_returns_present_blobs_only(cas: CAS) -> None:
    blobs = [secrets.token_bytes(50) * (i + 1) for i in range(5)] + [b""]
    await cas.put_many([(Digest.of(b), b) for b in blobs])
    absent = Digest.of(b"never stored " + secrets.token_bytes(8))
    wanted = [Digest.of(b) for b in blobs] + [absent]
    got = await cas.get_many_encoded(wanted)
    assert set(got) == set(wanted) - {absent}
    for data in blobs:
        encoding, payload = got[Digest.of(data)]
        assert framing.decode(encoding, payload) == data


async def test_an_http_cas_streams_a_batch_answer_in_runs(
    subprocess_server: CasServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``stream_many_encoded`` hands records over while the answer arrives, in runs of about
    ``STREAM_RUN_BYTES``, present blobs only, each once."""
    import lazycaf.cas.http as http

    monkeypatch.setattr(http, "STREAM_RUN_BYTES", 30_000)
    blobs = [secrets.token_bytes(10_000) for _ in range(10)]  # 100 KB: packed in a thread
    client = HttpCAS(subprocess_server.url, token=subprocess_server.token)
    try:
        await client.put_many([(Digest.of(b), b) for b in blobs])
        absent = Digest.of(b"never stored " + secrets.token_bytes(8))
        runs: list[list[Digest]] = []

        async def arrived(records: list[tuple[Digest, str, bytes]]) -> None:
            runs.append([d for d, _, _ in records])
            for d, encoding, payload in records:
                assert Digest.of(framing.decode(encoding, payload)) == d

        await client.stream_many_encoded([absent, *map(Digest.of, blobs)], arrived)
    finally:
        await client.aclose()
    assert [d for run in runs for d in run] == [Digest.of(b) for b in blobs]
    assert [len(run) for run in runs] == [3, 3, 3, 1]  # zstd cannot shrink random bytes
