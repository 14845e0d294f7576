"""Filesystem calls the standard library lacks (sync code, no trio).

``syncfs`` (one durable flush per filesystem) and ``btrfs_encoded`` (writing zstd frames
as Btrfs compressed extents).

May import: lazycaf.core.
"""
