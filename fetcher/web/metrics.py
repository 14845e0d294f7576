"""``GET /metrics``: a Prometheus registry in the text exposition format (ASGI).

``MetricsApp`` is the app the daemon and the CAS server serve on ``--metrics-listen``;
``answer_metrics`` is the same answer for an app that serves it among its own routes (the
peer API). Collection runs on the event loop: the collectors read in-memory counters owned
by the trio thread, which a worker thread must not read while they change; it costs well
under a millisecond.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from fetcher.web.asgi import HttpError, Receive, Scope, Send, answer_errors, lifespan, respond

__all__ = ["MetricsApp", "answer_metrics"]


async def answer_metrics(send: Send, registry: CollectorRegistry, *, head: bool = False) -> None:
    body = generate_latest(registry)
    await respond(send, 200, body, CONTENT_TYPE_LATEST, head=head, length=len(body))


class MetricsApp:
    """Answers ``GET /metrics`` (and ``HEAD``) from ``registry``; 404 for anything else."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        await answer_errors(send, self._route(scope, send))

    async def _route(self, scope: Scope, send: Send) -> None:
        method, path = scope["method"], scope["path"]
        if path != "/metrics":
            raise HttpError(404, f"no such endpoint: {method} {path} (metrics are on /metrics)")
        if method not in ("GET", "HEAD"):
            raise HttpError(405, f"{method} not allowed on /metrics")
        await answer_metrics(send, self.registry, head=method == "HEAD")
