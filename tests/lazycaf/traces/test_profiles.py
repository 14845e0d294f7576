"""Profiles in the CAS: concurrent saves from many hosts lose no run (compare-and-swap); a
profile's hot-set bundle, built where the blobs are (a local store, or the CAS server)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import trio

from lazycaf.cas import bundle as bundle_module
from lazycaf.cas import bundlepart
from lazycaf.cas.api import CAS
from lazycaf.cas.bundle import Bundle, Part, make_bundle
from lazycaf.cas.http import HttpCAS
from lazycaf.cas.local import LocalCAS
from lazycaf.core import framing
from lazycaf.core.chunking import MAX_CHUNK
from lazycaf.core.digest import Digest
from lazycaf.traces.profiles import add_run, load_profile, profile_blobs, refresh_bundle
from lazycaf.traces.trace import AccessRecord, Profile, Trace
from tests.conftest import CasServer


def trace(i: int) -> Trace:
    record = AccessRecord(f"lib/mod{i}.py", 0.01 * i, 100 + i)
    return Trace("trainer", 1_700_000_000.0 + i, [record])


@pytest.fixture(params=["local", pytest.param("http", marks=pytest.mark.slow)])
async def cas(request: pytest.FixtureRequest, tmp_path: Path) -> CAS:
    if request.param == "local":
        return LocalCAS(tmp_path / "cas")
    server: CasServer = request.getfixturevalue("cas_server")
    return HttpCAS(server.url, token=server.token)


async def test_concurrent_saves_keep_every_run(cas: CAS) -> None:
    async with trio.open_nursery() as nursery:
        for i in range(6):  # six hosts unmount at once
            nursery.start_soon(add_run, cas, "trainer", trace(i))
    profile = await load_profile(cas, "trainer")
    assert profile is not None
    assert sorted(run.started for run in profile.runs) == [1_700_000_000.0 + i for i in range(6)]
    await cas.aclose()


# -- hot-set bundles -----------------------------------------------------------------------
def _blobs(n: int) -> dict[Digest, bytes]:
    """Half compressible (stored as zstd frames), half random (stored raw)."""
    out = {}
    for i in range(n):
        data = f"module {i}\n".encode() * 3000 if i % 2 else os.urandom(20_000 + i)
        out[Digest.of(data)] = data
    return out


async def test_a_bundle_holds_the_plan_in_order_in_growing_compressed_parts(
    cas: CAS, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = isinstance(cas, LocalCAS)  # a server has its own part sizes: 1 MiB to 8 MiB
    monkeypatch.setattr(bundle_module, "FIRST_PART", 40_000)
    monkeypatch.setattr(bundle_module, "PART", 100_000)
    blobs = _blobs(12)
    await cas.put_many(list(blobs.items()))
    plan = list(blobs)[::-1]
    absent = Digest.of(b"not in the store")
    bundle = await make_bundle(cas, [plan[0], absent, *plan, plan[3]])
    assert list(bundle.blobs) == plan  # in order, once each, without what the store lacks
    bodies = [await cas.get(p.digest) for p in bundle.parts]
    assert [p.size for p in bundle.parts] == [len(b) for b in bodies]
    if local:
        assert len(bundle.parts) > 2 and all(len(b) <= 100_000 for b in bodies)
        assert len(bodies[0]) <= 40_000 < max(len(b) for b in bodies)  # the first is small
    assert all(b.startswith(bundlepart.MAGIC) for b in bodies)  # records compressed together
    records = [r for body in bodies for r in bundlepart.unpack_part(body)]
    assert [r[0] for r in records] == plan
    for d, encoding, payload in records:  # each its blob's bytes, decoded
        assert encoding == framing.IDENTITY and payload == blobs[d]
    again = await make_bundle(cas, plan)
    assert again == bundle  # the same blobs as stored: the same bundle
    await cas.aclose()


async def test_a_bundle_stops_at_its_byte_cap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cas = LocalCAS(tmp_path / "cas")
    blobs = _blobs(6)
    await cas.put_many(list(blobs.items()))
    monkeypatch.setattr(bundle_module, "MAX_BUNDLE_BYTES", 50_000)
    bundle = await make_bundle(cas, list(blobs))
    assert 0 < len(bundle.blobs) < 6 and bundle.size <= 50_000 + 37 * len(bundle.parts)
    assert list(bundle.blobs) == list(blobs)[: len(bundle.blobs)]


async def test_parts_are_cut_by_decoded_bytes_too_so_zeros_never_decode_without_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blobs of zeros are a few hundred bytes as stored: by stored bytes alone the whole hot
    set would be one part that decodes to gigabytes (readers refuse a part decoding past
    ``MAX_PART_DECODED``), so a part also ends at ``PART_DECODED`` and the bundle at
    ``MAX_BUNDLE_DECODED``."""
    cas = LocalCAS(tmp_path / "cas")
    zeros = {Digest.of(data): data for data in (bytes(300_000 + i) for i in range(8))}
    await cas.put_many(list(zeros.items()))
    stored = [len((await cas.get_encoded(d))[1]) for d in zeros]
    assert sum(stored) < 10_000  # as stored
    monkeypatch.setattr(bundle_module, "PART_DECODED", 700_000)
    monkeypatch.setattr(bundle_module, "MAX_BUNDLE_DECODED", 2_000_000)
    bundle = await make_bundle(cas, list(zeros))
    assert list(bundle.blobs) == list(zeros)[:6]  # 6 x ~300 kB: the bundle's decoded cap
    decoded = [sum(len(r[2]) for r in bundlepart.unpack_part(await cas.get(p.digest)))
               for p in bundle.parts]  # fmt: skip
    assert len(decoded) == 3 and all(n <= 700_000 for n in decoded)
    assert [p.decoded for p in bundle.parts] == decoded  # recorded, for ``bundle_fits``
    again = Bundle.from_json(json.loads(json.dumps(bundle.to_json())))
    assert again.decoded == sum(decoded)
    # what a reader accepts covers what a builder writes: a part's cap plus one whole record
    assert bundle_module.PART_DECODED + MAX_CHUNK <= bundlepart.MAX_PART_DECODED
    await cas.aclose()


