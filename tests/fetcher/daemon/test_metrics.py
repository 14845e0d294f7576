"""The daemon's Prometheus metrics: names, types and values through a registry of its own,
the same numbers as ``lazycaf stats``; the gauges of reads waiting read at scrape time; and,
end to end, ``fetcher serve --metrics-listen`` and ``cas serve --metrics-listen`` after a
cold run through a real mount."""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fetcher.cache.blobcache import BlobCache
from fetcher.cache.collector import GarbageCollector
from fetcher.cache.policy import GcPolicy
from fetcher.daemon.metrics import daemon_registry, daemon_stats
from fetcher.fetching import service as service_module
from fetcher.fetching.breaker import CasCircuitOpen
from fetcher.fetching.metrics import failure_cause
from fetcher.fetching.service import FetchService
from fetcher.fetching.sources import CasSource, TieredSource
from fetcher.peers.peerset import PeerSet
from lazycaf.cas.casdir import CasDir
from lazycaf.cas.local import LocalCAS
from lazycaf.core.digest import Digest
from lazycaf.core.errors import (
    BlobNotFound,
    CacheFull,
    CasUnavailable,
    DigestMismatch,
    IntegrityError,
)
from lazycaf.core.priority import Priority
from tests.conftest import Host, stop
from tests.helpers import make_tree, pack, wait_for

BLOBS = [f"module {i}\n".encode() * 40 for i in range(5)]
D = [Digest.of(b) for b in BLOBS]


@dataclass
class Daemon:
    service: FetchService
    registry: CollectorRegistry
    gc: GarbageCollector
    peers: PeerSet

    def value(self, name: str, **labels: str) -> float:
        found = self.registry.get_sample_value(name, labels)
        assert found is not None, f"no sample {name}{labels}"
        return found


@asynccontextmanager
async def daemon(tmp_path: Path, source: object = None) -> AsyncIterator[Daemon]:
    store = CasDir(tmp_path / "cas")
    for d, b in zip(D[:4], BLOBS[:4], strict=True):  # the last one is not in the CAS
        store.write(d, b)
    cache = BlobCache(tmp_path / "cache")
    tiered = source or TieredSource(CasSource(LocalCAS(store.root)))
    gc = GarbageCollector(cache, GcPolicy(budget=1 << 30), set)
    service = FetchService(cache, tiered, gc=gc)  # type: ignore[arg-type]
    peers = PeerSet(self_address="127.0.0.1:1", addresses=["127.0.0.1:2", "127.0.0.1:3"])
    peers.failed("127.0.0.1:3", "down")
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(service.run)
            yield Daemon(service, daemon_registry(service, gc, peers), gc, peers)
            nursery.cancel_scope.cancel()
    finally:
        cache.close()


async def test_metrics_count_what_the_service_did_and_match_stats(tmp_path: Path) -> None:
    async with daemon(tmp_path) as d:
        s = d.service
        assert await s.ensure(D[0]) == len(BLOBS[0])  # a miss, from the CAS
        assert await s.ensure(D[0]) == len(BLOBS[0])  # a hit
        with pytest.raises(BlobNotFound):
            await s.ensure(D[4])  # a miss that fails: not in the CAS
        await s.fetch_many(D[1:4], priority=Priority.PREFETCH)
        await s.ensure(D[1])  # a read of a prefetched blob
        s.touch([D[2]])  # a mount read a prefetched blob from the cache itself

        assert d.value("lazycaf_read_wait_seconds_count") == 2  # the two misses waited
        assert d.value("lazycaf_read_wait_seconds_sum") > 0
        assert d.value("lazycaf_misses_total") == 2
        assert d.value("lazycaf_blobs_total", source="cache") == 2
        assert d.value("lazycaf_blobs_total", source="cas") == 4
        assert d.value("lazycaf_blobs_total", source="peer") == 0
        assert d.value("lazycaf_blob_bytes_total", source="cas") == sum(map(len, BLOBS[:4]))
        assert d.value("lazycaf_fetch_failures_total", cause="not_found") == 1
        assert d.value("lazycaf_fetch_failures_total", cause="integrity") == 0
        # one blob and one group answered (the failed request has no source to count under)
        assert d.value("lazycaf_fetch_seconds_count", source="cas") == 2
        assert d.value("lazycaf_prefetched_blobs_total") == 3
        assert d.value("lazycaf_prefetch_hits_total") == 2
        assert d.value("lazycaf_prefetch_wasted_bytes") == len(BLOBS[3])
        assert d.value("lazycaf_cache_blobs") == 4
        assert d.value("lazycaf_cache_usage_bytes") == sum(map(len, BLOBS[:4]))
        assert d.value("lazycaf_cache_budget_bytes") == 1 << 30
        assert d.value("lazycaf_gc_runs_total") == 0
        assert d.value("lazycaf_peers") == 2 and d.value("lazycaf_peers_up") == 1
        assert d.value("lazycaf_reads_in_flight") == 0

        stats = daemon_stats(d.service, d.gc, d.peers)  # the `lazycaf stats` reply
        assert stats["read_waits"] == 2 and stats["misses"] == 2
        assert stats["failures_not_found"] == 1 and stats["prefetch_hits"] == 2
        assert stats["bytes_from_cas"] == d.value("lazycaf_blob_bytes_total", source="cas")
        assert stats["peers_up"] == 1 and stats["usage"] == d.value("lazycaf_cache_usage_bytes")


