"""Tests for lazycaf.traces.crowd (the crowd hot set, pure) and fetcher.daemon.crowd (the
daemon's listing of every profile in a CAS)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fetcher.daemon.crowd import CrowdProfiles
from lazycaf.cas.local import LocalCAS
from lazycaf.cas.refs import profile_ref
from lazycaf.core.chunking import chunk_count
from lazycaf.core.digest import Digest
from lazycaf.core.manifest import FILE, Entry
from lazycaf.traces.crowd import CrowdFile, crowd_hot_set, plan_crowd, profile_files
from lazycaf.traces.trace import AccessRecord, Profile, Trace

CS = 64 << 10


def D(tag: str) -> Digest:
    return Digest.of(tag.encode())


def f(path: str, size: int = 3, *, tag: str | None = None) -> Entry:
    tag = tag or path
    chunks = tuple(D(f"{tag}#{i}") for i in range(chunk_count(size, CS)))
    return Entry(path, FILE, 0o644, 2_000, size, D(tag), chunks)


def run(*reads: tuple[str, float, str]) -> Trace:
    """A trace reading (path, t, content tag) in order."""
    return Trace("exe", records=[AccessRecord(p, t, 10, digest=D(tag).hex) for p, t, tag in reads])


def profile(name: str, *runs: Trace) -> Profile:
    p = Profile(name)
    for r in runs:
        p.add(r)
    return p


def test_profile_files_name_paths_by_their_newest_digest() -> None:
    old = run(("a.py", 0.1, "a-v1"), ("b.py", 0.2, "b"))
    new = run(("a.py", 0.1, "a-v2"), ("b.py", 0.3, "b"))
    files = {c.digest: c for c in profile_files(profile("p", old, new))}
    assert set(files) == {D("a-v2").hex, D("b").hex}
    assert files[D("b").hex].weight == pytest.approx(1.0)


def test_records_without_a_digest_are_left_out() -> None:
    trace = Trace("exe", records=[AccessRecord("x", 0.1, 1, digest="")])
    assert profile_files(profile("p", trace)) == []


def test_crowd_sums_weights_and_takes_the_weighted_median_time() -> None:
    numpy = [run(("np.py", 0.2, "numpy"), (f"own{i}.py", 0.1, f"own{i}")) for i in range(3)]
    crowd = crowd_hot_set(profile_files(profile(f"exe{i}", numpy[i])) for i in range(3))
    by_digest = {c.digest: c for c in crowd}
    assert by_digest[D("numpy").hex].weight == pytest.approx(3.0)  # three executables read it
    assert by_digest[D("own0").hex].weight == pytest.approx(1.0)
    assert [c.t for c in crowd] == sorted(c.t for c in crowd)  # by time


def test_plan_keeps_what_this_executable_holds_most_shared_first() -> None:
    shared_late = run(("lib/shared.py", 0.9, "shared"))
    crowd = crowd_hot_set(
        [
            profile_files(profile("a", run(("lib/shared.py", 0.9, "shared"), ("x", 0.1, "x")))),
            profile_files(profile("b", shared_late)),
            profile_files(profile("b2", shared_late)),
            profile_files(profile("c", run(("lib/rare.py", 0.05, "rare")))),
        ]
    )
    # this executable holds "shared" (read by three executables) and "rare" (by one: under
    # half as many), under other paths, and not "x"
    files = {e.digest.hex: e for e in (f("p/shared.py", tag="shared"), f("q/rare.py", tag="rare"))}
    plan = plan_crowd(crowd, files, CS)
    assert plan == [D("shared"), D("rare")]  # the common one first, though read later
    assert plan_crowd(crowd, {}, CS) == []


def test_chunks_read_carry_over() -> None:
    big = f("big.bin", 5 * CS, tag="big")
    trace = Trace("exe", records=[AccessRecord("big.bin", 0.1, 10, digest=D("big").hex)])
    trace.records[0].chunks = {1, 3}
    crowd = crowd_hot_set([profile_files(profile("p", trace))])
    assert plan_crowd(crowd, {D("big").hex: big}, CS) == [D("big#1"), D("big#3")]


@pytest.mark.parametrize(
    "row",
    [
        ["nothex", 0.1, 1.0, 3, []],
        [D("a").hex, "t", 1.0, 3, []],
        [D("a").hex, 0.1, 1.0, 3, ["x"]],
        [D("a").hex, 0.1, 1.0],
    ],
)
def test_bad_rows_are_refused(row: list[object]) -> None:
    with pytest.raises((ValueError, TypeError)):
        CrowdFile.from_json(row)


def test_rows_round_trip() -> None:
    c = CrowdFile(D("a").hex, 0.25, 2.5, 100, frozenset({0, 2}))
    assert CrowdFile.from_json(c.to_json()) == c


async def test_daemon_lists_every_profile_once_and_skips_bad_ones(tmp_path: Path) -> None:
    cas = LocalCAS(tmp_path / "cas")
    for name, tag in (("a", "numpy"), ("b", "numpy")):
        data = profile(name, run(("np.py", 0.2, tag))).encode()
        await cas.put(Digest.of(data), data)
        await cas.set_ref(profile_ref(name), Digest.of(data))
    junk = b"not a profile"
    await cas.put(Digest.of(junk), junk)
    await cas.set_ref(profile_ref("junk"), Digest.of(junk))
    await cas.put(D("manifest"), b"manifest")
    await cas.set_ref("app:v1", D("manifest"))  # not a profile: not listed

    crowd = CrowdProfiles(cas, ttl=0.0)
    files, n = await crowd.hot_set()
    assert n == 3  # the junk one counts, empty
    assert [(c.digest, c.weight) for c in files] == [(D("numpy").hex, pytest.approx(2.0))]
    loads = []
    real_get = cas.get

    async def counting_get(digest: Digest) -> bytes:
        loads.append(digest)
        return await real_get(digest)

    cas.get = counting_get  # type: ignore[method-assign]
    await crowd.hot_set()
    assert loads == []  # every profile blob is remembered by digest
    await cas.set_ref(profile_ref("a"), Digest.of(junk))  # a changed profile is read again
    files, _ = await crowd.hot_set()
    assert loads == [] and files[0].weight == pytest.approx(1.0)  # (junk was read before)
    cached = CrowdProfiles(cas, ttl=3600.0)
    first = await cached.hot_set()
    await cas.set_ref(profile_ref("b"), Digest.of(junk))
    assert await cached.hot_set() == first  # within the ttl: no new listing
