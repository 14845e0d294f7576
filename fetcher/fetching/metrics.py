"""The fetch service's histograms and the causes its failures are counted by.

``FetchMetrics`` holds the histograms the service observes on the trio thread (one
observation per waiting read or per source request, never per cache hit). They are made
without a registry: the daemon's collector (``fetcher.daemon.metrics``) yields them with its
own counters, so two daemons in one process (tests) never share a sample.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import Histogram

from fetcher.fetching.breaker import CasCircuitOpen
from lazycaf.core.errors import BlobNotFound, CacheFull, IntegrityError, LazyCafError, NotFound

__all__ = ["CAUSES", "FetchMetrics", "failure_cause"]

# Seconds a read may wait: a page-cache-speed answer from a peer up to the fetch timeout (30 s)
WAIT_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
CAUSES: Final = ("not_found", "unavailable", "integrity", "cache_full", "circuit_open")


def failure_cause(exc: LazyCafError) -> str:
    """The label a failed fetch is counted under (one of ``CAUSES``)."""
    if isinstance(exc, BlobNotFound | NotFound):
        return "not_found"
    if isinstance(exc, IntegrityError):
        return "integrity"
    if isinstance(exc, CacheFull):
        return "cache_full"
    if isinstance(exc, CasCircuitOpen):
        return "circuit_open"
    return "unavailable"


class FetchMetrics:
    """``read_wait``: seconds each demand read of this host's mounts waited on a fetch;
    ``fetch_seconds``: seconds each request to a source took, by the answer's origin."""

    def __init__(self) -> None:
        self.read_wait = Histogram(
            "lazycaf_read_wait_seconds",
            "Time reads of this host's mounts were blocked waiting on a fetch",
            buckets=WAIT_BUCKETS,
            registry=None,
        )
        self.fetch_seconds = Histogram(
            "lazycaf_fetch_seconds",
            "Time one request to a source took (a blob, or a group of blobs), by source",
            ["source"],
            buckets=WAIT_BUCKETS,
            registry=None,
        )