async def test_refresh_bundle_builds_once_per_plan_and_executable(cas: CAS) -> None:
    blobs = _blobs(20)
    await cas.put_many(list(blobs.items()))
    plan = list(blobs)
    exe, other_exe = Digest.of(b"v1"), Digest.of(b"v2")
    assert await refresh_bundle(cas, "trainer", exe, plan) == (None, False)  # no profile yet
    await add_run(cas, "trainer", trace(0))
    first, built = await refresh_bundle(cas, "trainer", exe, plan)
    assert built and first is not None and list(first.blobs) == plan
    # a plan that differs in one blob of twenty still fits: nothing is built
    assert await refresh_bundle(cas, "trainer", exe, plan[:-1]) == (first, False)
    # runs saved later keep the bundle; the store GC keeps it for the profile
    await add_run(cas, "trainer", trace(1))
    profile = await load_profile(cas, "trainer")
    assert profile is not None and profile.bundle == first and profile.bundle_for == exe.hex
    data = await cas.get(await cas.get_ref("profiles/trainer"))
    assert {p.digest for p in first.parts} <= profile_blobs(data)
    # another executable, or a plan half new: a new bundle
    second, built = await refresh_bundle(cas, "trainer", other_exe, plan)
    assert built and second is not None
    third, built = await refresh_bundle(cas, "trainer", other_exe, plan[10:])
    assert built and third is not None and list(third.blobs) == plan[10:]
    profile = await load_profile(cas, "trainer")
    assert profile is not None and profile.bundle == third and len(profile.runs) == 2
    await cas.aclose()


def test_a_bundle_this_version_cannot_read_costs_the_bundle_not_the_profile() -> None:
    profile = Profile("trainer", [trace(0)])
    body = json.loads(profile.encode())
    body["bundle"] = {"parts": [{"digest": "not hex", "blobs": [], "bytes": 1}]}
    decoded = Profile.decode(json.dumps(body).encode())
    assert decoded.bundle is None and len(decoded.runs) == 1


def test_a_bundle_cut_at_its_decoded_cap_is_full() -> None:
    """A hot set of blobs that are almost nothing as stored stops at the decoded cap: it
    must not look like a bundle short of its plan, rebuilt at every save."""
    from lazycaf.cas.bundle import MAX_BUNDLE_DECODED
    from lazycaf.traces.profiles import bundle_fits

    blobs = [Digest.of(str(i).encode()) for i in range(100)]
    exe = Digest.of(b"exe")
    profile = Profile("trainer", [])
    profile.bundle_for = exe.hex
    part = Part(Digest.of(b"part"), tuple(blobs[:50]), 1000, 1000, MAX_BUNDLE_DECODED)
    profile.bundle = Bundle((part,))
    assert bundle_fits(profile, exe, blobs)
    profile.bundle = Bundle((Part(part.digest, part.blobs, 1000, 1000, 1_000_000),))
    assert not bundle_fits(profile, exe, blobs)


def test_a_bundle_is_full_by_its_blobs_as_stored_not_by_its_compressed_parts() -> None:
    """A hot set past the byte cap is cut at the cap as stored; its compressed parts are
    smaller, and must not make every later save rebuild it."""
    from lazycaf.cas.bundle import MAX_BUNDLE_BYTES, Bundle, Part
    from lazycaf.traces.profiles import bundle_fits

    blobs = [Digest.of(str(i).encode()) for i in range(100)]
    exe = Digest.of(b"exe")
    profile = Profile("trainer", [])
    profile.bundle_for = exe.hex
    part = Part(Digest.of(b"part"), tuple(blobs[:50]), MAX_BUNDLE_BYTES // 2, MAX_BUNDLE_BYTES)
    profile.bundle = Bundle((part,))
    assert bundle_fits(profile, exe, blobs)  # a plan twice as long: the bundle is full
    profile.bundle = Bundle((Part(part.digest, part.blobs, 1000, 1000),))
    assert not bundle_fits(profile, exe, blobs)  # not full: rebuilt for the longer plan
    again = Bundle.from_json(json.loads(json.dumps(Bundle((part,)).to_json())))
    assert again.parts[0].stored_bytes == MAX_BUNDLE_BYTES
    older = {"parts": [{"digest": part.digest.hex, "blobs": [blobs[0].hex], "bytes": 77}]}
    assert Bundle.from_json(older).stored == 77  # written before "stored": as its bytes
