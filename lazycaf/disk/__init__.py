"""Filesystem calls the standard library lacks (sync code, no trio).

``syncfs`` (one durable flush per filesystem), ``btrfs_encoded`` (writing zstd frames
as Btrfs compressed extents), ``btrfs_compress`` (the compression property, compressing a
file after the fact) and ``readahead`` (asking the kernel to read a file in ahead).

May import: lazycaf.core.
"""
