"""Defaults a host's commands, mounts and daemon share, each defined once here.

Standard library only (the command line's parser reads them before anything heavy is
imported).
"""

from __future__ import annotations

from typing import Final

__all__ = ["BULK_TIMEOUT", "FETCH_TIMEOUT", "PEER_TIMEOUT"]

FETCH_TIMEOUT: Final = 30.0
"""Seconds a read through a mount waits for a blob the cache lacks before it fails with EIO."""

BULK_TIMEOUT: Final = 600.0
"""Seconds one request of a bulk fill (``cache pin``, ``materialize``) may wait for its blob.
A fill of gigabytes keeps the daemon's queue full and its group commits flush gigabytes of
dirty pages: at seed scale (20 GB) single blobs waited over 30 s there, and a pin must not
fail for being big."""

PEER_TIMEOUT: Final = 5.0
"""Seconds one request to another host's daemon may take in all before the CAS is asked."""
