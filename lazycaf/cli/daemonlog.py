"""Where the fetcher daemon's log goes: stderr under systemd, else a rotated file.

``lazycaf fetcher serve`` logs to stderr when told (``--log-stderr``), when systemd runs it
(journald keeps stderr: ``lazycaf.host.service.under_systemd``), or when given no
``--log-file``; otherwise to that file, rotated at ``MAX_BYTES`` with ``BACKUPS`` old files
kept (``fetcher.log.1`` ...), so a daemon started by a mount (``ensure_daemon`` passes
``--log-file <cache>/fetcher.log``) never grows a file without bound. Descriptor 2 follows
the current file, so tracebacks and anything else written to stderr rotate with it.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
from pathlib import Path
from typing import Final

from lazycaf.host.service import under_systemd

__all__ = ["BACKUPS", "MAX_BYTES", "RotatingStderrLog", "log_to_file_unless_service"]

MAX_BYTES: Final = 4 << 20
BACKUPS: Final = 3
_FORMAT: Final = "%(asctime)s %(name)s %(levelname)s %(message)s"


class RotatingStderrLog(logging.handlers.RotatingFileHandler):
    """A ``RotatingFileHandler`` that points descriptor 2 at the file it writes to now."""

    def _open(self):  # type: ignore[no-untyped-def]  # typeshed types it loosely too
        stream = super()._open()
        stream.flush()
        os.dup2(stream.fileno(), 2)
        return stream


def log_to_file_unless_service(log_file: Path | None, *, force_stderr: bool) -> Path | None:
    """Send the root logger's records to ``log_file`` (rotated) unless stderr is the place;
    returns the file used, or None for stderr."""
    if force_stderr or log_file is None or under_systemd():
        return None
    log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = RotatingStderrLog(log_file, maxBytes=MAX_BYTES, backupCount=BACKUPS)
    handler.setFormatter(logging.Formatter(_FORMAT))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)  # the level stays what the command line chose
    return log_file
