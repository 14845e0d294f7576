"""The pure core: the formats every other part speaks.

``errors`` (the error tree), ``digest`` (the ``Digest`` value and hashing), ``manifest``
(manifest format v1: entries, validation, canonical encoding), ``manifestindex`` (a
validated manifest laid out for lookups, what mounts map), ``chunking`` (how files split
into blobs), ``framing`` (blobs as independent zstd frames), ``verified`` (the one function
that checks a blob's bytes against its digest), ``priority`` (demand before prefetch),
``sizes`` (byte sizes for people). No I/O beyond the bytes and files handed in, no trio, no
httpx.

May import: nothing of the project.
"""
