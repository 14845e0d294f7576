"""A small ASGI toolkit shared by the HTTP servers (hypercorn on trio).

``asgi``: serving an app on a bound socket, reading bounded bodies, answering with a status
and a body, bearer-token checks, content negotiation, digests from URL paths; ``metrics``:
``GET /metrics`` from a Prometheus registry.

May import: lazycaf.core.
"""
