"""The peer set (pure): addresses, rendezvous homes, health and back-off, the list file;
and the priority gate the peer API sends through."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
import trio.lowlevel
import trio.testing

from fetcher.daemon.peerapp import PriorityGate
from fetcher.fetching.recent import RecentPayloads
from fetcher.fetching.service import DEMAND, PREFETCH
from fetcher.peers.peerset import PeerSet, check_address, parse_peer_list, rendezvous_order
from lazycaf.core.digest import Digest
from lazycaf.core.errors import UsageError

DIGESTS = [Digest.of(str(i).encode()) for i in range(3000)]
MEMBERS = [f"10.0.0.{i}:7000" for i in range(1, 9)]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# -- addresses and the list file -------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("10.0.0.1:7000", "10.0.0.1:7000"),
        (" http://host-a:80/ ", "host-a:80"),
        ("[::1]:7000", "[::1]:7000"),
        ("h:007", "h:7"),
    ],
)
def test_addresses_are_normalized(text: str, want: str) -> None:
    assert check_address(text) == want


@pytest.mark.parametrize(
    "text",
    ["host", "host:", ":80", "host:0", "host:70000", "a/b:1", "h:x", "[::1:80", "::1:80", "a b:1"],
)
def test_bad_addresses_are_refused(text: str) -> None:
    with pytest.raises(UsageError, match="not a peer address"):
        check_address(text)


def test_peer_list_skips_comments_and_repeats() -> None:
    text = "# the cluster\n10.0.0.1:7000\n\n10.0.0.2:7000  # rack 2\n10.0.0.1:7000\n"
    assert parse_peer_list(text) == ["10.0.0.1:7000", "10.0.0.2:7000"]


def test_peer_list_error_names_file_and_line() -> None:
    with pytest.raises(UsageError, match=r"peers\.txt line 2: not a peer address"):
        parse_peer_list("10.0.0.1:7000\nnonsense\n", where="peers.txt")


# -- rendezvous hashing ----------------------------------------------------------------------
def test_homes_spread_evenly_and_agree_across_orderings() -> None:
    homes = [rendezvous_order(MEMBERS, d)[0] for d in DIGESTS]
    shuffled = [rendezvous_order(list(reversed(MEMBERS)), d)[0] for d in DIGESTS]
    assert homes == shuffled
    per_member = [homes.count(m) for m in MEMBERS]
    expected = len(DIGESTS) / len(MEMBERS)
    assert all(0.7 * expected < n < 1.3 * expected for n in per_member), per_member


def test_adding_a_member_moves_only_the_blobs_it_becomes_home_of() -> None:
    before = {d: rendezvous_order(MEMBERS, d)[0] for d in DIGESTS}
    new = "10.0.0.99:7000"
    after = {d: rendezvous_order([*MEMBERS, new], d)[0] for d in DIGESTS}
    moved = [d for d in DIGESTS if before[d] != after[d]]
    assert moved and all(after[d] == new for d in moved)
    assert 0.5 / 9 < len(moved) / len(DIGESTS) < 1.5 / 9


def test_removing_a_member_moves_only_its_blobs() -> None:
    gone = MEMBERS[3]
    before = {d: rendezvous_order(MEMBERS, d) for d in DIGESTS}
    rest = [m for m in MEMBERS if m != gone]
    for d in DIGESTS:
        home = rendezvous_order(rest, d)[0]
        if before[d][0] != gone:
            assert home == before[d][0]
        else:
            assert home == before[d][1]  # the next-ranked member takes over


# -- health ----------------------------------------------------------------------------------
def test_failed_peer_is_backed_off_doubling_then_retried() -> None:
    clock = Clock()
    peers = PeerSet(addresses=MEMBERS[:2], clock=clock)
    a = MEMBERS[0]
    for backoff in (1, 2, 4, 8, 16, 30, 30):
        peers.failed(a, "timed out")
        assert not peers.is_live(a)
        clock.now += backoff - 0.01
        assert not peers.is_live(a)
        clock.now += 0.02
        assert peers.is_live(a)  # half-open: tried again
    peers.succeeded(a)
    peers.failed(a, "once more")
    clock.now += 1.01
    assert peers.is_live(a)  # the success reset the back-off
    status = {s.address: s for s in peers.statuses()}[a]
    assert status.failures == 1 and status.last_error == "once more" and status.served == 1


def test_ranking_skips_backed_off_peers_but_never_self() -> None:
    clock = Clock()
    me = MEMBERS[0]
    peers = PeerSet(self_address=me, addresses=MEMBERS[1:4], clock=clock)
    assert sorted(peers.members()) == sorted(MEMBERS[:4])
    d = next(d for d in DIGESTS if rendezvous_order(MEMBERS[:4], d)[0] == MEMBERS[1])
    assert peers.home(d) == MEMBERS[1]
    peers.failed(MEMBERS[1], "corrupt bytes")
    assert peers.home(d) == rendezvous_order([m for m in MEMBERS[:4] if m != MEMBERS[1]], d)[0]
    peers.failed(me, "ignored")  # this daemon never backs itself off
    assert me in peers.ranking(d)


def test_list_file_is_reread_when_it_changes_keeping_health(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "peers"
    path.write_text("\n".join(MEMBERS[:3]) + "\n")
    peers = PeerSet(self_address=MEMBERS[0], path=path, clock=clock)
    assert peers.members() == MEMBERS[:3]
    peers.failed(MEMBERS[1], "hung")
    assert not peers.reload()  # unchanged: no re-read
    path.write_text("\n".join([MEMBERS[1], MEMBERS[3]]) + "\n")
    os.utime(path, ns=(1, 2))  # a new stamp even within the filesystem's time granularity
    assert peers.reload()
    assert sorted(peers.members()) == sorted([MEMBERS[0], MEMBERS[1], MEMBERS[3]])
    assert not peers.is_live(MEMBERS[1])  # its back-off survived the reload


def test_broken_list_file_keeps_the_last_good_set(tmp_path: Path) -> None:
    path = tmp_path / "peers"
    path.write_text(MEMBERS[1] + "\n")
    peers = PeerSet(self_address=MEMBERS[0], path=path)
    path.write_text("half-written-line\n")
    os.utime(path, ns=(1, 3))
    assert not peers.reload()
    assert sorted(peers.members()) == sorted(MEMBERS[:2])
    path.unlink()
    assert not peers.reload()
    assert len(peers) == 2


# -- the priority gate -----------------------------------------------------------------------
async def test_gate_serves_waiting_demand_before_waiting_prefetch() -> None:
    gate = PriorityGate(1)
    order: list[str] = []
    release = trio.Event()

    async def holder() -> None:
        async with gate.slot(PREFETCH):
            await release.wait()

    async def request(name: str, priority: int) -> None:
        async with gate.slot(priority):
            order.append(name)
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(holder)
        await trio.testing.wait_all_tasks_blocked()
        for name, prio in (("p1", PREFETCH), ("p2", PREFETCH), ("d1", DEMAND), ("d2", DEMAND)):
            nursery.start_soon(request, name, prio)
            await trio.testing.wait_all_tasks_blocked()
        release.set()
    assert order == ["d1", "d2", "p1", "p2"]


async def test_gate_cancelled_waiter_gives_up_its_place() -> None:
    gate = PriorityGate(1)
    served: list[str] = []
    release = trio.Event()
    scope = trio.CancelScope()

    async def holder() -> None:
        async with gate.slot(DEMAND):
            await release.wait()

    async def request(name: str) -> None:
        async with gate.slot(DEMAND):
            served.append(name)

    async def cancelled() -> None:
        with scope:
            await request("cancelled")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(holder)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(cancelled)  # first in line ...
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(request, "second")
        await trio.testing.wait_all_tasks_blocked()
        scope.cancel()  # ... gives up before its turn
        await trio.testing.wait_all_tasks_blocked()
        release.set()
    assert served == ["second"]
    with trio.move_on_after(1) as timeout:
        async with gate.slot(PREFETCH):  # the slot came back
            pass
    assert not timeout.cancelled_caught


# -- recent payloads -------------------------------------------------------------------------
def test_recent_payloads_keep_the_newest_within_budget() -> None:
    recent = RecentPayloads(100)
    d = DIGESTS
    recent.put(d[0], "zstd", b"a" * 40)
    recent.put(d[1], "zstd", b"b" * 40)
    assert recent.get(d[0]) == ("zstd", b"a" * 40)  # now the most recently used
    recent.put(d[2], "zstd", b"c" * 40)  # over budget: d[1], the least recent, goes
    assert recent.get(d[1]) is None and recent.get(d[0]) is not None
    assert recent.size == 80 and len(recent) == 2
    recent.put(d[3], "zstd", b"x" * 101)  # larger than the whole budget: not kept
    assert recent.get(d[3]) is None and recent.size == 80
    assert RecentPayloads(0).get(d[0]) is None
