"""The peer set: which daemons share their caches, and what a cache holds.

``peerset`` (members, liveness and back-off, each blob's home by rendezvous hashing) and
``coverage`` (how much of an executable a host cache holds). Asking a peer for blobs is a
source of the fetch service (``fetcher.fetching.peersource``).

May import: lazycaf.core, lazycaf.traces.
"""
