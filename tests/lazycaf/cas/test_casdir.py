"""Tests for lazycaf.cas.casdir: the on-disk CAS directory (sync code, real temp dirs)."""

from __future__ import annotations

import errno
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zstandard

from lazycaf.cas import casdir
from lazycaf.cas.casdir import STALE_TMP_SECONDS, CasDir, check_ref_name
from lazycaf.core import framing
from lazycaf.core.digest import Digest
from lazycaf.core.errors import (
    BlobNotFound,
    DigestMismatch,
    IntegrityError,
    LazyCafError,
    RefNotFound,
    UsageError,
)


def compressible(size: int, seed: int = 0) -> bytes:
    rng = random.Random(seed)
    words = [rng.randbytes(rng.randrange(3, 12)) for _ in range(64)]
    base = b"".join(rng.choices(words, k=min(size, 256 << 10) // 3 + 1))
    return (base * (size // len(base) + 1))[:size]


@pytest.fixture
def cas(tmp_path: Path) -> CasDir:
    return CasDir(tmp_path / "cas")


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if not p.is_dir())


def blob_path(cas: CasDir, digest: Digest) -> Path:
    return cas.root / "blobs" / digest.hex[:2] / digest.hex


def zst_path(cas: CasDir, digest: Digest) -> Path:
    return blob_path(cas, digest).with_name(digest.hex + ".zst")


def store(cas: CasDir, data: bytes) -> Digest:
    digest = Digest.of(data)
    assert cas.write(digest, data) is True
    return digest


# -- layout ----------------------------------------------------------------------------------
def test_creates_layout(tmp_path: Path) -> None:
    c = CasDir(tmp_path / "deep" / "cas")
    for sub in ("blobs", "refs", "tmp"):
        assert (tmp_path / "deep" / "cas" / sub).is_dir()
    assert "cas" in repr(c)


def test_open_existing_without_create(tmp_path: Path) -> None:
    c = CasDir(tmp_path / "cas")
    d = store(c, b"kept")
    assert CasDir(tmp_path / "cas", create=False).read(d) == b"kept"


@pytest.mark.parametrize("exists", [False, True])
def test_open_non_cas_directory_without_create_is_usage_error(tmp_path: Path, exists: bool) -> None:
    target = tmp_path / "plain"
    if exists:
        target.mkdir()
    with pytest.raises(UsageError, match="not a CAS directory"):
        CasDir(target, create=False)
    assert target.exists() == exists  # nothing created


# -- blobs: round trips and layout -----------------------------------------------------------
@pytest.mark.parametrize(
    "data",
    [b"", b"x", b"hello world" * 10, compressible(1 << 20), os.urandom(300_000)],
    ids=["empty", "one", "small", "compressible-1MiB", "random"],
)
def test_write_read_round_trip(cas: CasDir, data: bytes) -> None:
    d = Digest.of(data)
    assert not cas.has(d)
    assert cas.write(d, data) is True
    assert cas.has(d)
    assert cas.read(d) == data
    assert files_under(cas.root / "tmp") == []


def test_compressible_blob_is_stored_as_zst_frames(cas: CasDir) -> None:
    data = compressible((1 << 20) + 7)
    d = store(cas, data)
    assert zst_path(cas, d).is_file()
    assert not blob_path(cas, d).exists()
    payload = zst_path(cas, d).read_bytes()
    assert len(payload) < len(data)
    assert framing.decode(framing.ZSTD, payload) == data
    assert cas.read_encoded(d) == (framing.ZSTD, payload)


def test_incompressible_blob_is_stored_raw(cas: CasDir) -> None:
    data = os.urandom(200_000)
    d = store(cas, data)
    assert blob_path(cas, d).read_bytes() == data
    assert not zst_path(cas, d).exists()
    assert cas.read_encoded(d) == (framing.IDENTITY, data)


def test_blobs_fan_out_by_two_hex_digits(cas: CasDir) -> None:
    ds = [store(cas, f"blob {i}".encode()) for i in range(20)]
    for d in ds:
        (path,) = (cas.root / "blobs" / d.hex[:2]).glob(d.hex + "*")
        assert path.name.startswith(d.hex)


def test_write_is_idempotent(cas: CasDir) -> None:
    data = compressible(500_000)
    d = store(cas, data)
    path = zst_path(cas, d)
    os.utime(path, (1e9, 1e9))  # an old blob
    before = path.stat()
    assert cas.write(d, data) is False
    after = path.stat()
    # the same file, not written again; its mtime restarts (the store GC dates blobs by it)
    assert before.st_ino == after.st_ino and after.st_mtime > time.time() - 60
    assert files_under(cas.root / "blobs") == [path]
    assert files_under(cas.root / "tmp") == []
    os.utime(path, (1e9, 1e9))
    assert cas.find_missing([d, Digest.of(b"absent")]) == [Digest.of(b"absent")]
    assert path.stat().st_mtime > time.time() - 60  # find_missing refreshes it too


def test_write_with_wrong_digest_stores_nothing(cas: CasDir) -> None:
    data = compressible(300_000)
    wrong = Digest.of(b"something else")
    with pytest.raises(DigestMismatch) as info:
        cas.write(wrong, data)
    assert info.value.expected == wrong
    assert info.value.actual == Digest.of(data)
    assert not cas.has(wrong)
    assert not cas.has(Digest.of(data))
    assert list((cas.root / "blobs").iterdir()) == []
    assert list((cas.root / "tmp").iterdir()) == []


def test_failed_commit_leaves_no_temp_file(cas: CasDir, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    data = b"payload"
    with pytest.raises(OSError, match="No space"):
        cas.write(Digest.of(data), data)
    monkeypatch.undo()
    assert files_under(cas.root / "tmp") == []
    assert files_under(cas.root / "blobs") == []
    assert not cas.has(Digest.of(data))


def test_find_missing_keeps_order(cas: CasDir) -> None:
    present = [store(cas, b"a"), store(cas, b"c")]
    absent = [Digest.of(b"b"), Digest.of(b"d")]
    query = [absent[1], present[0], absent[0], present[1]]
    assert cas.find_missing(query) == [absent[1], absent[0]]
    assert cas.find_missing([]) == []


def test_find_missing_refreshes_raw_and_zst_blobs_in_any_order(cas: CasDir) -> None:
    """The form tried first follows the blobs found (a run of raw blobs, then zstd ones):
    whichever it is, every stored blob is found and refreshed, and only absent ones miss."""
    raw = [store(cas, os.urandom(100)) for _ in range(3)]
    zst = [store(cas, compressible(50_000 + i)) for i in range(3)]
    paths = [blob_path(cas, d) for d in raw] + [zst_path(cas, d) for d in zst]
    absent = [Digest.of(b"absent %d" % i) for i in range(2)]
    for query in (
        raw + zst + absent,
        [zst[0], raw[0], absent[0], raw[1], raw[2], zst[1], absent[1], zst[2]],
        absent + zst + raw,
    ):
        for p in paths:
            os.utime(p, (1e9, 1e9))
        assert cas.find_missing(query) == [d for d in query if d in absent]
        assert all(p.stat().st_mtime > time.time() - 60 for p in paths)


def test_read_missing_blob(cas: CasDir) -> None:
    d = Digest.of(b"never stored")
    with pytest.raises(BlobNotFound, match=d.hex) as info:
        cas.read(d)
    assert info.value.digest == d
    with pytest.raises(BlobNotFound):
        cas.read_encoded(d)


# -- blobs: tampering is detected ------------------------------------------------------------
def test_tampered_raw_blob_fails_to_read(cas: CasDir) -> None:
    data = os.urandom(100_000)
    d = store(cas, data)
    path = blob_path(cas, d)
    tampered = bytearray(data)
    tampered[50_000] ^= 0x01
    path.write_bytes(bytes(tampered))
    with pytest.raises(DigestMismatch, match=d.hex) as info:
        cas.read(d)
    assert info.value.expected == d
    assert info.value.actual == Digest.of(bytes(tampered))


@pytest.mark.parametrize("where", ["header", "middle", "end", "truncate", "append", "swap"])
def test_tampered_zst_blob_fails_to_read(cas: CasDir, where: str) -> None:
    data = compressible(3 * framing.FRAME_DATA + 1000, seed=4)
    d = store(cas, data)
    path = zst_path(cas, d)
    payload = bytearray(path.read_bytes())
    if where == "truncate":
        payload = payload[: len(payload) - 10]
    elif where == "append":
        payload += framing.encode(compressible(framing.FRAME_DATA, seed=8))[1]
    elif where == "swap":
        payload = bytearray(framing.encode(compressible(len(data), seed=5))[1])
    else:
        i = {"header": 5, "middle": len(payload) // 2, "end": len(payload) - 3}[where]
        payload[i] ^= 0x55
    path.write_bytes(bytes(payload))
    with pytest.raises(IntegrityError) as info:
        cas.read(d)
    assert d.hex in str(info.value)


# -- write_encoded ---------------------------------------------------------------------------
def test_write_encoded_round_trip_keeps_frames(cas: CasDir) -> None:
    data = compressible(700_000, seed=6)
    encoding, payload = framing.encode(data)
    d = Digest.of(data)
    assert cas.write_encoded(d, encoding, payload) is True
    assert zst_path(cas, d).read_bytes() == payload
    assert cas.read(d) == data
    assert cas.write_encoded(d, encoding, payload) is False
    assert cas.write(d, data) is False


def test_write_encoded_identity(cas: CasDir) -> None:
    data = os.urandom(10_000)
    d = Digest.of(data)
    assert cas.write_encoded(d, framing.IDENTITY, data) is True
    assert blob_path(cas, d).read_bytes() == data


def test_write_encoded_keeps_unhelpful_zstd_raw(cas: CasDir) -> None:
    data = os.urandom(50_000)
    payload = zstandard.ZstdCompressor(level=1).compress(data)  # larger than data
    assert len(payload) >= len(data)
    d = Digest.of(data)
    assert cas.write_encoded(d, framing.ZSTD, payload) is True
    assert blob_path(cas, d).read_bytes() == data
    assert not zst_path(cas, d).exists()


def test_write_encoded_rejects_wrong_digest_and_stores_nothing(cas: CasDir) -> None:
    data = compressible(300_000)
    encoding, payload = framing.encode(data)
    with pytest.raises(DigestMismatch):
        cas.write_encoded(Digest.of(b"other"), encoding, payload)
    assert files_under(cas.root / "blobs") == []
    assert files_under(cas.root / "tmp") == []


@pytest.mark.parametrize("encoding", ["zstd", "gzip"])
def test_write_encoded_rejects_undecodable_payloads(cas: CasDir, encoding: str) -> None:
    d = Digest.of(b"x")
    with pytest.raises(IntegrityError, match=d.hex):
        cas.write_encoded(d, encoding, b"definitely not zstd")
    assert files_under(cas.root / "blobs") == []


def test_write_encoded_rejects_big_window_frames(cas: CasDir) -> None:
    data = compressible(4 << 20, seed=3)
    params = zstandard.ZstdCompressionParameters.from_level(
        3, window_log=24, write_content_size=True
    )
    payload = zstandard.ZstdCompressor(compression_params=params).compress(data)
    with pytest.raises(IntegrityError):
        cas.write_encoded(Digest.of(data), framing.ZSTD, payload)
    assert files_under(cas.root / "blobs") == []


def test_write_encoded_never_stores_frames_over_128k(cas: CasDir) -> None:
    """A peer may send one big frame with a small window; what is stored must still be
    frames of at most 128 KiB of data (the layout the Btrfs cache and range reads rely on)."""
    data = compressible(1 << 20, seed=12)
    params = zstandard.ZstdCompressionParameters.from_level(
        3, window_log=17, write_content_size=True
    )
    payload = zstandard.ZstdCompressor(compression_params=params).compress(data)
    assert zstandard.get_frame_parameters(payload).content_size == 1 << 20
    d = Digest.of(data)
    try:
        cas.write_encoded(d, framing.ZSTD, payload)
    except IntegrityError:
        return  # refusing it is fine too
    encoding, stored = cas.read_encoded(d)
    if encoding == framing.IDENTITY:
        return
    pos = 0
    while pos < len(stored):
        params_ = zstandard.get_frame_parameters(stored[pos:])
        assert 0 < params_.content_size <= framing.FRAME_DATA
        obj = zstandard.ZstdDecompressor().decompressobj()
        obj.decompress(stored[pos:])
        pos = len(stored) - len(obj.unused_data)


# -- refs ------------------------------------------------------------------------------------
def test_refs_round_trip(cas: CasDir) -> None:
    d1, d2 = store(cas, b"manifest v1"), store(cas, b"manifest v2")
    cas.write_ref("trainer:latest", d1)
    assert cas.read_ref("trainer:latest") == d1
    assert (cas.root / "refs" / "trainer:latest").read_text() == d1.hex + "\n"
    cas.write_ref("trainer:latest", d2)  # moving a ref
    assert cas.read_ref("trainer:latest") == d2
    cas.write_ref("profiles/trainer/v2", d1)
    assert cas.read_ref("profiles/trainer/v2") == d1
    assert files_under(cas.root / "tmp") == []


def test_read_missing_ref(cas: CasDir) -> None:
    with pytest.raises(RefNotFound, match="'nope'") as info:
        cas.read_ref("nope")
    assert info.value.name == "nope"
    d = store(cas, b"m")
    cas.write_ref("dir/leaf", d)
    with pytest.raises(RefNotFound):
        cas.read_ref("dir")  # a directory of refs is not a ref
    with pytest.raises(RefNotFound):
        cas.read_ref("dir/leaf/deeper")


def test_ref_to_missing_blob_is_rejected(cas: CasDir) -> None:
    d = Digest.of(b"not stored")
    with pytest.raises(BlobNotFound, match=d.hex):
        cas.write_ref("x", d)
    assert files_under(cas.root / "refs") == []
    with pytest.raises(RefNotFound):
        cas.read_ref("x")


VALID_REFS = [
    "a",
    "trainer:latest",
    "profiles/x",
    "A-b_c.d+e@f:1.2",
    "x" * 200,
    "a/b/c/d",
    "v1.0",
    "0",
]
INVALID_REFS = [
    "",
    "/a",
    "a/",
    "a//b",
    "..",
    "../x",
    "a/../b",
    "a/..",
    ".hidden",
    "a/.b",
    "-x",
    "_x",
    "a b",
    "a\n",
    "a\0b",
    "naïve",
    "x" * 201,
    "a\\b",
    "a/./b",
    "a..b",
]


@pytest.mark.parametrize("name", VALID_REFS)
def test_valid_ref_names(cas: CasDir, name: str) -> None:
    assert check_ref_name(name) == name
    d = store(cas, name.encode())
    cas.write_ref(name, d)
    assert cas.read_ref(name) == d


@pytest.mark.parametrize("name", INVALID_REFS, ids=repr)
def test_invalid_ref_names_are_usage_errors(cas: CasDir, name: str) -> None:
    d = store(cas, b"m")
    with pytest.raises(UsageError, match="invalid ref name"):
        check_ref_name(name)
    with pytest.raises(UsageError):
        cas.write_ref(name, d)
    with pytest.raises(UsageError):
        cas.read_ref(name)
    assert files_under(cas.root / "refs") == []
    assert not (cas.root.parent / "x").exists()


@pytest.mark.parametrize(("first", "second"), [("a", "a/b"), ("a/b", "a")])
def test_ref_colliding_with_a_ref_directory_is_a_clean_error(
    cas: CasDir, first: str, second: str
) -> None:
    """``trainer`` and ``trainer/v2`` cannot both exist; the second write says so as a
    LazyCAF error (not a raw OSError), and leaves no temp file behind."""
    d = store(cas, b"m")
    cas.write_ref(first, d)
    with pytest.raises(LazyCafError):
        cas.write_ref(second, d)
    assert cas.read_ref(first) == d
    assert files_under(cas.root / "tmp") == []


# -- write_many: group commit ------------------------------------------------------------------
def batch(*blobs: bytes) -> list[tuple[Digest, bytes]]:
    return [(Digest.of(b), b) for b in blobs]


def test_write_many_mixed_new_present_and_repeated(cas: CasDir) -> None:
    present = compressible(200_000, seed=1)
    store(cas, present)
    new = [compressible(300_000, seed=2), os.urandom(50_000), b"", b"small"]
    items = batch(present, *new, new[0])
    assert cas.write_many(items) == 4  # the present blob and the repeat are not new
    for d, data in items:
        assert cas.read(d) == data
    assert len(files_under(cas.root / "blobs")) == 5
    assert files_under(cas.root / "tmp") == []
    assert cas.write_many(items) == 0
    assert cas.write_many([]) == 0


@pytest.mark.parametrize("where", ["first", "middle", "last", "repeat"])
def test_write_many_with_a_wrong_digest_stores_none_of_the_batch(cas: CasDir, where: str) -> None:
    """Verification is all or nothing: the batch is checked before anything is written."""
    good = batch(*(compressible(100_000, seed=s) for s in range(4)))
    claimed = compressible(100_000, seed=9)
    bad = (Digest.of(claimed), claimed[:-1] + b"?")
    if where == "repeat":  # a blob listed twice, the second copy wrong
        items = [*good, (good[1][0], good[1][1] + b"!")]
    else:
        items = list(good)
        items.insert({"first": 0, "middle": 2, "last": len(items)}[where], bad)
    with pytest.raises(DigestMismatch):
        cas.write_many(items)
    assert files_under(cas.root / "blobs") == []
    assert files_under(cas.root / "tmp") == []
    digests = [d for d, _ in items]
    assert cas.find_missing(digests) == digests


def test_write_many_syncs_once_then_renames(cas: CasDir, monkeypatch: pytest.MonkeyPatch) -> None:
    """One syncfs for the batch, before the first rename; no fsync per blob."""
    events: list[str] = []
    real_syncfs, real_replace = casdir.syncfs, os.replace

    def syncfs(path: object) -> None:
        events.append("syncfs")
        real_syncfs(path)  # type: ignore[arg-type]

    def replace(src: str, dst: str) -> None:
        events.append("replace")
        real_replace(src, dst)

    def fsync(fd: int) -> None:
        raise AssertionError("group commit must not fsync each blob")

    monkeypatch.setattr(casdir, "syncfs", syncfs)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "fsync", fsync)
    items = batch(*(f"blob {i}".encode() * (i + 1) for i in range(50)))
    assert cas.write_many(items) == 50
    assert events == ["syncfs"] + ["replace"] * 50
    events.clear()
    assert cas.write_many(items) == 0
    assert events == []  # nothing new: nothing to sync


def test_write_many_failing_syncfs_stores_nothing(
    cas: CasDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    def syncfs(path: object) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(casdir, "syncfs", syncfs)
    items = batch(b"one", b"two", compressible(300_000))
    with pytest.raises(OSError, match="Input/output"):
        cas.write_many(items)
    monkeypatch.undo()
    assert files_under(cas.root / "blobs") == []
    assert files_under(cas.root / "tmp") == []
    assert cas.write_many(items) == 3


def test_write_many_rename_failing_midway_keeps_whole_blobs_only(
    cas: CasDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Renames after the syncfs: those done are durable, whole blobs; the rest is dropped."""
    real_replace = os.replace
    calls = 0

    def replace(src: str, dst: str) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    items = batch(*(compressible(100_000, seed=s) for s in range(5)))
    with pytest.raises(OSError, match="No space"):
        cas.write_many(items)
    monkeypatch.undo()
    assert [cas.has(d) for d, _ in items] == [True, True, False, False, False]
    for d, data in items[:2]:
        assert cas.read(d) == data
    assert files_under(cas.root / "tmp") == []


_CRASH = """
import os, sys
from lazycaf.cas.casdir import CasDir
from lazycaf.core.digest import Digest

root, renames = sys.argv[1], int(sys.argv[2])
done = 0
real_replace = os.replace

def replace(src, dst):
    global done
    if done == renames:
        os._exit(9)  # the process dies here: no cleanup, no further rename
    done += 1
    real_replace(src, dst)

os.replace = replace
blobs = [f"blob {i}\\n".encode() * 20_000 for i in range(5)]
CasDir(root).write_many([(Digest.of(b), b) for b in blobs])
"""


@pytest.mark.parametrize("renames", [0, 2])
def test_crash_between_staging_and_rename_leaves_no_bad_blob(tmp_path: Path, renames: int) -> None:
    """A process killed after staging (and after some renames) leaves only whole blobs under
    blobs/ and inert temp files; the next writer ignores those, and an old one is swept."""
    root = tmp_path / "cas"
    repo = Path(__file__).resolve().parents[3]
    proc = subprocess.run(
        [sys.executable, "-c", _CRASH, str(root), str(renames)], cwd=repo, capture_output=True
    )
    assert proc.returncode == 9, proc.stderr.decode()
    items = batch(*(f"blob {i}\n".encode() * 20_000 for i in range(5)))
    digests = [d for d, _ in items]
    c = CasDir(root)  # a fresh open keeps temp files younger than STALE_TMP_SECONDS
    leftovers = files_under(root / "tmp")
    assert len(leftovers) == 5 - renames
    assert len(files_under(root / "blobs")) == renames
    assert c.find_missing(digests) == digests[renames:]
    for d, data in items[:renames]:
        assert c.read(d) == data
    # the next write ignores the leftovers and stores the rest
    assert c.write_many(items) == 5 - renames
    for d, data in items:
        assert c.read(d) == data
    assert sorted(files_under(root / "tmp")) == sorted(leftovers)
    # once old, the leftovers are removed when the CAS is next opened
    old = time.time() - STALE_TMP_SECONDS - 60
    for p in leftovers:
        os.utime(p, (old, old))
    fresh = root / "tmp" / "in-flight.tmp"
    fresh.write_bytes(b"another writer's file")
    CasDir(root)
    assert files_under(root / "tmp") == [fresh]


def test_stage_then_publish(cas: CasDir) -> None:
    data = compressible(400_000, seed=3)
    d = Digest.of(data)
    staged = cas.stage_encoded(d, *framing.encode(data))
    assert staged is not None
    assert not cas.has(d)  # staged is neither visible nor trusted
    assert files_under(cas.root / "tmp") == [Path(staged.tmp)]
    again = cas.stage_encoded(d, framing.IDENTITY, data)
    assert again is not None
    assert cas.publish([staged, again]) == [True, False]  # the second copy is dropped
    assert cas.read(d) == data
    assert files_under(cas.root / "tmp") == []
    assert cas.stage_encoded(d, framing.IDENTITY, data) is None  # already stored
    assert cas.publish([]) == []
