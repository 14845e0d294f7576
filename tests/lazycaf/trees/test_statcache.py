"""Tests for lazycaf.trees.statcache: the per-tree stat cache that lets a pack skip re-hashing."""

from __future__ import annotations

import marshal
import os
import struct
import time
from pathlib import Path

import pytest

from lazycaf.core.digest import Digest
from lazycaf.trees.statcache import StatCache, StatKey
from tests.helpers import wait_for

CS = 64 << 10
OLD_NS = 1_600_000_000 * 10**9  # September 2020: far from racy


def D(tag: str) -> Digest:
    return Digest.of(tag.encode())


def key_of(path: Path) -> StatKey:
    st = path.stat()
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


def make(path: Path, data: bytes, mtime_ns: int = OLD_NS) -> StatKey:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, ns=(mtime_ns, mtime_ns))
    return key_of(path)


def synthetic(mtime_ns: int = OLD_NS, size: int = 10) -> StatKey:
    return (size, mtime_ns, mtime_ns + 5, 1234, 56)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    root.mkdir()
    return root


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "state" / "pack-stat"  # does not exist yet


def test_for_tree_names_one_file_per_root_and_chunk_size(tree: Path, cache_dir: Path) -> None:
    a = StatCache.for_tree(cache_dir, tree, CS)
    assert a.path.parent == cache_dir
    assert a.path.suffix == ".stat"
    assert StatCache.for_tree(cache_dir, tree / "sub" / "..", CS).path == a.path
    assert StatCache.for_tree(cache_dir, tree, 2 * CS).path != a.path
    assert StatCache.for_tree(cache_dir, tree.parent, CS).path != a.path


def test_unchanged_file_keeps_its_digests_across_save_and_reload(
    tree: Path, cache_dir: Path
) -> None:
    small = make(tree / "small", b"abc")
    big = make(tree / "dir" / "big", b"x" * (CS + 1))
    cache = StatCache.for_tree(cache_dir, tree, CS)
    assert cache.lookup("small", small) is None  # nothing saved yet
    cache.record("small", small, D("small"), ())
    cache.record("dir/big", big, D("big"), (D("big#0"), D("big#1")))
    cache.save()

    again = StatCache.for_tree(cache_dir, tree, CS)
    assert again.lookup("small", key_of(tree / "small")) == (D("small").raw, b"")
    assert again.lookup("dir/big", key_of(tree / "dir" / "big")) == (
        D("big").raw,
        D("big#0").raw + D("big#1").raw,
    )
    assert again.hits == 2
    assert again.lookup("missing", small) is None
    assert again.hits == 2


@pytest.mark.parametrize(
    ("field", "name"), [(0, "size"), (1, "mtime"), (2, "ctime"), (3, "inode"), (4, "device")]
)
def test_a_changed_stat_field_misses(cache_dir: Path, tree: Path, field: int, name: str) -> None:
    key = synthetic()
    cache = StatCache.for_tree(cache_dir, tree, CS)
    cache.record("f", key, D("f"), ())
    cache.save()
    changed = list(key)
    changed[field] -= 1  # earlier, never racy
    again = StatCache.for_tree(cache_dir, tree, CS)
    assert again.lookup("f", tuple(changed)) is None, name  # type: ignore[arg-type]
    assert again.hits == 0
    assert again.lookup("f", key) == (D("f").raw, b"")


def test_rewriting_a_file_with_the_same_size_and_mtime_misses(tree: Path, cache_dir: Path) -> None:
    key = make(tree / "f", b"one")
    cache = StatCache.for_tree(cache_dir, tree, CS)
    cache.record("f", key, D("one"), ())
    cache.save()

    def rewritten() -> StatKey | None:
        changed = make(tree / "f", b"two")  # same size, mtime restored: only ctime tells
        return changed if changed != key else None  # the ctime clock has not ticked yet

    changed = wait_for(rewritten, "a rewrite that moves the file's ctime")
    assert changed[:2] == key[:2]
    assert StatCache.for_tree(cache_dir, tree, CS).lookup("f", changed) is None


