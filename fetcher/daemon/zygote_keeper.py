"""Keep the host's mount zygote (``lazycaf.cli.zygote``) running beside the daemon.

The zygote is the daemon's child: it starts with the daemon, is restarted when it exits (it
retires itself when the code on disk changed; it may crash), at most once per
``_RESTART_S`` so a zygote that cannot start does not spin, and is stopped with the daemon.
Mount processes it forked are not its children for long (each mount is a session leader
whose parent exits once it is ready), so stopping the zygote never unmounts anything.
The zygote's stderr is a pipe whose lines go into the daemon's log (logger ``lazycaf.zygote``).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Final

import trio

from lazycaf.host.paths import zygote_socket

__all__ = ["keep_zygote"]

log = logging.getLogger(__name__)
_zygote_log = logging.getLogger("lazycaf.zygote")
_RESTART_S: Final = 1.0
_MAX_UNIX_PATH: Final = 107  # sun_path holds 108 bytes with its NUL
_STOP_TIMEOUT_S: Final = 8.0  # it drains mounts under way for up to 5 s


async def keep_zygote(
    fetcher_socket: Path, *, task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED
) -> None:
    path = zygote_socket(fetcher_socket)
    task_status.started(path)
    if len(os.fsencode(path)) > _MAX_UNIX_PATH:
        log.warning("no mount zygote: its socket path is too long for AF_UNIX: %s", path)
        return
    cmd = [sys.executable, "-m", "lazycaf.cli.zygote", "--socket", str(path)]
    cmd += ["--parent", str(os.getpid())]
    while True:
        proc = await trio.lowlevel.open_process(
            cmd, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        assert proc.stderr is not None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_relay, proc.stderr)
                code = await proc.wait()
                # its last lines; a mount it forked should not hold the pipe, but bound it
                nursery.cancel_scope.deadline = trio.current_time() + _RESTART_S
        finally:
            if proc.returncode is None:
                with trio.CancelScope(shield=True):
                    proc.terminate()
                    with trio.move_on_after(_STOP_TIMEOUT_S):
                        await _relay(proc.stderr)  # it logs while it drains
                        await proc.wait()
                    if proc.returncode is None:
                        proc.kill()
                        await proc.wait()
            await proc.stderr.aclose()
        log.info("mount zygote exited with %d; starting another", code)
        await trio.sleep(_RESTART_S)


async def _relay(stream: trio.abc.ReceiveStream) -> None:
    """The zygote's stderr, line by line, into this daemon's log: the daemon's log is rotated
    or kept by journald, which a descriptor the zygote inherited would escape."""
    pending = b""
    while chunk := await stream.receive_some(65536):
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            _zygote_log.info("%s", line.decode(errors="replace"))
        pending = pending[-65536:]
    if pending:
        _zygote_log.info("%s", pending.decode(errors="replace"))
