"""Profiles in the CAS: concurrent saves from many hosts lose no run (compare-and-swap)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from lazycaf.cas.api import CAS
from lazycaf.cas.http import HttpCAS
from lazycaf.cas.local import LocalCAS
from lazycaf.traces.profiles import add_run, load_profile
from lazycaf.traces.trace import AccessRecord, Trace
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