def test_files_modified_just_before_the_save_are_not_trusted(tree: Path, cache_dir: Path) -> None:
    now = time.time_ns()
    racy = synthetic(now - 500_000_000)  # 0.5 s before the save
    racy_edge = synthetic(now - 1_500_000_000)  # 1.5 s before the save
    future = synthetic(now + 60 * 10**9)  # the clock went backwards, or a touch -d
    settled = synthetic(now - 10 * 10**9)  # 10 s before the save
    cache = StatCache.for_tree(cache_dir, tree, CS)
    for name, key in [("racy", racy), ("edge", racy_edge), ("future", future), ("ok", settled)]:
        cache.record(name, key, D(name), ())
    cache.save()

    again = StatCache.for_tree(cache_dir, tree, CS)
    assert again.lookup("racy", racy) is None
    assert again.lookup("edge", racy_edge) is None
    assert again.lookup("future", future) is None
    assert again.lookup("ok", settled) == (D("ok").raw, b"")


def test_a_freshly_written_file_is_not_trusted(tree: Path, cache_dir: Path) -> None:
    (tree / "new").write_bytes(b"just now")
    key = key_of(tree / "new")
    cache = StatCache.for_tree(cache_dir, tree, CS)
    cache.record("new", key, D("new"), ())
    cache.save()
    assert StatCache.for_tree(cache_dir, tree, CS).lookup("new", key) is None


def test_missing_file_gives_an_empty_cache(tree: Path, cache_dir: Path) -> None:
    cache = StatCache.for_tree(cache_dir, tree, CS)
    assert not cache.path.exists()
    assert cache.lookup("f", synthetic()) is None
    assert cache.hits == 0


MAGIC = b"LZCAFSTAT4\n"
MAGIC_V3 = b"LZCAFSTAT3\n"  # the format before: a dict of records, read into columns
KEY = struct.Struct("<QqqQQ")


def body(saved_ns: object, files: object, last: object = None) -> bytes:
    """A file of the format before (``{path: (key, digest, chunks)}``)."""
    return MAGIC_V3 + marshal.dumps((saved_ns, files, last))


def columns(saved_ns: object, *cols: object, last: object = None) -> bytes:
    return MAGIC + marshal.dumps((saved_ns, *cols, last))


def saved(path: Path) -> tuple[int, dict[str, tuple[StatKey, bytes, bytes]]]:
    """The saved records, read from their columns, in the file's order."""
    data = path.read_bytes()
    assert data.startswith(MAGIC)
    saved_ns, paths, keys, digests, lengths_b, chunks, _ = marshal.loads(data[len(MAGIC) :])
    lengths = struct.unpack(f"<{len(lengths_b) // 8}Q", lengths_b)
    files: dict[str, tuple[StatKey, bytes, bytes]] = {}
    at = 0
    for i, p in enumerate(paths.split("\0") if paths else []):
        key = KEY.unpack_from(keys, 40 * i)
        files[p] = (key, digests[32 * i : 32 * i + 32], chunks[at : at + lengths[i]])
        at += lengths[i]
    assert len(files) == len(lengths) and at == len(chunks)
    return saved_ns, files


