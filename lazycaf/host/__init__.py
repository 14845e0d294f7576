"""What a host's mounts and its fetcher daemon share.

``paths`` (where a host's state lives: cache directory, sockets; standard library only),
``index`` (the host cache's LMDB index: the only ``lmdb`` importer), ``wire`` (the daemon's
Unix-socket line protocol), ``client`` (the daemon's client, and starting one on
demand) and ``service`` (systemd: readiness, the journal, the cache's service marker;
standard library only).

May import: lazycaf.core.
"""
