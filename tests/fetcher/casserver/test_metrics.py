"""The CAS server's metrics: requests labelled by endpoint (never by path), timed, counted by
status, served by ``MetricsApp`` from the app's own registry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fetcher.casserver.app import CasApp
from fetcher.casserver.metrics import endpoint_of
from fetcher.casserver.served import ServedDir
from fetcher.web.metrics import MetricsApp
from lazycaf.cas.casdir import CasDir
from lazycaf.core.digest import Digest


async def call(app: Any, method: str, path: str) -> tuple[int, bytes, dict[bytes, bytes]]:
    """One ASGI request without a body; the status, body and headers answered."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": [], "query_string": b""}
    await app(scope, receive, send)
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], body, dict(sent[0]["headers"])


def test_endpoints_are_a_fixed_set_of_labels() -> None:
    hex_ = "ab" * 32
    assert endpoint_of("GET", f"/v1/blobs/{hex_}") == "blob_get"
    assert endpoint_of("HEAD", f"/v1/blobs/{hex_}") == "blob_head"
    assert endpoint_of("PUT", f"/v1/blobs/{hex_}") == "blob_put"
    assert endpoint_of("POST", "/v1/blobs:missing") == "blobs_missing"
    assert endpoint_of("POST", "/v1/blobs:get") == "blobs_get"
    assert endpoint_of("POST", "/v1/blobs:batch") == "blobs_batch"
    assert endpoint_of("GET", "/v1/refs/app/x:v1") == "ref_get"
    assert endpoint_of("PUT", "/v1/refs/app") == "ref_put"
    assert endpoint_of("GET", "/v1/stats") == "stats"
    assert endpoint_of("DELETE", f"/v1/blobs/{hex_}") == "other"
    assert endpoint_of("GET", "/etc/passwd") == "other"


async def test_requests_are_timed_and_counted_by_endpoint_and_status(tmp_path: Path) -> None:
    store = CasDir(tmp_path / "cas")
    data = b"hello metrics\n" * 10
    store.write(Digest.of(data), data)
    app = CasApp(ServedDir(store))
    assert (await call(app, "GET", f"/v1/blobs/{Digest.of(data).hex}"))[0] == 200
    assert (await call(app, "GET", f"/v1/blobs/{Digest.of(b'absent').hex}"))[0] == 404
    assert (await call(app, "GET", "/nowhere"))[0] == 404
    registry = app.metrics.registry

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert value("lazycaf_cas_request_seconds_count", endpoint="blob_get") == 2
    assert value("lazycaf_cas_responses_total", endpoint="blob_get", code="200") == 1
    assert value("lazycaf_cas_responses_total", endpoint="blob_get", code="404") == 1
    assert value("lazycaf_cas_responses_total", endpoint="other", code="404") == 1
    assert value("lazycaf_cas_sent_bytes_total") == len(data)

    status, body, headers = await call(MetricsApp(registry), "GET", "/metrics")
    assert status == 200 and headers[b"content-type"].startswith(b"text/plain")
    assert b'lazycaf_cas_request_seconds_bucket{endpoint="blob_get",le="+Inf"} 2.0' in body
    assert (await call(MetricsApp(registry), "GET", "/v1/stats"))[0] == 404
    assert (await call(MetricsApp(registry), "POST", "/metrics"))[0] == 405
