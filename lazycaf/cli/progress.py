"""Progress bars for long commands: one status line on stderr, only on a terminal.

A ``Bar`` is what ``pack``, ``materialize``, ``cache pin``, ``cache gc`` and ``cache
verify`` show while they work. The work reports through plain callbacks (``bar.advance``,
``bar.update``), possibly from worker threads; the bar draws at most ``interval`` apart
(10 Hz), and ``close`` clears its line. It draws nothing when disabled: stderr is not a
terminal, or ``--quiet`` was given. It never writes to stdout, which scripts parse.

Standard library only (no trio): a bar can be fed from any thread.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Callable
from typing import Final, TextIO

from lazycaf.core.sizes import format_size

__all__ = ["Bar", "bar_for", "showing"]

_WIDTH: Final = 24
_CLEAR: Final = "\r\x1b[K"


def showing(args: argparse.Namespace | None = None, stream: TextIO | None = None) -> bool:
    """Whether to draw: ``stream`` (stderr) is a terminal and ``--quiet`` was not given."""
    stream = stream if stream is not None else sys.stderr
    if args is not None and getattr(args, "quiet", False):
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or foreign stream
        return False


class Bar:
    """One operation's status line. Invariants: when disabled, nothing is ever written;
    lines are drawn at least ``interval`` seconds apart, except the first one and one whose
    label changed (a new phase), which are drawn at once; after ``close`` the line is
    cleared and further updates draw nothing."""

    def __init__(
        self,
        label: str,
        *,
        total: int | None = None,
        unit: str = "",
        enabled: bool = True,
        stream: TextIO | None = None,
        interval: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label = label
        self.total = total
        self.unit = unit
        self.done = 0
        self.note = ""
        self._enabled = enabled
        self._stream = stream if stream is not None else sys.stderr
        self._interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._drawn_at: float | None = None
        self._started = clock()

    def advance(self, n: int = 1) -> None:
        """Count ``n`` more units done (a callback for the work)."""
        with self._lock:
            self.done += n
            self._maybe_draw()

    def update(
        self,
        done: int | None = None,
        *,
        total: int | None = None,
        label: str | None = None,
        unit: str | None = None,
        note: str | None = None,
    ) -> None:
        """Set what changed; ``total`` -1 makes the count open-ended (no bar)."""
        with self._lock:
            if done is not None:
                self.done = done
            if total is not None:
                self.total = None if total < 0 else total
            if label is not None and label != self.label:
                self.label = label
                self._drawn_at = None  # a new phase shows at once
            if unit is not None:
                self.unit = unit
            if note is not None:
                self.note = note
            self._maybe_draw()

    def fetched(self, done: int, fetched: int) -> None:
        """``FetcherClient.ensure_all``'s callback: blobs present, how many were fetched."""
        self.update(done, unit="blobs", note=f"{fetched} fetched")

    def close(self) -> None:
        """Clear the line; the bar stays silent from now on."""
        with self._lock:
            if self._enabled and self._drawn_at is not None:
                self._write(_CLEAR)
            self._enabled = False

    def __enter__(self) -> Bar:
        with self._lock:
            self._maybe_draw()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def line(self) -> str:
        """The text drawn (without control characters)."""
        unit = f" {self.unit}" if self.unit and self.unit != "bytes" else ""
        count = self._amount(self.done)
        if self.total:
            share = min(1.0, self.done / self.total)
            filled = round(share * _WIDTH)
            text = (
                f"{self.label} [{'#' * filled}{'.' * (_WIDTH - filled)}] {share:4.0%} "
                f"{count}/{self._amount(self.total)}{unit}"
            )
        else:
            text = f"{self.label}: {count}{unit}" if self.done or self.unit else self.label
            text += f" ({self._clock() - self._started:.0f} s)"
        return f"{text}, {self.note}" if self.note else text

    def _amount(self, n: int) -> str:
        return format_size(n) if self.unit == "bytes" else str(n)

    def _maybe_draw(self) -> None:  # holds the lock
        if not self._enabled:
            return
        now = self._clock()
        if self._drawn_at is not None and now - self._drawn_at < self._interval:
            return
        self._drawn_at = now
        self._write(_CLEAR + self.line())

    def _write(self, text: str) -> None:
        try:
            self._stream.write(text)
            self._stream.flush()
        except (OSError, ValueError):  # stderr went away: the work goes on without a bar
            self._enabled = False


def bar_for(
    args: argparse.Namespace, label: str, *, total: int | None = None, unit: str = ""
) -> Bar:
    """A ``Bar`` on stderr, drawn only when ``showing(args)``."""
    return Bar(label, total=total, unit=unit, enabled=showing(args))
