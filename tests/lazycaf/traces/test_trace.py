"""Tests for lazycaf.traces.trace: access records, traces, profiles, hot sets and prefetch plans."""

from __future__ import annotations

import json

import pytest

from lazycaf.core.chunking import chunk_count
from lazycaf.core.digest import Digest
from lazycaf.core.errors import IntegrityError
from lazycaf.core.manifest import DIR, FILE, HARDLINK, SYMLINK, Entry, Manifest
from lazycaf.traces.trace import (
    MAX_RUNS,
    AccessRecord,
    HotFile,
    Profile,
    Trace,
    TraceRecorder,
    plan_prefetch,
)

CS = 64 << 10


# -- builders --------------------------------------------------------------------------------
def D(tag: str) -> Digest:
    return Digest.of(tag.encode())


def d(path: str) -> Entry:
    return Entry(path, DIR, 0o755, 1_000, 0)


def f(path: str, size: int = 3, *, tag: str | None = None) -> Entry:
    tag = tag or path
    chunks = tuple(D(f"{tag}#{i}") for i in range(chunk_count(size, CS)))
    return Entry(path, FILE, 0o644, 2_000, size, D(tag), chunks)


def sl(path: str, target: str) -> Entry:
    return Entry(path, SYMLINK, 0o777, 3_000, len(target.encode()), target=target)


def hl(path: str, of: Entry) -> Entry:
    return of._replace(path=path, kind=HARDLINK, target=of.path)


def rec(path: str, t: float, nbytes: int = 1, chunks: set[int] | None = None) -> AccessRecord:
    return AccessRecord(path, t, nbytes, "cache", 0.0, D(path).hex, chunks or set())


def run(*records: AccessRecord, started: float = 0.0) -> Trace:
    return Trace("trainer", started, list(records))


def profile(*runs: Trace) -> Profile:
    p = Profile("trainer")
    for r in runs:
        p.add(r)
    return p


def order(p: Profile) -> list[str]:
    return [h.path for h in p.hot_set()]


def hot(path: str, chunks: set[int] | None = None) -> HotFile:
    return HotFile(path, 0.0, 1.0, 1, frozenset(chunks or ()))


# -- JSON ------------------------------------------------------------------------------------
def test_access_record_round_trips_through_json() -> None:
    r = AccessRecord("lib/ü.so", 0.125, 4096, "fetch", 0.5, D("x").hex, {7, 2, 3})
    row = json.loads(json.dumps(r.to_json()))
    assert row[6] == [2, 3, 7]  # chunks are stored sorted
    assert AccessRecord.from_json(row) == r


def test_trace_round_trips_through_json() -> None:
    t = Trace("trainer", 1_700_000_000.5, [rec("a", 0.0, 10), rec("b", 1.5, 20, {0, 4})])
    t.records[1].wait = 0.25
    back = Trace.from_json(json.loads(json.dumps(t.to_json())))
    assert back == t
    assert back.wait_seconds() == 0.25


def test_chunk_first_read_times_round_trip_beside_rows_older_readers_still_read() -> None:
    lib = rec("lib", 0.5, 10, {0, 1, 5})
    lib.chunk_t = {0: 0.5, 1: 0.5, 5: 2.25}
    t = Trace("trainer", 0.0, [rec("a", 0.0), lib])
    obj = json.loads(json.dumps(t.to_json()))
    assert obj["chunk_t"] == {"1": [0, 0.5, 1, 0.5, 5, 2.25]}
    assert all(len(row) == 7 for row in obj["records"])  # the rows as before
    back = Trace.from_json(obj)
    assert back.records[1].chunk_t == lib.chunk_t and back.records[1].chunk_at(5) == 2.25
    del obj["chunk_t"]  # a trace written before chunk times: each chunk at its file's time
    assert Trace.from_json(obj).records[1].chunk_at(5) == 0.5


