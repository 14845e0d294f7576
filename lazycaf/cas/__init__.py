"""The CAS library: where blobs and refs live, seen from a client.

``api`` (the ``CAS`` interface, ``open_cas``), ``local`` (the embedded local-directory
backend), ``http`` (the HTTP client of the CAS server), ``s3`` (blobs and refs in an S3
bucket, through obstore), ``casdir`` (the directory layout and
its atomic writes, sync code shared with the server), ``refs`` (ref names, compare-and-swap
conditions), ``gc`` (the store GC: mark from the refs, sweep past a grace), ``batch``
(the bodies of the batch endpoints), ``tokens`` (bearer tokens
read from files that only their owner can access) and ``tls`` (which CAs the HTTP clients
trust).

May import: lazycaf.core, lazycaf.disk.
"""
