"""The CAS source's circuit breaker (``fetcher/fetching/breaker.py``): open after consecutive
failures, fail fast, one probe per interval, closed by any answer, one log line per change."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import pytest
import trio

from fetcher.fetching.breaker import CasCircuitOpen, CircuitBreaker
from fetcher.fetching.sources import CasSource
from lazycaf.core import framing
from lazycaf.core.digest import Digest
from lazycaf.core.errors import BlobNotFound, CasUnavailable, IntegrityError
from lazycaf.core.priority import Priority

DATA = b"the blob"
DIGEST = Digest.of(DATA)


class FlakyCas:
    """A CAS whose answers the test switches: ``up``, ``down`` (unavailable), ``absent``
    (404), ``corrupt`` (an answer that will not verify) or ``hang``; counts the requests."""

    where = "http://cas.test"

    def __init__(self) -> None:
        self.state = "up"
        self.requests = 0

    async def _answer(self) -> tuple[framing.Encoding, bytes]:
        self.requests += 1
        await trio.sleep(0.01)
        if self.state == "down":
            raise CasUnavailable(self.where, "ConnectError: connection refused")
        if self.state == "absent":
            raise BlobNotFound(DIGEST, self.where)
        if self.state == "corrupt":
            raise IntegrityError("unexpected content encoding")
        if self.state == "hang":
            await trio.sleep_forever()
        return framing.IDENTITY, DATA

    async def get_encoded(self, digest: Digest) -> tuple[framing.Encoding, bytes]:
        return await self._answer()

    async def get_many_encoded(
        self, digests: Sequence[Digest]
    ) -> dict[Digest, tuple[framing.Encoding, bytes]]:
        return {d: await self._answer() for d in digests}

    async def aclose(self) -> None:
        pass


def source() -> tuple[CasSource, FlakyCas]:
    cas = FlakyCas()
    breaker = CircuitBreaker(cas.where, threshold=3, probe_interval=1.5)
    return CasSource(cas, breaker=breaker), cas  # type: ignore[arg-type]


async def fails(src: CasSource, error: type[Exception]) -> None:
    with pytest.raises(error):
        await src.fetch(DIGEST, Priority.DEMAND)


async def test_opens_after_consecutive_failures_and_fails_fast(autojump_clock: object) -> None:
    src, cas = source()
    cas.state = "down"
    for _ in range(3):
        await fails(src, CasUnavailable)
    assert src.breaker.is_open and cas.requests == 3
    start = trio.current_time()
    for _ in range(100):
        await fails(src, CasCircuitOpen)
    assert cas.requests == 3  # the dead CAS was not asked again
    assert trio.current_time() - start < 0.01
    got, error = await src.fetch_many([DIGEST], Priority.PREFETCH)  # one breaker for both
    assert got == {} and isinstance(error, CasCircuitOpen)
    assert cas.requests == 3
    assert "3 failures in a row" in str(error) and "connection refused" in str(error)


async def test_a_success_between_failures_resets_the_count(autojump_clock: object) -> None:
    src, cas = source()
    for _ in range(5):
        cas.state = "down"
        await fails(src, CasUnavailable)
        await fails(src, CasUnavailable)
        cas.state = "up"
        assert (await src.fetch(DIGEST, Priority.DEMAND)).payload == DATA
    assert not src.breaker.is_open


async def test_one_probe_per_interval_and_its_success_closes(autojump_clock: object) -> None:
    src, cas = source()
    cas.state = "down"
    for _ in range(3):
        await fails(src, CasUnavailable)
    await trio.sleep(1.6)
    await fails(src, CasUnavailable)  # the probe went to the CAS, and failed
    assert cas.requests == 4
    await fails(src, CasCircuitOpen)  # open for another interval
    await trio.sleep(1.6)
    cas.state = "up"
    results: list[object] = []

    async def read() -> None:
        try:
            results.append((await src.fetch(DIGEST, Priority.DEMAND)).payload)
        except CasCircuitOpen as exc:
            results.append(exc)

    async with trio.open_nursery() as nursery:
        for _ in range(5):  # one is the probe; the others fail fast while it is out
            nursery.start_soon(read)
    assert results.count(DATA) == 1 and cas.requests == 5
    assert not src.breaker.is_open
    assert (await src.fetch(DIGEST, Priority.DEMAND)).payload == DATA


@pytest.mark.parametrize("answer", ["absent", "corrupt"])
async def test_an_answer_that_is_not_a_blob_still_closes_it(
    autojump_clock: object, answer: str
) -> None:
    src, cas = source()
    cas.state = "down"
    for _ in range(3):
        await fails(src, CasUnavailable)
    await trio.sleep(1.6)
    cas.state = answer
    await fails(src, BlobNotFound if answer == "absent" else IntegrityError)
    assert not src.breaker.is_open


async def test_a_cancelled_probe_gives_the_turn_to_the_next_request(
    autojump_clock: object,
) -> None:
    src, cas = source()
    cas.state = "down"
    for _ in range(3):
        await fails(src, CasUnavailable)
    await trio.sleep(1.6)
    cas.state = "hang"
    with trio.move_on_after(5):
        await src.fetch(DIGEST, Priority.DEMAND)  # the probe, cancelled
    cas.state = "up"
    assert (await src.fetch(DIGEST, Priority.DEMAND)).payload == DATA


async def test_logs_once_per_change_of_state(
    autojump_clock: object, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="fetcher.fetching.breaker")
    src, cas = source()
    cas.state = "down"
    for _ in range(10):  # opens, then fails fast
        await fails(src, CasUnavailable)
    for _ in range(5):  # probes that fail
        await trio.sleep(1.6)
        await fails(src, CasUnavailable)
    cas.state = "up"
    await trio.sleep(1.6)
    for _ in range(10):
        await src.fetch(DIGEST, Priority.DEMAND)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 2, warnings
    assert "failing fetches at once" in warnings[0] and "answers again" in warnings[1]


def test_rejects_nonsense_settings() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker("x", threshold=0)
    with pytest.raises(ValueError):
        CircuitBreaker("x", probe_interval=0)