@pytest.mark.parametrize(
    "chunk_t",
    [[], {"2": [0, 1.0]}, {"x": [0, 1.0]}, {"1": [0]}, {"1": ["0", 1.0]}, {"1": [0, "1"]}],
)
def test_profile_with_bad_chunk_times_is_an_integrity_error(chunk_t: object) -> None:
    rows = [["a", 0.0, 1, "cache", 0.0, "", []], ["b", 0.0, 1, "cache", 0.0, "", [0, 1]]]
    body = {
        "version": 1,
        "name": "trainer",
        "runs": [{"executable": "x", "started": 0.0, "records": rows, "chunk_t": chunk_t}],
    }
    with pytest.raises(IntegrityError):
        Profile.decode(json.dumps(body).encode())


def test_profile_encoding_round_trips_and_is_canonical() -> None:
    p = profile(run(rec("a", 0.0)), run(rec("b", 2.0, 5, {1}), rec("a", 3.0), started=9.0))
    data = p.encode()
    back = Profile.decode(data)
    assert back == p
    assert back.encode() == data


BAD_ROWS: list[list[object]] = [
    [],
    ["p", 0.0, 1, "cache", 0.0, ""],  # too short
    ["p", 0.0, 1, "cache", 0.0, "", [], "extra"],
    [5, 0.0, 1, "cache", 0.0, "", []],  # path not a string
    ["p", "0", 1, "cache", 0.0, "", []],  # t not a number
    ["p", None, 1, "cache", 0.0, "", []],
    ["p", 0.0, 1.5, "cache", 0.0, "", []],  # bytes not an int
    ["p", 0.0, "1", "cache", 0.0, "", []],
    ["p", 0.0, 1, "disk", 0.0, "", []],  # unknown source
    ["p", 0.0, 1, "cache", "slow", "", []],  # wait not a number
    ["p", 0.0, 1, "cache", 0.0, "", {}],  # chunks not a list
    ["p", 0.0, 1, "cache", 0.0, "", [1, "2"]],  # a chunk not an int
]


@pytest.mark.parametrize("row", BAD_ROWS)
def test_bad_rows_are_refused(row: list[object]) -> None:
    with pytest.raises(ValueError):
        AccessRecord.from_json(row)


def _profile_json(records: object, **overrides: object) -> bytes:
    body: dict[str, object] = {
        "version": 1,
        "name": "trainer",
        "runs": [{"executable": "trainer", "started": 0.0, "records": records}],
    }
    body.update(overrides)
    return json.dumps(body).encode()


@pytest.mark.parametrize("row", BAD_ROWS)
def test_profile_with_a_bad_row_is_an_integrity_error(row: list[object]) -> None:
    good = ["q", 0.0, 1, "cache", 0.0, "", []]
    with pytest.raises(IntegrityError, match="not a valid profile"):
        Profile.decode(_profile_json([good, row]))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"garbage",
        b"\xff\xfe\xfd",
        b"null",
        b"[]",
        b"42",
        b'"profile"',
        b"{}",
        b'{"version": 1}',
        b'{"version": 1, "name": "x"}',
        b'{"version": 2, "name": "x", "runs": []}',
        b'{"version": 1, "name": "x", "runs": 5}',
        b'{"version": 1, "name": "x", "runs": [5]}',
        b'{"version": 1, "name": "x", "runs": [{}]}',
        _profile_json("not a list"),
        _profile_json([["p", 0.0, 1, "cache", 0.0, "", []]], runs=[{"records": []}]),
        b'{"version": 1, "name": "x", "runs": [{"executable": "e", "started": "noon",'
        b' "records": []}]}',
    ],
)
def test_decoding_garbage_is_an_integrity_error(data: bytes) -> None:
    with pytest.raises(IntegrityError, match=r"^cache blob is not a valid profile"):
        Profile.decode(data, what="cache blob")


def test_decoding_deeply_nested_garbage_is_an_integrity_error() -> None:
    # Any bytes under a profile ref are untrusted input; json.loads raises RecursionError
    # (not a ValueError) on deep nesting, which Profile.decode lets escape.
    with pytest.raises(IntegrityError):
        Profile.decode(b"[" * 100_000)


