"""The ``lazycaf`` command line: ``main(argv) -> int`` and one module per command group.

``main`` (the parser, error-to-exit-code mapping; standard library only at import time so
a ``lazycaf mount`` can reach the zygote fast), ``store`` (pack, ls, cat, diff, cas serve),
``host`` (mount, umount, stats, fetcher, materialize), ``cache`` (cache status, gc, pin),
``peers`` (affinity), ``profile`` (profile record, show, save), ``readouts`` (ls/diff text
over manifests, pure), ``tokens`` (bearer tokens read from files).

The only part of ``lazycaf`` that may import ``fetcher``.

May import: lazycaf, fetcher.
"""