def test_the_last_pack_is_remembered_and_a_previous_versions_file_still_read(
    tree: Path, cache_dir: Path
) -> None:
    cache = StatCache.for_tree(cache_dir, tree, CS)
    cache.record("f", synthetic(), D("f"), ())
    cache.save()  # a pack that set no ref
    assert StatCache.for_tree(cache_dir, tree, CS).last_pack is None
    cache.remember_pack("/store", "app:1", D("manifest"))
    cache.save()
    again = StatCache.for_tree(cache_dir, tree, CS)
    assert again.last_pack == ("/store", "app:1", D("manifest"))
    assert again.lookup("f", synthetic()) == (D("f").raw, b"")
    saved_ns, files = saved(cache.path)
    cache.path.write_bytes(body(saved_ns, files, ("/store", "app:1", D("manifest").raw)))
    v3 = StatCache.for_tree(cache_dir, tree, CS)  # the format before: a dict of records
    assert v3.lookup("f", synthetic()) == (D("f").raw, b"")
    assert v3.last_pack == ("/store", "app:1", D("manifest"))
    cache.path.write_bytes(b"LZCAFSTAT2\n" + marshal.dumps((saved_ns, files)))
    v2 = StatCache.for_tree(cache_dir, tree, CS)  # the one before: no last pack
    assert v2.lookup("f", synthetic()) == (D("f").raw, b"") and v2.last_pack is None
    for last in [("/store", "app:1", b"short"), ("/store", 1, D("m").raw), "x", (1, 2)]:
        cache.path.write_bytes(body(saved_ns, files, last))
        odd = StatCache.for_tree(cache_dir, tree, CS)
        assert odd.last_pack is None and odd.lookup("f", synthetic()) == (D("f").raw, b"")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"garbage",
        b"\xff\xfe\x00",
        b'{"v": 1, "saved_ns": 0, "files": {}}',  # the JSON of earlier versions
        MAGIC,
        MAGIC + b"\x00\x01",
        MAGIC + marshal.dumps(None),
        MAGIC + marshal.dumps((1, 2, 3)),
        body("soon", {}),
        body(time.time_ns(), [1, 2]),
        MAGIC_V3 + marshal.dumps(None),
        MAGIC_V3 + marshal.dumps((1,)),
        b"LZCAFSTAT2\n" + marshal.dumps((1, 2, 3)),
        columns(time.time_ns(), "f", KEY.pack(*synthetic()), D("f").raw, b"\0" * 8, b"x"),
        columns(time.time_ns(), "f", KEY.pack(*synthetic()), b"short", b"\0" * 8, b""),
        columns(time.time_ns(), "f\0g", KEY.pack(*synthetic()), D("f").raw, b"\0" * 8, b""),
        columns(time.time_ns(), "f", KEY.pack(*synthetic()), D("f").raw, b"\0" * 7, b""),
        columns(time.time_ns(), b"f", KEY.pack(*synthetic()), D("f").raw, b"\0" * 8, b""),
        columns(time.time_ns(), "f", KEY.pack(*synthetic()), D("f").raw, b"\0" * 8),
    ],
)
def test_corrupt_file_gives_an_empty_cache(tree: Path, cache_dir: Path, data: bytes) -> None:
    cache = StatCache.for_tree(cache_dir, tree, CS)
    cache.record("f", synthetic(), D("f"), ())
    cache.save()
    cache.path.write_bytes(data)
    broken = StatCache.for_tree(cache_dir, tree, CS)
    assert broken.lookup("f", synthetic()) is None
    broken.record("g", synthetic(), D("g"), ())
    broken.save()  # a corrupt cache is simply replaced
    assert StatCache.for_tree(cache_dir, tree, CS).lookup("g", synthetic()) == (D("g").raw, b"")


def test_a_record_that_does_not_parse_misses(tree: Path, cache_dir: Path) -> None:
    cache = StatCache.for_tree(cache_dir, tree, CS)
    cache.record("f", synthetic(), D("f"), (D("c0"),))
    cache.save()
    saved_ns, files = saved(cache.path)
    files["f"] = (synthetic(), b"short", b"")
    files["g"] = (synthetic(), D("g").raw, b"not 32 bytes")
    files["h"] = (synthetic(), D("h").hex, b"")  # hex where raw bytes belong
    cache.path.write_bytes(body(saved_ns, files))
    again = StatCache.for_tree(cache_dir, tree, CS)
    assert again.lookup("f", synthetic()) is None
    assert again.lookup("g", synthetic()) is None
    assert again.lookup("h", synthetic()) is None
    assert again.hits == 0


@pytest.mark.parametrize("record", [5, (), (synthetic(),), "f", None])
def test_a_structurally_wrong_record_misses(tree: Path, cache_dir: Path, record: object) -> None:
    # A readable file of the right version whose records have the wrong shape: a miss for
    # that file rather than an exception out of lookup().
    cache = StatCache.for_tree(cache_dir, tree, CS)
    cache.path.parent.mkdir(parents=True)
    cache.path.write_bytes(body(time.time_ns(), {"f": record}))
    broken = StatCache.for_tree(cache_dir, tree, CS)
    assert broken.lookup("f", synthetic()) is None


