"""The daemon's numbers, for ``lazycaf stats`` and for Prometheus, read from one place.

``daemon_stats`` is the ``stats`` reply of the mount API: the fetch service's statistics,
GC's and the peer set's. ``DaemonCollector`` turns the same reply into metric families at
scrape time (a custom collector: nothing is updated on the read path for it beyond the
service's own integer counters), plus the service's histograms. ``daemon_registry`` is a
registry of its own per daemon, never the process-wide default, so daemons started in one
process (tests) do not collide. Every metric is described in ``docs/operations.md``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from fetcher.cache.collector import GarbageCollector
from fetcher.fetching.metrics import CAUSES
from fetcher.fetching.service import FetchService
from fetcher.peers.peerset import PeerSet

__all__ = ["DaemonCollector", "daemon_registry", "daemon_stats"]

_SOURCES = (
    ("cache", "hits", "bytes_from_cache"),
    ("peer", "blobs_from_peers", "bytes_from_peers"),
    ("cas", "blobs_from_cas", "bytes_from_cas"),
)


def daemon_stats(
    service: FetchService, gc: GarbageCollector | None, peers: PeerSet | None
) -> dict[str, Any]:
    """The ``stats`` reply: fetch statistics, the blobs written plain and compressed since
    (``compressed_later_*``), GC's (``budget``, ``usage``, ``gc_*``) and,
    with peers, ``peers`` (members, this daemon included) and ``peers_up`` (the others not
    backed off)."""
    stats: dict[str, Any] = asdict(service.statistics())
    blobs, nbytes = service.cache.compression_statistics()
    stats |= {"compressed_later_blobs": blobs, "compressed_later_bytes": nbytes}
    if gc is not None:
        stats |= gc.statistics()
    if peers is not None:
        others = [s for s in peers.statuses() if s.address != peers.self_address]
        stats |= {"peers": len(others), "peers_up": sum(s.live for s in others)}
    return stats


class DaemonCollector(Collector):
    """Metric families built from ``daemon_stats`` when Prometheus scrapes."""

    def __init__(
        self,
        service: FetchService,
        gc: GarbageCollector | None = None,
        peers: PeerSet | None = None,
    ) -> None:
        self.service = service
        self.gc = gc
        self.peers = peers

    def collect(self) -> Iterator[Metric]:
        s = daemon_stats(self.service, self.gc, self.peers)
        blobs = CounterMetricFamily(
            "lazycaf_blobs",
            "Blobs by source: demand reads the cache held (cache), "
            "blobs fetched from a peer or the CAS",
            labels=["source"],
        )
        size = CounterMetricFamily(
            "lazycaf_blob_bytes",
            "Bytes by source (decoded), as lazycaf_blobs_total",
            labels=["source"],
        )
        for label, count_key, bytes_key in _SOURCES:
            blobs.add_metric([label], s[count_key])
            size.add_metric([label], s[bytes_key])
        yield blobs
        yield size
        yield _counter("lazycaf_misses", "Demand reads the cache did not hold", s["misses"])
        failures = CounterMetricFamily(
            "lazycaf_fetch_failures", "Fetches that failed, by cause", labels=["cause"]
        )
        for cause in CAUSES:
            failures.add_metric([cause], s[f"failures_{cause}"])
        yield failures
        yield _counter(
            "lazycaf_peer_served_blobs", "Blobs served to other daemons", s["blobs_to_peers"]
        )
        yield _counter(
            "lazycaf_peer_served_bytes",
            "Bytes (decoded) served to other daemons",
            s["bytes_to_peers"],
        )
        yield _counter("lazycaf_prefetched_blobs", "Blobs fetched by prefetch", s["prefetched"])
        yield _counter(
            "lazycaf_prefetched_bytes", "Bytes fetched by prefetch", s["bytes_prefetched"]
        )
        yield _counter(
            "lazycaf_prefetch_hits", "Prefetched blobs a read later asked for", s["prefetch_hits"]
        )
        yield _gauge(
            "lazycaf_prefetch_wasted_bytes",
            "Prefetched bytes no read asked for (yet)",
            s["prefetch_wasted_bytes"],
        )
        yield _counter(
            "lazycaf_prefetch_bundle_parts",
            "Parts of hot-set bundles streamed whole",
            s["bundle_parts_fetched"],
        )
        yield _counter(
            "lazycaf_prefetch_bundled_blobs",
            "Blobs prefetched from hot-set bundles",
            s["blobs_from_bundles"],
        )
        yield _counter(
            "lazycaf_cache_compressed_later_bytes",
            "Bytes of blobs written plain on a fetch and compressed once fetching went quiet",
            s["compressed_later_bytes"],
        )
        yield _counter(
            "lazycaf_prefetch_bundle_unused_bytes",
            "Bytes of hot-set bundle records not stored (cached, or fetched on their own first)",
            s["bundle_bytes_unused"],
        )
        yield _gauge(
            "lazycaf_prefetch_queued", "Blobs waiting in the prefetch queue", s["prefetch_queued"]
        )
        yield _gauge(
            "lazycaf_reads_in_flight", "Demand reads waiting on a fetch now", s["reads_in_flight"]
        )
        yield _gauge(
            "lazycaf_reads_blocked",
            "Demand reads waiting on a fetch for over 1 s",
            s["reads_blocked"],
        )
        yield _gauge("lazycaf_cache_blobs", "Blobs in the host cache", s["blobs_cached"])
        if self.gc is not None:
            yield _gauge(
                "lazycaf_cache_usage_bytes", "Bytes the host cache's blobs take", s["usage"]
            )
            yield _gauge("lazycaf_cache_budget_bytes", "The host cache's byte budget", s["budget"])
            yield _counter("lazycaf_gc_runs", "GC passes that evicted something", s["gc_runs"])
            yield _counter("lazycaf_gc_evicted_blobs", "Blobs GC evicted", s["gc_evicted"])
            yield _counter("lazycaf_gc_evicted_bytes", "Bytes GC evicted", s["gc_bytes_evicted"])
        if self.peers is not None:
            yield _gauge("lazycaf_peers", "Other daemons in the peer list", s["peers"])
            yield _gauge(
                "lazycaf_peers_up", "Other daemons in the peer list not backed off", s["peers_up"]
            )
        yield from self.service.metrics.read_wait.collect()
        yield from self.service.metrics.fetch_seconds.collect()


def daemon_registry(
    service: FetchService, gc: GarbageCollector | None = None, peers: PeerSet | None = None
) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DaemonCollector(service, gc, peers))
    return registry


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)
