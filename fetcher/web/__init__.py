"""A small ASGI toolkit shared by the HTTP servers (hypercorn on trio).

``asgi``: serving an app on a bound socket, reading bounded bodies, answering with a status
and a body, bearer-token checks, content negotiation, digests from URL paths.

May import: lazycaf.core.
"""