def test_the_json_file_of_earlier_versions_is_removed_on_save(tree: Path, cache_dir: Path) -> None:
    cache = StatCache.for_tree(cache_dir, tree, CS)
    cache_dir.mkdir(parents=True)
    old = cache.path.with_suffix(".json")
    old.write_text('{"v": 1, "saved_ns": 0, "files": {}}')
    cache.record("f", synthetic(), D("f"), ())
    cache.save()
    assert os.listdir(cache_dir) == [cache.path.name]


def test_save_is_atomic_and_leaves_no_temp_files(tree: Path, cache_dir: Path) -> None:
    cache = StatCache.for_tree(cache_dir, tree, CS)
    cache.record("f", synthetic(), D("f"), ())
    cache.save()
    cache.save()
    assert os.listdir(cache_dir) == [cache.path.name]
    assert set(saved(cache.path)[1]) == {"f"}


def test_a_failed_save_leaves_the_old_state_and_no_temp_file(tree: Path, cache_dir: Path) -> None:
    cache = StatCache.for_tree(cache_dir, tree, CS)
    cache.path.mkdir(parents=True)  # os.replace onto a non-empty directory fails
    (cache.path / "keep").write_bytes(b"")
    cache.record("f", synthetic(), D("f"), ())
    with pytest.raises(OSError):
        cache.save()
    assert os.listdir(cache_dir) == [cache.path.name]
    assert os.listdir(cache.path) == ["keep"]


def test_files_not_seen_by_the_latest_pack_are_dropped(tree: Path, cache_dir: Path) -> None:
    a, b, c = synthetic(size=1), synthetic(size=2), synthetic(size=3)
    first = StatCache.for_tree(cache_dir, tree, CS)
    first.record("a", a, D("a"), ())
    first.record("b", b, D("b"), ())
    first.save()

    second = StatCache.for_tree(cache_dir, tree, CS)
    assert second.lookup("a", a) == (D("a").raw, b"")  # a hit counts as seen
    second.record("c", c, D("c"), ())  # b was deleted from the tree
    second.save()

    third = StatCache.for_tree(cache_dir, tree, CS)
    assert third.lookup("a", a) == (D("a").raw, b"")
    assert third.lookup("c", c) == (D("c").raw, b"")
    assert third.lookup("b", b) is None
    assert set(saved(third.path)[1]) == {"a", "c"}


def test_records_are_saved_in_lookup_order_and_found_out_of_it(tree: Path, cache_dir: Path) -> None:
    """A walk finds each record where the last one left it; a record elsewhere (a file moved,
    one recorded after the walk) is still found, and the save follows the lookups."""
    names = [f"m{i:02d}" for i in range(20)]
    first = StatCache.for_tree(cache_dir, tree, CS)
    for name in reversed(names):  # recorded in another order than the walk's
        first.record(name, synthetic(), D(name), (D(name + "#0"),) if name == "m07" else ())
    first.save()

    second = StatCache.for_tree(cache_dir, tree, CS)
    order = [*names[10:], *names[:10]]  # a walk of another order
    for name in order:
        if name == "m03":  # changed since: hashed again and recorded
            assert second.lookup(name, synthetic(size=99)) is None
            second.record(name, synthetic(size=99), D("m03 new"), ())
            continue
        chunks = D(name + "#0").raw if name == "m07" else b""
        assert second.lookup(name, synthetic()) == (D(name).raw, chunks), name
    second.record("zz", synthetic(), D("zz"), ())  # never looked up: saved last
    second.save()
    _, files = saved(second.path)
    assert list(files) == [*order, "zz"]
    assert files["m03"] == (synthetic(size=99), D("m03 new").raw, b"")
    assert files["m07"] == (synthetic(), D("m07").raw, D("m07#0").raw)

    third = StatCache.for_tree(cache_dir, tree, CS)
    assert [third.lookup(n, synthetic()) for n in ["m12", "zz"]] == [
        (D("m12").raw, b""),
        (D("zz").raw, b""),
    ]
    assert third.lookup("m03", synthetic(size=99)) == (D("m03 new").raw, b"")
    assert third.lookup("m03", synthetic()) is None and third.hits == 3
