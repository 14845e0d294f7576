"""Fetching into the host cache: the fetch service and its sources.

``source`` (the ``BlobSource`` protocol, ``Priority``, ``Fetched``), ``sources`` (the tiered
source: home peer, then the CAS), ``service`` (``ensure``: single flight, priorities, budget),
``prefetch`` (the queue below on-demand reads), ``recent`` (payloads kept for peers).

May import: lazycaf.core, lazycaf.cas, fetcher.cache, fetcher.peers.
"""
