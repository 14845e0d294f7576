"""lazycaf.trees.pack in process: the digests it gives, what it asks the store and when, what
it uploads, and a tree that changes under it. The CLI's view is tests/lazycaf/cli/test_pack.py.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio

from lazycaf.cas.local import LocalCAS
from lazycaf.core.chunking import chunk_spans
from lazycaf.core.digest import Digest
from lazycaf.core.errors import PackError, first_error
from lazycaf.core.manifest import FILE, HARDLINK, Manifest
from lazycaf.trees import pack as packmod
from lazycaf.trees.pack import pack
from lazycaf.trees.statcache import StatCache, StatKey
from tests.helpers import make_tree

CS = 64 << 10
OLD_NS = 1_600_000_000 * 10**9  # far from racy


class RecordingCAS(LocalCAS):
    """A local CAS that logs every find_missing, put_many and put, in order."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.log: list[tuple[str, list[Digest]]] = []

    async def find_missing(self, digests: Sequence[Digest]) -> set[Digest]:
        missing = await super().find_missing(digests)
        self.log.append(("find_missing", list(digests)))
        self.log.append(("missing", sorted(missing)))
        return missing

    async def put_many(self, items: Sequence[tuple[Digest, bytes]]) -> int:
        self.log.append(("put_many", [d for d, _ in items]))
        return await super().put_many(items)

    async def put(self, digest: Digest, data: bytes) -> bool:
        self.log.append(("put", [digest]))
        return await super().put(digest, data)

    def calls(self, name: str) -> list[list[Digest]]:
        return [ds for n, ds in self.log if n == name]


async def pack_error(tree: Path, cas: LocalCAS, **kw: object) -> str:
    """The message of the ``PackError`` packing ``tree`` fails with."""
    try:
        await pack(tree, cas, chunk_size=CS, **kw)  # type: ignore[arg-type]
    except BaseException as exc:  # a nursery's group around it
        err = first_error(exc)
        assert isinstance(err, PackError), repr(exc)
        return str(err)
    raise AssertionError("pack did not fail")


def expected_blobs(root: Path, manifest: Manifest) -> set[Digest]:
    """Every blob of the tree, hashed here independently of pack."""
    out = set()
    for e in manifest.entries:
        if e.kind != FILE:
            continue
        data = (root / e.path).read_bytes()
        assert e.digest == Digest.of(data), e.path
        for off, n in chunk_spans(len(data), CS):
            out.add(Digest.of(data[off : off + n]))
    return out


def big_tree(root: Path, *, big: int = 40 * CS + 5) -> Path:
    make_tree(root)
    (root / "lib/big.bin").write_bytes(os.urandom(big))  # streamed once the job cap is low
    (root / "lib/dup-a").write_bytes(b"same bytes\n")
    (root / "lib/dup-b").write_bytes(b"same bytes\n")
    for i in range(30):
        (root / "lib/pkg" / f"m{i}.py").write_text(f"value = {i}\n" * (i + 1))
    return root


