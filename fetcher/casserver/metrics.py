"""The CAS server's Prometheus metrics: request latency and answers by endpoint, and its
byte and commit counters (``CasStatistics``) read at scrape time.

Each ``CasApp`` has a registry of its own (never the process-wide default), served by
``lazycaf cas serve --metrics-listen`` (``fetcher.web.metrics.MetricsApp``). Endpoints are a
fixed set of labels (``endpoint_of``), never paths: a digest or ref name in a label would
make one series per blob.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Final

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from fetcher.web.asgi import Message, Scope, Send

if TYPE_CHECKING:
    from fetcher.casserver.app import CasApp

__all__ = ["CasMetrics", "endpoint_of"]

LATENCY_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30,
)  # fmt: skip


def endpoint_of(method: str, path: str) -> str:
    """The label of a request: ``blob_get``, ``blob_head``, ``blob_put``, ``blobs_missing``,
    ``blobs_get``, ``blobs_batch``, ``ref_get``, ``ref_put``, ``stats``, else ``other``."""
    if path.startswith("/v1/blobs/") and method in ("GET", "HEAD", "PUT"):
        return f"blob_{method.lower()}"
    if path in ("/v1/blobs:missing", "/v1/blobs:get", "/v1/blobs:batch") and method == "POST":
        return "blobs_" + path.rpartition(":")[2]
    if path.startswith("/v1/refs/") and method in ("GET", "PUT"):
        return f"ref_{method.lower()}"
    if path == "/v1/stats" and method == "GET":
        return "stats"
    return "other"


class CasMetrics:
    """``measure`` times one request and counts its answer; ``registry`` holds those and a
    collector of the app's counters."""

    def __init__(self, app: CasApp) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.seconds = Histogram(
            "lazycaf_cas_request_seconds",
            "Time the CAS server took to answer a request, by endpoint",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.responses = Counter(
            "lazycaf_cas_responses",
            "Answers of the CAS server by endpoint and status code",
            ["endpoint", "code"],
            registry=self.registry,
        )
        self.registry.register(_CasCollector(app))

    async def measure(
        self, scope: Scope, send: Send, handle: Callable[[Send], Awaitable[None]]
    ) -> None:
        endpoint = endpoint_of(scope["method"], scope["path"])
        status = 0  # no answer started: the client went away, or a bug
        started = time.monotonic()

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await handle(sending)
        finally:
            self.seconds.labels(endpoint).observe(time.monotonic() - started)
            self.responses.labels(endpoint, str(status or "none")).inc()


class _CasCollector(Collector):
    def __init__(self, app: CasApp) -> None:
        self.app = app

    def collect(self) -> Iterator[Metric]:
        stats = self.app.stats
        for name, doc, value in (
            ("lazycaf_cas_sent_bytes", "Body bytes sent (blobs, as stored or decoded)",
             stats.bytes_sent),
            ("lazycaf_cas_received_bytes", "Body bytes received in uploads",
             stats.bytes_received),
            ("lazycaf_cas_blobs_stored", "Blobs newly stored", stats.blobs_stored),
            ("lazycaf_cas_commit_rounds", "syncfs rounds that made uploads durable",
             self.app.store.commit_rounds()),
        ):  # fmt: skip
            yield CounterMetricFamily(name, doc, value=value)
