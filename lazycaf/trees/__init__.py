"""Between trees on disk and the CAS: packing and materializing.

``pack`` (walk, hash, build the manifest, upload what the CAS lacks), ``statcache`` (what
the last pack learned, so the next hashes only what changed), ``materialize`` (a full
ordinary tree from a manifest, reflinked from the host cache).

May import: lazycaf.core, lazycaf.disk, lazycaf.cas, lazycaf.host, lazycaf.builds.
"""
