"""The HTTP CAS server (``lazycaf cas serve``).

``app`` (the ASGI app of the CAS HTTP API v1 over a CAS directory) and ``groupcommit``
(concurrent uploads made durable by one ``syncfs``), ``metrics`` (request latency by endpoint
and the server's counters, for Prometheus).

May import: lazycaf.core, lazycaf.cas, lazycaf.disk, fetcher.web.
"""
