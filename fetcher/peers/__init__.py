"""The peer side as a client sees it: the peer set and asking peers for blobs.

``peerset`` (members, liveness, each blob's home by rendezvous hashing), ``client`` (the
peer API's client, a ``BlobSource``), ``coverage`` (how much of an executable a cache
holds).

May import: lazycaf.core, lazycaf.cas, lazycaf.traces, fetcher.fetching.source.
"""
