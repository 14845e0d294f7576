"""The host cache on disk and its garbage collection.

``blobcache`` (blob files: staging, verification, atomic publish, reconciliation, the one
owner of the on-disk layout), ``policy`` (what GC evicts and when: pure), ``collector`` (running
GC in the daemon or offline), ``diskusage`` (what the blobs really use on Btrfs).

May import: lazycaf.core, lazycaf.disk, lazycaf.host.
"""
