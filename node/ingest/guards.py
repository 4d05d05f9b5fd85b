"""What keeps a receiver's front door open: the accept watchdog and the cap on connections not yet associated.

The DICOM receiver (:mod:`segnode.node.dicom_in.receiver`) and the DICOMweb
listener (:mod:`segnode.node.http_in.dicomweb`) use them:

* :class:`AcceptWatchdog` — an ``accept()`` or thread-start error (EMFILE,
  ENOBUFS, "can't start new thread") is logged, counted and answered with a
  back-off (50 ms doubling to 2 s) instead of ending the accept loop; the
  loop beats a heartbeat on every turn, so ``/readyz`` reports the listener
  as down while accepting fails or the loop is stuck, and up again as soon as
  it serves;
* :class:`PendingGate` — a connection counts as *pending* from ``accept()``
  until its A-ASSOCIATE-RQ has been read (or it ends), its TLS handshake
  included; past
  ``limits.max_pending_connections`` in all, or
  ``limits.max_pending_per_host`` from one host, a new connection is closed
  at once, before a thread or a buffer is spent on it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass

logger = logging.getLogger(__name__)

BACKOFF_FIRST_S = 0.05
BACKOFF_MAX_S = 2.0
#: the accept loop turns at least this often (its poll interval); a heartbeat older than this is a stuck loop.
STUCK_AFTER_S = 10.0


@dataclass(frozen=True)
class ListenerHealth:
    """What the watchdog knows, for ``/readyz`` and metrics."""

    up: bool
    detail: str
    accept_errors: int
    refused_pending: int
    pending: int


class AcceptWatchdog:
    """Counts accept-loop failures, paces retries, and says whether the loop is serving."""

    def __init__(self) -> None:
        self.errors = 0
        self.consecutive = 0
        self.last_error = ""
        self._delay = BACKOFF_FIRST_S
        self._beat = time.monotonic()
        self._lock = threading.Lock()

    def beat(self) -> None:
        """One turn of the loop without an error."""
        self._beat = time.monotonic()
        if self.consecutive:
            logger.warning("accepting connections again after %d failed attempts", self.consecutive)
            with self._lock:
                self.consecutive, self._delay = 0, BACKOFF_FIRST_S

    def failed(self, what: str, exc: BaseException) -> float:
        """Record a failure; return how long to wait before the next attempt."""
        self._beat = time.monotonic()
        with self._lock:
            self.errors += 1
            self.consecutive += 1
            self.last_error = f"{what}: {exc}"
            delay, self._delay = self._delay, min(self._delay * 2, BACKOFF_MAX_S)
        if self.consecutive == 1 or self.consecutive % 100 == 0:
            logger.error("%s failed (%s); retrying in %.2f s (%d in a row)", what, exc, delay, self.consecutive)
        return delay

    def health(self, alive: bool) -> tuple[bool, str]:
        if not alive:
            return False, "the DICOM listener is not running"
        if self.consecutive:
            return False, f"accepting connections fails ({self.last_error}; {self.consecutive} in a row)"
        if time.monotonic() - self._beat > STUCK_AFTER_S:
            return False, f"the accept loop has not turned for {time.monotonic() - self._beat:.0f} s"
        return True, "accepting connections"


class PendingGate:
    """Connections accepted but not yet associated, in all and per sender host."""

    def __init__(self, total: int, per_host: int, what: str = "not yet associated") -> None:
        self.total, self.per_host = total, per_host
        self.what = what  # what the counted connections are, for the log
        self.refused = 0
        self._hosts: Counter[str] = Counter()
        self._count = 0
        self._lock = threading.Lock()

    @property
    def pending(self) -> int:
        return self._count

    def admit(self, host: str) -> PendingSlot | None:
        """A slot for one more pending connection from ``host``, or ``None`` if a cap is reached (counted)."""
        with self._lock:
            if self._count >= self.total or self._hosts[host] >= self.per_host:
                self.refused += 1
                refused = self.refused
            else:
                self._count += 1
                self._hosts[host] += 1
                return PendingSlot(self, host)
        if refused == 1 or refused % 100 == 0:
            logger.warning("refusing connection from %s: %d connections %s (%d refused so far)",
                           host, self._count, self.what, refused)
        return None

    def release(self, host: str) -> None:
        """One pending connection from ``host`` ended (called by its :class:`PendingSlot`, once)."""
        with self._lock:
            self._count -= 1
            self._hosts[host] -= 1
            if not self._hosts[host]:
                del self._hosts[host]


class PendingSlot:
    """One pending connection's place in its :class:`PendingGate`; :meth:`release` is idempotent."""

    def __init__(self, gate: PendingGate, host: str) -> None:
        self._gate: PendingGate | None = gate
        self.host = host

    def release(self) -> None:
        gate, self._gate = self._gate, None
        if gate is not None:
            gate.release(self.host)


def listener_health(watchdog: AcceptWatchdog, gate: PendingGate, alive: bool) -> ListenerHealth:
    up, detail = watchdog.health(alive)
    return ListenerHealth(up, detail, watchdog.errors, gate.refused, gate.pending)
