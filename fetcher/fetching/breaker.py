"""A circuit breaker in front of the daemon's CAS: fail fast while the CAS is down.

A CAS that died costs each request the client's connect retries (about half a second), and
each failed read the kernel's own retry: a tree copied out of a mount whose CAS died moved at
about a file a second. After ``threshold`` consecutive failures (``Unavailable``: refused or
reset connections, timeouts, 5xx) the breaker opens: requests fail at once with
``CasCircuitOpen`` (EIO at the reader) for ``probe_interval`` seconds; then the next request
goes through as the one probe (the others still fail fast while it is out); its success
closes the breaker, its failure opens it for another interval. Any answer from the CAS
(a blob, a 404, bytes that do not verify) counts as success: the CAS is reachable.

States and the one log line each change writes (a request never logs here):

    closed --threshold failures in a row--> open      warning: failing fast, probing
    open   --probe_interval passed-------->  probing  (the next request is the probe)
    probing --the probe succeeded--------->  closed    warning: the CAS answers again
    probing --the probe failed------------>  open      (debug only)

A request cancelled while it was the probe gives the turn to the next request.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

import trio

from lazycaf.core.errors import CasUnavailable, LazyCafError, Unavailable

__all__ = ["CasCircuitOpen", "CircuitBreaker"]

log = logging.getLogger(__name__)

T = TypeVar("T")

THRESHOLD: Final = 3
PROBE_INTERVAL: Final = 1.5


class CasCircuitOpen(CasUnavailable):
    """The breaker is open: the CAS was not asked (the breaker logged why, once)."""


class CircuitBreaker:
    """Guards calls to one CAS (``where`` names it in errors and logs).

    Invariants: ``_open_until is None`` exactly when closed; ``_probing`` only while open,
    and then one call (the probe) is in flight through the breaker.
    """

    def __init__(
        self, where: str, *, threshold: int = THRESHOLD, probe_interval: float = PROBE_INTERVAL
    ) -> None:
        if threshold < 1 or probe_interval <= 0:
            raise ValueError("threshold must be >= 1 and probe_interval > 0")
        self.where = where
        self.threshold = threshold
        self.probe_interval = probe_interval
        self._failures = 0  # consecutive
        self._last_error = ""
        self._open_until: float | None = None
        self._probing = False

    @property
    def is_open(self) -> bool:
        return self._open_until is not None

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """``await fn()`` unless the breaker is open (then raise ``CasCircuitOpen`` at once)."""
        probe = self._admit()
        try:
            result = await fn()
        except Unavailable as exc:
            self._failed(exc, probe)
            raise
        except LazyCafError:  # not found, bytes that do not verify: the CAS answered
            self._succeeded()
            raise
        except BaseException:  # cancelled, or a bug: says nothing about the CAS
            if probe:
                self._probing = False
            raise
        self._succeeded()
        return result

    def _admit(self) -> bool:
        """Whether the call may go (raise if not); True when it is the probe."""
        if self._open_until is None:
            return False
        now = trio.current_time()
        if self._probing or now < self._open_until:
            wait = max(self._open_until - now, 0.0)
            raise CasCircuitOpen(
                self.where,
                f"failing fast after {self._failures} failures in a row "
                f"(last: {self._last_error}); next try in {wait:.1f} s",
            )
        self._probing = True
        return True

    def _failed(self, exc: Unavailable, probe: bool) -> None:
        self._failures += 1
        self._last_error = str(exc)[:300]
        if probe:
            self._probing = False
            self._open_until = trio.current_time() + self.probe_interval
            log.debug("CAS %s still failing: %s", self.where, exc)
        elif self._open_until is None and self._failures >= self.threshold:
            self._open_until = trio.current_time() + self.probe_interval
            log.warning(
                "CAS %s failed %d times in a row (last: %s): failing fetches at once, "
                "trying it again every %.1f s",
                self.where,
                self._failures,
                self._last_error,
                self.probe_interval,
            )

    def _succeeded(self) -> None:
        if self._open_until is not None:
            log.warning("CAS %s answers again: fetching from it", self.where)
        self._failures = 0
        self._open_until = None
        self._probing = False