# -- profiles --------------------------------------------------------------------------------
def test_add_keeps_only_the_newest_runs() -> None:
    traces = [run(rec("a", 0.0), started=float(i)) for i in range(MAX_RUNS + 3)]
    p = profile(*traces)
    assert len(p.runs) == MAX_RUNS
    assert p.runs == traces[-MAX_RUNS:]
    assert [r.started for r in p.runs] == [float(i) for i in range(3, MAX_RUNS + 3)]


def test_empty_profile_has_an_empty_hot_set() -> None:
    assert Profile("trainer").hot_set() == []


def test_single_run_orders_by_first_access_time() -> None:
    p = profile(run(rec("c", 2.0), rec("a", 0.5), rec("b", 1.0)))
    assert order(p) == ["a", "b", "c"]
    assert all(h.share == 1.0 for h in p.hot_set())


def test_common_files_come_before_rare_ones() -> None:
    # Three runs weigh 0.36, 0.6 and 1 (newest). "new" is in the newest run only (share
    # 0.51); "old" is in the two older runs (share 0.49), so it is rare despite 2 of 3.
    p = profile(
        run(rec("old", 0.1), rec("always", 5.0), rec("once", 0.0)),
        run(rec("old", 0.1), rec("always", 5.0)),
        run(rec("always", 5.0), rec("new", 9.0)),
    )
    by_path = {h.path: h for h in p.hot_set()}
    assert by_path["always"].share == pytest.approx(1.0)
    assert by_path["new"].share == pytest.approx(1 / 1.96)
    assert by_path["old"].share == pytest.approx(0.96 / 1.96)
    assert by_path["once"].share == pytest.approx(0.36 / 1.96)
    assert order(p) == ["always", "new", "once", "old"]  # each group by time


def test_time_is_the_weighted_median_of_the_runs() -> None:
    # Three equal runs out of three: the plain median, not the mean or the newest.
    p = profile(run(rec("a", 1.0)), run(rec("a", 100.0)), run(rec("a", 2.0)))
    (h,) = p.hot_set()
    assert h.t == 2.0


def test_newer_runs_weigh_more() -> None:
    # "moved" was at 1 s in six runs, then at 9 s in the two newest: by count it is early,
    # by weight (1 + 0.6 against 0.86 for the six older) it follows the newest runs.
    old = [run(rec("moved", 1.0), rec("steady", 5.0)) for _ in range(MAX_RUNS - 2)]
    new = [run(rec("moved", 9.0), rec("steady", 5.0)) for _ in range(2)]
    p = profile(*old, *new)
    assert order(p) == ["steady", "moved"]
    assert p.hot_set()[1].t == 9.0
    # and the other way round: moved earlier in the newest runs
    old = [run(rec("moved", 9.0), rec("steady", 5.0)) for _ in range(MAX_RUNS - 2)]
    new = [run(rec("moved", 1.0), rec("steady", 5.0)) for _ in range(2)]
    assert order(profile(*old, *new)) == ["moved", "steady"]


def test_the_newest_run_decides_between_two_runs() -> None:
    assert order(profile(run(rec("a", 1.0), rec("b", 2.0)), run(rec("a", 3.0), rec("b", 2.0)))) == [
        "b",
        "a",
    ]


def test_hot_set_unions_chunks_and_keeps_the_most_bytes() -> None:
    p = profile(
        run(rec("big", 0.0, 100, {0, 1})),
        run(rec("big", 0.0, 300, {5})),
        run(rec("big", 0.0, 200, {1, 2})),
    )
    (h,) = p.hot_set()
    assert h.chunks == frozenset({0, 1, 2, 5})
    assert h.bytes_read == 300


def test_equal_times_tie_break_by_path() -> None:
    p = profile(run(rec("b", 1.0), rec("a", 1.0), rec("c", 1.0)))
    assert order(p) == ["a", "b", "c"]


# -- prefetch plans --------------------------------------------------------------------------
def test_plan_maps_hot_paths_to_the_current_manifest() -> None:
    v1 = Manifest([f("same", tag="same"), f("changed", tag="v1"), f("removed")], chunk_size=CS)
    v2 = Manifest([f("added"), f("changed", tag="v2"), f("same", tag="same")], chunk_size=CS)
    p = profile(run(rec("changed", 0.1), rec("removed", 0.2), rec("same", 0.3)))
    plan = plan_prefetch(p.hot_set(), v2.by_path, CS)
    assert plan == [D("v2"), D("same")]  # not the recorded v1 digest, nothing for removed
    assert D("v1") not in plan
    assert plan_prefetch(p.hot_set(), v1.by_path, CS) == [D("v1"), D("removed"), D("same")]


