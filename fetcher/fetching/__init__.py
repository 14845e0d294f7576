"""Fetching into the host cache: the fetch service and its sources.

``source`` (the ``BlobSource`` protocol every source implements, ``Fetched``),
``sources`` (the CAS source and the tiered source: home peer, then the CAS),
``breaker`` (the CAS source's circuit breaker), ``peersource`` (another host's daemon as a
source: the peer API's client), ``service`` (``ensure``: single flight, priorities,
verification, budget), ``prefetch`` (the queue below on-demand reads), ``recent`` (payloads
kept for peers), ``metrics`` (the service's histograms, failure causes).

May import: lazycaf.core, lazycaf.cas, lazycaf.host, fetcher.cache, fetcher.peers.
"""