@pytest.fixture
def small_jobs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small caps, so that a small tree makes several hash jobs, streams a file and sends
    several upload batches."""
    monkeypatch.setattr(packmod, "_HASH_BATCH_BYTES", 8 * CS)
    monkeypatch.setattr(packmod, "_HASH_BATCH_FILES", 7)
    monkeypatch.setattr(packmod, "_UPLOAD_BATCH_BLOBS", 5)
    monkeypatch.setattr(packmod, "_UPLOAD_BATCH_BYTES", 4 * CS)


@pytest.mark.usefixtures("small_jobs")
async def test_digests_and_uploads_are_exact(tmp_path: Path) -> None:
    tree = big_tree(tmp_path / "tree")
    cas = RecordingCAS(tmp_path / "cas")
    result = await pack(tree, cas, chunk_size=CS)
    blobs = expected_blobs(tree, result.manifest)
    big = result.manifest.get("lib/big.bin")
    assert big is not None and len(big.chunks) == 41
    put = [d for ds in cas.calls("put_many") for d in ds]
    assert sorted(put) == sorted(blobs)  # each blob once, duplicates included once
    asked = [d for ds in cas.calls("find_missing") for d in ds]
    assert sorted(asked) == sorted(blobs)  # each digest asked about once
    assert len(cas.calls("put_many")) > 1 and len(cas.calls("find_missing")) > 1
    assert cas.log[-1] == ("put", [result.digest])  # the manifest last
    assert Digest.of(result.manifest.encode()) == result.digest
    p = result.progress
    assert (p.blobs, p.blobs_missing, p.blobs_uploaded) == (len(blobs),) * 3
    assert p.files_hashed == p.files - 2 and p.bytes_hashed == p.bytes_total - 2 * 6  # links


@pytest.mark.usefixtures("small_jobs")
async def test_only_blobs_reported_missing_are_uploaded_and_asked_first(tmp_path: Path) -> None:
    tree = big_tree(tmp_path / "tree")
    cas = RecordingCAS(tmp_path / "cas")
    first = await pack(tree, cas, chunk_size=CS)
    (tree / "lib/pkg/m3.py").write_text("changed\n")
    data = bytearray((tree / "lib/big.bin").read_bytes())
    data[7 * CS + 10 : 7 * CS + 19] = b"new bytes"
    (tree / "lib/big.bin").write_bytes(data)
    cas.log.clear()
    second = await pack(tree, cas, chunk_size=CS)
    assert second.digest != first.digest
    put = [d for ds in cas.calls("put_many") for d in ds]
    big = second.manifest.get("lib/big.bin")
    m3 = second.manifest.get("lib/pkg/m3.py")
    assert big is not None and m3 is not None
    assert m3.digest is not None
    assert sorted(put) == sorted([big.chunks[7], m3.digest])
    reported: set[Digest] = set()
    for name, ds in cas.log:  # every blob put was reported missing before it was put
        if name == "missing":
            reported.update(ds)
        elif name == "put_many":
            assert set(ds) <= reported


async def test_same_digest_as_a_copy_and_with_a_warm_stat_cache(tmp_path: Path) -> None:
    tree = big_tree(tmp_path / "tree", big=3 * (1 << 20) + 1)
    cas = RecordingCAS(tmp_path / "cas")
    state = tmp_path / "state"
    a = await pack(tree, cas, stat_cache_dir=state)
    b = await pack(tree, cas, stat_cache_dir=state)  # everything from the stat cache
    assert b.progress.files_hashed == b.progress.files - 2 and b.digest == a.digest
    assert b.progress.bytes_hashed == b.progress.bytes_total - 2 * 6
    c = await pack(tree, cas)
    assert c.digest == a.digest


async def test_stat_cache_hits_the_store_lost_are_read_back(tmp_path: Path) -> None:
    tree = big_tree(tmp_path / "tree")
    state = tmp_path / "state"
    first = await pack(tree, LocalCAS(tmp_path / "cas1"), chunk_size=CS, stat_cache_dir=state)
    fresh = RecordingCAS(tmp_path / "cas2")  # knows nothing: every blob read back
    again = await pack(tree, fresh, chunk_size=CS, stat_cache_dir=state)
    assert again.digest == first.digest
    put = [d for ds in fresh.calls("put_many") for d in ds]
    assert sorted(put) == sorted(expected_blobs(tree, again.manifest))
    for d in put:
        assert Digest.of(await fresh.get(d)) == d


def old_mtimes(tree: Path) -> None:
    """Mtimes far in the past: the stat cache trusts the files (none is racy)."""
    for dirpath, _, names in os.walk(tree):
        for name in names:
            os.utime(Path(dirpath, name), ns=(OLD_NS, OLD_NS), follow_symlinks=False)


def blob_mtimes(cas_root: Path) -> dict[str, int]:
    return {
        n.removesuffix(".zst"): os.stat(Path(d, n)).st_mtime_ns
        for d, _, names in os.walk(cas_root / "blobs")
        for n in names
    }


async def test_a_repack_asks_only_about_new_blobs_while_the_last_packs_ref_stands(
    tmp_path: Path,
) -> None:
    tree = big_tree(tmp_path / "tree")
    old_mtimes(tree)
    state, store = tmp_path / "state", tmp_path / "cas"
    first = await pack(tree, LocalCAS(store), chunk_size=CS, stat_cache_dir=state, tag="app:1")
    for path in (store / "blobs").rglob("*"):  # blobs stored long ago
        if path.is_file():
            os.utime(path, ns=(OLD_NS, OLD_NS))
    before = blob_mtimes(store)
    edited = tree / "lib/pkg/m7.py"
    edited.write_text("value = 'edited'\n")
    cas = RecordingCAS(store)
    again = await pack(tree, cas, chunk_size=CS, stat_cache_dir=state, tag="app:2")
    asked = {d for ds in cas.calls("find_missing") for d in ds}
    assert asked == {Digest.of(edited.read_bytes())}  # not the 40-odd blobs app:1 holds
    assert again.digest == (await pack(tree, LocalCAS(tmp_path / "fresh"), chunk_size=CS)).digest
    assert again.progress.blobs == len(expected_blobs(tree, again.manifest))
    after = blob_mtimes(store)
    # the blobs app:1 and app:2 both list are roots' blobs: not refreshed one by one; new:
    # the edited file's blob and the manifest
    assert {h: after[h] for h in before} == before and len(after) == len(before) + 2
    assert first.digest != again.digest


@pytest.mark.parametrize("ref_then", ["moved", "removed"])
async def test_a_repack_asks_about_every_blob_once_the_last_packs_ref_moved(
    tmp_path: Path, ref_then: str
) -> None:
    tree = big_tree(tmp_path / "tree")
    old_mtimes(tree)
    state, store = tmp_path / "state", tmp_path / "cas"
    await pack(tree, LocalCAS(store), chunk_size=CS, stat_cache_dir=state, tag="app:1")
    cas = RecordingCAS(store)
    if ref_then == "moved":
        other = await pack(tree / "lib/pkg", cas, chunk_size=CS)
        await cas.set_ref("app:1", other.digest)
    else:
        await cas.delete_ref("app:1")
    cas.log.clear()
    again = await pack(tree, cas, chunk_size=CS, stat_cache_dir=state, tag="app:2")
    asked = {d for ds in cas.calls("find_missing") for d in ds}
    assert asked == expected_blobs(tree, again.manifest)


async def test_a_repack_whose_last_ref_moves_meanwhile_asks_before_its_manifest_goes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ref that vouched for the known blobs is removed while the pack runs: before the
    manifest is stored they are asked about after all (and refreshed for the store GC)."""
    from lazycaf.cas.casdir import CasDir

    tree = big_tree(tmp_path / "tree")
    old_mtimes(tree)
    state, store = tmp_path / "state", tmp_path / "cas"
    await pack(tree, LocalCAS(store), chunk_size=CS, stat_cache_dir=state, tag="app:1")
    build = packmod._build_and_encode

    def build_after_a_ref_rm(*args: object) -> object:
        CasDir(store).delete_ref("app:1")  # another user's `ref rm`, mid-pack
        return build(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(packmod, "_build_and_encode", build_after_a_ref_rm)
    (tree / "lib/pkg/m7.py").write_text("value = 'edited'\n")
    cas = RecordingCAS(store)
    again = await pack(tree, cas, chunk_size=CS, stat_cache_dir=state, tag="app:2")
    asked = [d for ds in cas.calls("find_missing") for d in ds]
    assert set(asked) == expected_blobs(tree, again.manifest)
    first_put = next(i for i, (name, _) in enumerate(cas.log) if name == "put")
    last_ask = max(i for i, (name, _) in enumerate(cas.log) if name == "find_missing")
    assert last_ask < first_put  # asked before the manifest went
    assert again.progress.blobs == len(expected_blobs(tree, again.manifest))


async def test_a_file_changed_since_the_stat_cache_is_refused_not_stored(tmp_path: Path) -> None:
    tree = big_tree(tmp_path / "tree")
    for dirpath, _, names in os.walk(tree):  # old mtimes: the stat cache trusts them
        for name in names:
            os.utime(Path(dirpath, name), ns=(OLD_NS, OLD_NS), follow_symlinks=False)
    state = tmp_path / "state"
    await pack(tree, LocalCAS(tmp_path / "cas1"), chunk_size=CS, stat_cache_dir=state)
    target = tree / "lib/pkg/m5.py"
    st = target.stat()
    target.write_text("value = 5\n" * 5 + "value = 6\n")  # same size, mtime kept below
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    ctime_kept = StatCache.find

    def find(self: StatCache, rel: str, key: StatKey) -> object:
        return ctime_kept(self, rel, (key[0], key[1], st.st_ctime_ns, key[3], key[4]))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(StatCache, "find_run", lambda *_: None)  # file by file
        mp.setattr(StatCache, "find", find)
        cas2 = tmp_path / "cas2"
        message = await pack_error(tree, LocalCAS(cas2), stat_cache_dir=state)
    assert "m5.py changed while packing" in message
    stored = {n.removesuffix(".zst") for _, _, ns in os.walk(cas2 / "blobs") for n in ns}
    assert Digest.of(target.read_bytes()).hex not in stored


@pytest.mark.parametrize("grow", [True, False])
async def test_a_file_that_changes_size_is_a_pack_error(tmp_path: Path, grow: bool) -> None:
    tree = tmp_path / "t"
    tree.mkdir()
    (tree / "f").write_bytes(b"x" * 100)
    original = packmod.walk_tree

    def scan_then_change(root: Path, **kw: object) -> object:
        out = original(root, **kw)  # type: ignore[arg-type]
        (tree / "f").write_bytes(b"x" * (150 if grow else 50))
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(packmod, "walk_tree", scan_then_change)
        message = await pack_error(tree, LocalCAS(tmp_path / "cas"))
    assert "changed size while packing" in message
    assert list((tmp_path / "cas" / "refs").iterdir()) == []


async def test_a_file_gone_while_read_ahead_fails_the_pack_and_leaves_no_descriptor_open(
    tmp_path: Path,
) -> None:
    """A hash job opens its files ahead of the one it reads (``ReadAhead``): one removed
    after the walk fails the pack with its path, and every file opened ahead is closed."""
    tree = tmp_path / "t"
    tree.mkdir()
    for i in range(60):
        (tree / f"m{i:02d}.py").write_bytes(b"x = %d\n" % i * 50)
    original = packmod.walk_tree

    def scan_then_remove(root: Path, **kw: object) -> object:
        out = original(root, **kw)  # type: ignore[arg-type]
        (tree / "m40.py").unlink()
        return out

    before = set(os.listdir("/proc/self/fd"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(packmod, "walk_tree", scan_then_remove)
        message = await pack_error(tree, LocalCAS(tmp_path / "cas"))
    assert "m40.py" in message and "cannot read" in message
    assert set(os.listdir("/proc/self/fd")) <= before
    assert list((tmp_path / "cas" / "refs").iterdir()) == []


async def test_hashing_runs_in_threads_not_on_the_event_loop(tmp_path: Path) -> None:
    tree = big_tree(tmp_path / "tree")
    seen: list[str] = []
    original = packmod.hash_small

    def spy(root: str, rel: str, size: int, fd: int | None = None) -> object:
        seen.append(threading.current_thread().name)
        return original(root, rel, size, fd)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(packmod, "hash_small", spy)
        await pack(tree, LocalCAS(tmp_path / "cas"), chunk_size=CS)
    assert seen and "MainThread" not in seen


async def test_names_that_sort_below_a_slash_come_out_in_manifest_order(tmp_path: Path) -> None:
    """A directory's contents come after its siblings that sort below ``name/`` (``a.y``
    before ``a/x``: "." < "/"), and ``x.y``'s before ``x``'s though ``x`` sorts first; the
    first path of a hard-link group in manifest order is the file, the others link to it."""
    tree = tmp_path / "t"
    for rel in ("a/x", "a/b/c", "a-1/z", "a0", "b/a", "x/1", "x.y/2", "x!/3", "x.y.z", "x/0/d/e"):
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text(rel)
    os.link(tree / "a/x", tree / "a.y")  # the walk meets a/x first, the manifest a.y
    os.symlink("a/x", tree / "a-l")
    walked = packmod.walk_tree(tree).paths
    expected = sorted(str(p.relative_to(tree)) for p in tree.rglob("*"))
    assert walked == expected and walked.index("a.y") < walked.index("a/x")
    result = await pack(tree, LocalCAS(tmp_path / "cas"), chunk_size=CS)
    file, link = result.manifest.get("a.y"), result.manifest.get("a/x")
    assert file is not None and file.kind == FILE
    assert link is not None and link.kind == HARDLINK and link.target == "a.y"
    assert [e.path for e in result.manifest] == expected


@pytest.mark.usefixtures("small_jobs")
def test_hash_jobs_hold_every_file_once_big_ones_biggest_first_among_the_small() -> None:
    """Big files go alone, biggest first, spread among the small files' batches (which keep
    path order), so neither kind's work is left to run alone at the end."""
    cap = packmod._HASH_BATCH_BYTES
    files = [
        packmod.Scanned(f"f{i:03d}", FILE, 0o644, 0, cap + 1 + (i * 7919) % 50 * CS)
        if i % 10 == 0
        else packmod.Scanned(f"f{i:03d}", FILE, 0o644, 0, 100 + i)
        for i in range(300)
    ]
    jobs = list(packmod._jobs(files, CS))
    assert sorted(s for job in jobs for s in job) == files  # each file once
    big = [i for i, job in enumerate(jobs) if job[0].size > cap]
    assert all(len(jobs[i]) == 1 for i in big) and len(big) == 30
    sizes = [jobs[i][0].size for i in big]
    assert sizes == sorted(sizes, reverse=True)
    small = [s.path for job in jobs if job[0].size <= cap for s in job]
    assert small == sorted(small) and all(len(job) <= 7 for job in jobs)
    assert big[0] < len(jobs) // 4 and big[-1] > len(jobs) * 3 // 4  # spread, not bunched


class _CountingCAS(LocalCAS):
    """A local CAS that counts the ``put_many`` batches in flight at once."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.in_flight = self.most = 0

    async def put_many(self, items: Sequence[tuple[Digest, bytes]]) -> int:
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            await trio.sleep(0.02)  # room for another batch to start, were it allowed
            return await super().put_many(items)
        finally:
            self.in_flight -= 1


@pytest.mark.parametrize(("batches", "most"), [(None, 1), (4, 4)])
async def test_a_local_store_takes_one_upload_batch_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, batches: int | None, most: int
) -> None:
    """A local store's writes are Python and short system calls: batches written by threads
    side by side only trade the GIL, so a pack keeps one in flight (``upload_batches``);
    a store that allows more gets up to four."""
    monkeypatch.setattr(packmod, "_UPLOAD_BATCH_BLOBS", 4)
    tree = tmp_path / "t"
    tree.mkdir()
    for i in range(64):
        (tree / f"m{i:02d}.py").write_bytes(b"x = %d\n" % i)
    cas = _CountingCAS(tmp_path / "cas")
    if batches is not None:
        monkeypatch.setattr(cas, "upload_batches", batches, raising=False)
    await pack(tree, cas, chunk_size=CS)
    assert cas.most == most
    assert len([p for p in (tmp_path / "cas" / "blobs").rglob("*") if p.is_file()]) == 65