def test_plan_picks_recorded_chunks_or_all_of_them() -> None:
    m = Manifest(
        [f("partial", 4 * CS), f("whole", 3 * CS), f("shrunk", 2 * CS), f("small", 10)],
        chunk_size=CS,
    )
    hs = [
        hot("partial", {3, 1}),
        hot("whole"),
        hot("shrunk", {1, 5}),  # chunk 5 is past the end of the current file
        hot("small", {0, 2}),  # recorded chunks of a file that is one blob now
    ]
    assert plan_prefetch(hs, m.by_path, CS) == [
        D("partial#1"),
        D("partial#3"),
        D("whole#0"),
        D("whole#1"),
        D("whole#2"),
        D("shrunk#1"),
        D("small"),
    ]


def test_plan_puts_a_chunk_where_its_first_read_falls_within_its_group() -> None:
    m = Manifest([f("lib", 4 * CS), f("a"), f("b"), f("rare"), f("old", 2 * CS)], chunk_size=CS)
    lib = HotFile("lib", 0.1, 1.0, 1, frozenset({0, 1, 3}), {0: 0.1, 3: 0.1, 1: 2.5})
    hs = [
        lib,
        HotFile("a", 1.0, 1.0, 1, frozenset()),
        HotFile("old", 1.5, 1.0, 1, frozenset({1, 0})),  # no chunk times: index order
        HotFile("b", 3.0, 1.0, 1, frozenset()),
        HotFile("rare", 0.5, 0.2, 1, frozenset()),  # the next group: after all of the first
    ]
    assert plan_prefetch(hs, m.by_path, CS) == [
        D("lib#0"),
        D("lib#3"),
        D("a"),
        D("old#0"),
        D("old#1"),
        D("lib#1"),  # read 2.4 s after the library's first read, between old and b
        D("b"),
        D("rare"),
    ]


def test_hot_set_takes_each_chunks_typical_first_read_time() -> None:
    older = rec("lib", 0.5, 10, {0, 1})
    older.chunk_t = {0: 0.5, 1: 2.0}
    newer = rec("lib", 0.4, 10, {0, 1, 2})
    newer.chunk_t = {0: 0.4, 1: 4.0, 2: 1.0}
    (h,) = profile(run(older), run(newer)).hot_set()
    assert h.chunks == {0, 1, 2}
    assert h.chunk_t == {0: 0.4, 1: 4.0, 2: 1.0}  # the newest run weighs most
    assert profile(run(rec("lib", 0.5, 10, {0, 1}))).hot_set()[0].chunk_t == {}  # none kept


def test_plan_lists_each_blob_once_in_hot_order() -> None:
    a = f("a", tag="shared")
    m = Manifest(
        [
            a,
            f("b", tag="b"),
            f("c", tag="shared"),  # same content as a
            hl("d", a),
            d("dir"),
            sl("link", "b"),
            f("z", tag="z"),
        ],
        chunk_size=CS,
    )
    hs = [hot(p) for p in ["z", "c", "dir", "link", "b", "a", "d", "z"]]
    assert plan_prefetch(hs, m.by_path, CS) == [D("z"), D("shared"), D("b")]


def test_plan_of_nothing_is_empty() -> None:
    assert plan_prefetch([], Manifest([f("a")], chunk_size=CS).by_path, CS) == []


# -- recorder --------------------------------------------------------------------------------
class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class BlobSizes:
    """``new_blob_bytes`` that remembers its calls: 100 bytes a chunk."""

    def __init__(self) -> None:
        self.calls: list[set[int]] = []

    def __call__(self, idx: set[int]) -> int:
        self.calls.append(set(idx))
        return 100 * len(idx)


