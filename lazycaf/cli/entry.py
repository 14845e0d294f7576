"""The ``lazycaf`` command's entry point: a background ``lazycaf mount`` goes to the host's
mount zygote (``lazycaf.cli.zygote_client``) before anything outside the standard library is
imported; every other command, and a mount the zygote cannot take, to ``lazycaf.cli.main``,
whose imports (``argparse``, ``logging``, the parsers: 15-20 ms from a cold page cache) a
zygote mount never pays."""

from __future__ import annotations

import sys

__all__ = ["console_main"]


def console_main() -> None:
    from lazycaf.cli.zygote_client import try_zygote

    argv = sys.argv[1:]
    code = try_zygote(argv)
    if code is None:
        from lazycaf.cli.main import main

        code = main(argv, zygote=False)
    sys.exit(code)