async def test_exposition_names_and_types_follow_prometheus_conventions(tmp_path: Path) -> None:
    async with daemon(tmp_path) as d:
        await d.service.ensure(D[0])
        text = generate_latest(d.registry).decode()
    parsed = list(text_string_to_metric_families(text))
    families = {f.name: f.type for f in parsed}
    assert families["lazycaf_read_wait_seconds"] == "histogram"
    assert families["lazycaf_fetch_seconds"] == "histogram"
    assert 'lazycaf_read_wait_seconds_bucket{le="1.0"} 1.0' in text
    for gauge in ("lazycaf_reads_in_flight", "lazycaf_reads_blocked", "lazycaf_peers_up"):
        assert families[gauge] == "gauge"
    counters = [n for n, t in families.items() if t == "counter"]
    assert "lazycaf_misses" in counters and "lazycaf_gc_evicted_bytes" in counters
    assert "lazycaf_misses_total 1.0" in text  # counters are exposed with _total
    for family in parsed:
        assert family.name.startswith("lazycaf_")
        if family.type == "counter":  # every sample of a counter is named ..._total
            assert {s.name for s in family.samples} <= {
                f"{family.name}_total",
                f"{family.name}_created",
            }, family


class GatedSource:
    """A source whose single fetches wait for ``gate`` (its own CAS; no peers)."""

    where = "gated"
    peers = None

    def __init__(self) -> None:
        self.gate = trio.Event()

    @property
    def cas(self) -> GatedSource:
        return self

    def first_peer(self, digest: Digest) -> None:
        return None

    async def aclose(self) -> None:
        pass

    async def fetch(self, digest: Digest, priority: Priority) -> object:
        from fetcher.fetching.source import Fetched

        await self.gate.wait()
        return Fetched("identity", BLOBS[D.index(digest)], "cas")


async def test_reads_in_flight_and_blocked_are_read_at_scrape_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = GatedSource()
    async with daemon(tmp_path, source) as d:
        async with trio.open_nursery() as readers:
            for digest in D[:3]:
                readers.start_soon(d.service.ensure, digest)
            await trio.testing.wait_all_tasks_blocked()
            assert d.value("lazycaf_reads_in_flight") == 3
            assert d.value("lazycaf_reads_blocked") == 0  # none waited over a second yet
            monkeypatch.setattr(service_module, "BLOCKED_AFTER", 0.001)
            await trio.sleep(0.01)
            assert d.value("lazycaf_reads_blocked") == 3
            source.gate.set()
        assert d.value("lazycaf_reads_in_flight") == 0
        assert d.value("lazycaf_reads_blocked") == 0
        assert d.value("lazycaf_read_wait_seconds_count") == 3


def test_failures_are_counted_by_cause() -> None:
    digest = D[0]
    assert failure_cause(BlobNotFound(digest, "cas")) == "not_found"
    assert failure_cause(DigestMismatch(digest, D[1], "blob")) == "integrity"
    assert failure_cause(IntegrityError("bad frame")) == "integrity"
    assert failure_cause(CacheFull("disk full")) == "cache_full"
    assert failure_cause(CasCircuitOpen("cas", "open")) == "circuit_open"
    assert failure_cause(CasUnavailable("cas", "down")) == "unavailable"