def test_recorder_first_access_makes_one_record_per_inode() -> None:
    clock = FakeClock()
    r = TraceRecorder("trainer", clock=clock)
    sizes = BlobSizes()
    clock.now += 0.5
    r.read(7, "a", D("a").hex, 10, source="fetch", wait=0.2, new_blob_bytes=sizes, chunks=range(1))
    clock.now += 1.0
    r.read(9, "b", D("b").hex, 5, source="cache", wait=0.0, new_blob_bytes=sizes, chunks=range(1))
    clock.now += 1.0
    # later reads: source and digest stay those of the first read; bytes and wait add up
    r.read(7, "a", "", 30, source="", wait=0.3, new_blob_bytes=sizes, chunks=range(1))
    r.read(7, "hardlink-of-a", "", 1, source="", wait=0.0, new_blob_bytes=sizes, chunks=range(1))

    assert r.seen(7)
    assert r.seen(9)
    assert not r.seen(8)
    a, b = r.records
    assert (a.path, a.t, a.source, a.digest, a.bytes_read) == ("a", 0.5, "fetch", D("a").hex, 41)
    assert a.wait == pytest.approx(0.5)
    assert (b.path, b.t, b.source, b.bytes_read, b.wait) == ("b", 1.5, "cache", 5, 0.0)
    assert sizes.calls == [{0}, {0}]  # once per inode, not on repeat reads
    assert r.touched_bytes == 200


def test_recorder_notes_when_each_chunk_was_first_read() -> None:
    clock = FakeClock()
    r = TraceRecorder("trainer", clock=clock)
    sizes = BlobSizes()
    clock.now += 0.5
    r.read(7, "lib", D("lib").hex, 10, source="fetch", wait=0.0, new_blob_bytes=sizes,
           chunks=range(0, 2))  # fmt: skip
    clock.now += 1.5
    r.read(7, "lib", "", 10, source="", wait=0.0, new_blob_bytes=sizes, chunks=range(1, 6))
    clock.now += 1.0
    r.read(7, "lib", "", 10, source="", wait=0.0, new_blob_bytes=sizes, chunks=range(3, 4))
    (lib,) = r.records
    assert lib.chunks == {0, 1, 2, 3, 4, 5}
    assert lib.chunk_t == {0: 0.5, 1: 0.5, 2: 2.0, 3: 2.0, 4: 2.0, 5: 2.0}
    assert sizes.calls == [{0, 1}, {2, 3, 4, 5}]


def test_recorder_chunk_sets_grow_and_new_blobs_count_once() -> None:
    r = TraceRecorder("trainer", clock=FakeClock())
    sizes = BlobSizes()

    def read(inode: int, chunks: range) -> None:
        r.read(inode, "big", "", 1, source="cache", wait=0.0, new_blob_bytes=sizes, chunks=chunks)

    read(3, range(0, 2))
    read(3, range(1, 4))  # 2 and 3 are new
    read(3, range(0, 4))  # nothing new
    read(3, range(2, 3))
    read(4, range(0, 1))  # another file's chunk 0 is another blob
    assert sizes.calls == [{0, 1}, {2, 3}, {0}]
    assert r.records[0].chunks == {0, 1, 2, 3}
    assert r.records[0].bytes_read == 4
    assert r.touched_bytes == 500


def test_recorder_trace_keeps_first_access_order_and_round_trips() -> None:
    clock = FakeClock()
    r = TraceRecorder("trainer", clock=clock)
    sizes = BlobSizes()
    for ino, path in [(5, "z"), (3, "a"), (4, "m")]:
        clock.now += 0.25
        r.read(
            ino,
            path,
            D(path).hex,
            1,
            source="prefetch",
            wait=0.1,
            new_blob_bytes=sizes,
            chunks=range(1),
        )
    trace = r.trace()
    assert trace.executable == "trainer"
    assert [x.path for x in trace.records] == ["z", "a", "m"]
    assert [x.t for x in trace.records] == [0.25, 0.5, 0.75]
    assert trace.wait_seconds() == pytest.approx(0.3)
    p = profile(trace)
    assert order(Profile.decode(p.encode())) == ["z", "a", "m"]
