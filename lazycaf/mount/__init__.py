"""A mount: the FUSE filesystem over one executable, one process per mount.

``inodes`` (the inode table, pure), ``indexfile`` (the manifest index file a host's
mounts share), ``blobreader`` (a file's bytes: cached blob files, the
daemon on a miss), ``fuse_ops`` (the request handlers: the only ``pyfuse3`` importer),
``recording`` (the mount's side of traces and prefetch), ``importcrawl`` (without a
profile, prefetch by the import graph), ``importscan`` (what a ``.pyc`` imports: the
unprivileged worker), ``elfdeps`` (what the dynamic loader reads of a library),
``root`` (the composition root).

May import: lazycaf.core, lazycaf.disk, lazycaf.cas, lazycaf.host, lazycaf.traces.
"""