# -- end to end ---------------------------------------------------------------------------
def _scrape(url: str) -> dict[str, float]:
    """``GET url`` -> {sample with its labels: value}."""
    with urllib.request.urlopen(url, timeout=5) as answer:
        assert answer.headers["Content-Type"].startswith("text/plain")
        text = answer.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def _metrics_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_metrics_endpoints_after_a_cold_run_through_a_mount(host: Host, tmp_path: Path) -> None:
    cas = subprocess.Popen(
        [sys.executable, "-m", "lazycaf", "cas", "serve", "--root", str(tmp_path / "cas"),
         "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    daemon = None
    try:
        assert cas.stdout is not None
        url = cas.stdout.readline().decode().strip().rpartition(" on ")[2]
        cas_metrics = cas.stdout.readline().decode().strip().rpartition(" on ")[2]
        assert url.startswith("http://") and cas_metrics.endswith("/metrics"), url
        tree = make_tree(tmp_path / "tree")
        pack(tree, url, "--tag", "app:v1")
        port = _metrics_port()
        daemon = subprocess.Popen(
            [sys.executable, "-m", "lazycaf", "fetcher", "serve", "--cache", str(host.cache),
             "--cas", url, "--metrics-listen", f"127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**host.env, **_env()},
        )  # fmt: skip

        def serving() -> bool:
            assert daemon is not None and daemon.poll() is None, daemon
            try:
                return "lazycaf_misses_total" in _scrape(f"http://127.0.0.1:{port}/metrics")
            except OSError:
                return False

        wait_for(serving, "the daemon's /metrics", timeout=30)
        mnt = host.mountpoint()
        host.cli("mount", "app:v1", mnt, "--cas", url, "--no-prefetch")
        assert (mnt / "lib/pkg/sub/data.bin").read_bytes() == (
            tree / "lib/pkg/sub/data.bin"
        ).read_bytes()
        assert (mnt / "bin/tool").read_bytes() == (tree / "bin/tool").read_bytes()
        host.cli("umount", mnt)

        got = _scrape(f"http://127.0.0.1:{port}/metrics")
        assert got["lazycaf_read_wait_seconds_count"] > 0
        assert got["lazycaf_read_wait_seconds_sum"] > 0
        assert got["lazycaf_blob_bytes_total{source=cas}"] > 3 * 1024 * 1024
        assert got["lazycaf_fetch_seconds_count{source=cas}"] > 0
        stats = host.stats()  # `lazycaf stats` shows the same numbers
        assert stats["read_waits"] == got["lazycaf_read_wait_seconds_count"]
        assert stats["bytes_from_cas"] == got["lazycaf_blob_bytes_total{source=cas}"]

        served = _scrape(cas_metrics)
        assert served["lazycaf_cas_request_seconds_count{endpoint=blob_get}"] > 0
        assert served["lazycaf_cas_request_seconds_count{endpoint=blobs_missing}"] > 0
        assert served["lazycaf_cas_responses_total{code=200,endpoint=ref_get}"] > 0
        assert served["lazycaf_cas_sent_bytes_total"] > 0
    finally:
        if daemon is not None:
            stop(daemon)
        stop(cas)


def _env() -> dict[str, str]:
    return {"LAZYCAF_NO_ZYGOTE": "1"}


async def _get(app: object, path: str) -> tuple[object, bytes]:
    """One ASGI GET without a body: the status and the body answered."""
    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": path, "headers": []}
    await app(scope, receive, send)  # type: ignore[operator]
    body = b"".join(m["body"] for m in sent[1:] if isinstance(m.get("body"), bytes))
    return sent[0]["status"], body


async def test_the_peer_listener_serves_the_same_metrics(tmp_path: Path) -> None:
    from fetcher.daemon.peerapp import PeerApp

    async with daemon(tmp_path) as d:
        await d.service.ensure(D[0])
        status, body = await _get(PeerApp(d.service, d.peers, registry=d.registry), "/metrics")
        assert status == 200
        assert b"lazycaf_read_wait_seconds_count 1.0" in body
        assert b'lazycaf_blobs_total{source="cas"} 1.0' in body
        status, _ = await _get(PeerApp(d.service, d.peers), "/metrics")
        assert status == 404  # no registry given: no metrics on this app
