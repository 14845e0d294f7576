"""A mount: the FUSE filesystem over one executable, one process per mount.

``inodes`` (the inode table, pure), ``blobreader`` (a file's bytes: cached blob files, the
daemon on a miss), ``fuse_ops`` (the request handlers: the only ``pyfuse3`` importer),
``recording`` (the mount's side of traces and prefetch), ``root`` (the composition root),
``zygote`` and ``zygote_client`` (mounts forked by a pre-imported process kept by the
daemon; the client half is standard library only and must stay so).

The package imports nothing itself: ``zygote_client`` runs on the command line's fast path,
before trio or pyfuse3 are imported.

May import: lazycaf.core, lazycaf.cas, lazycaf.host, lazycaf.traces, lazycaf.cli.
"""
