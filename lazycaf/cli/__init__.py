"""The ``lazycaf`` command line: ``main(argv) -> int`` and one module per command group.

``entry`` (the command's entry point: a background mount to the zygote before ``main`` is
imported), ``main`` (the parser, error-to-exit-code mapping; standard library only at import
time), ``store`` (pack, ls, cat, diff, cas serve),
``storeadmin`` (cas gc, ref ls, ref rm),
``host`` (mount, umount, stats, fetcher, materialize), ``cache`` (cache status, gc, pin),
``peers`` (affinity), ``profile`` (profile show, save), ``run`` (run, profile record),
``config`` (the config file and ``config show``), ``readouts`` (ls/diff text over manifests,
pure), ``columns`` (the same read-outs straight from a manifest's columns), ``progress``
(progress bars on a terminal), ``tokens`` (bearer tokens read from files), ``service`` (the
systemd units, ``units/``), ``daemonlog`` (where the daemon logs), ``zygote`` and
``zygote_client`` (``lazycaf mount`` forked by a pre-imported process the daemon keeps; the
client half is standard library only and must stay so).

The package imports nothing itself: ``zygote_client`` runs on the command line's fast path,
before trio or pyfuse3 are imported.

The only part of ``lazycaf`` that may import ``fetcher``.

May import: lazycaf, fetcher.
"""
