"""Build reproducibility: why two builds of a tree differ, and what ``pack --normalize``
rewrites so that a rebuild of an unchanged revision packs to the same digest.

``pyc`` (the header of a ``.pyc`` file, PEP 552: which source it caches, whether it is still
valid for it, the unchecked hash-based header that replaces a timestamp), ``explain`` (the
cause of a byte difference between two versions of a file: a ``.pyc`` source mtime, an archive
timestamp, an ELF build id, an embedded build path, or other bytes). Pure: bytes in, bytes
and reasons out.

May import: lazycaf.core.
"""
