"""The HTTP CAS server (``lazycaf cas serve``).

``app`` (the ASGI app of the CAS HTTP API v1), ``served`` (the store it serves: a CAS
directory or an S3 bucket), ``groupcommit`` (a directory's concurrent uploads made durable by
one ``syncfs``), ``metrics`` (request latency by endpoint
and the server's counters, for Prometheus).

May import: lazycaf.core, lazycaf.cas, lazycaf.disk, fetcher.web.
"""
