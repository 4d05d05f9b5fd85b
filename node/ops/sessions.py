"""Login sessions of the ops HTTP server (server-side, in memory) and the login throttle.

A session is a random id in an ``HttpOnly; SameSite=Strict`` cookie and a
CSRF token bound to it.  It ends on logout, after ``idle_s`` without a request,
or ``max_s`` after login, whichever comes first; a restart of the node ends
every session (people log in again).

The throttle counts failed logins per user name and per client address:
after ``free`` failures each further attempt waits ``delay_s * 2 ** (n - free)``
seconds (at most ``max_delay_s``); a success clears the user's and the
address's count.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from segnode.node.ops.roles import Principal


@dataclass
class Session:
    sid: str
    csrf: str
    user: Principal
    created_at: float
    seen_at: float

    def csrf_matches(self, candidate: str | None) -> bool:
        return candidate is not None and hmac.compare_digest(candidate.encode("utf-8", "replace"),
                                                             self.csrf.encode("ascii"))


class SessionStore:
    """Sessions by id; thread-safe."""

    def __init__(self, *, idle_s: float, max_s: float, clock: Callable[[], float] = time.time) -> None:
        self.idle_s, self.max_s, self.clock = idle_s, max_s, clock
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def create(self, user: Principal) -> Session:
        now = self.clock()
        session = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32),
                          Principal(user.name, user.roles, "session"), now, now)
        with self._lock:
            self._expire(now)
            self._sessions[session.sid] = session
        return session

    def get(self, sid: str | None) -> Session | None:
        """The live session of ``sid`` (its idle clock restarted), or ``None``."""
        if not sid:
            return None
        now = self.clock()
        with self._lock:
            self._expire(now)
            session = self._sessions.get(sid)
            if session is not None:
                session.seen_at = now
            return session

    def end(self, sid: str) -> None:
        with self._lock:
            self._sessions.pop(sid, None)

    def end_user(self, name: str) -> None:
        with self._lock:
            for sid in [s.sid for s in self._sessions.values() if s.user.name == name]:
                del self._sessions[sid]

    def _expire(self, now: float) -> None:
        for sid in [s.sid for s in self._sessions.values()
                    if now - s.seen_at > self.idle_s or now - s.created_at > self.max_s]:
            del self._sessions[sid]


@dataclass
class _Failures:
    count: int = 0
    last_at: float = 0.0


@dataclass
class LoginThrottle:
    """Failed logins per key (``user:NAME``, ``addr:IP``) and the wait they impose."""

    free: int = 5
    delay_s: float = 1.0
    max_delay_s: float = 900.0
    max_keys: int = 10_000
    clock: Callable[[], float] = time.time
    _failures: dict[str, _Failures] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def wait_s(self, *keys: str) -> float:
        """Seconds before another attempt for any of ``keys`` is heard; 0 when one may try now."""
        now = self.clock()
        with self._lock:
            return max((self._wait(self._failures.get(k), now) for k in keys), default=0.0)

    def failed(self, *keys: str) -> None:
        now = self.clock()
        with self._lock:
            if len(self._failures) > self.max_keys:  # many names tried: forget those long quiet
                for old in [k for k, f in self._failures.items() if now - f.last_at > self.max_delay_s]:
                    del self._failures[old]
            for key in keys:
                entry = self._failures.setdefault(key, _Failures())
                entry.count, entry.last_at = entry.count + 1, now

    def succeeded(self, *keys: str) -> None:
        with self._lock:
            for key in keys:
                self._failures.pop(key, None)

    def _wait(self, entry: _Failures | None, now: float) -> float:
        if entry is None or entry.count < self.free:
            return 0.0
        delay = min(self.max_delay_s, self.delay_s * 2.0 ** (entry.count - self.free))
        return max(0.0, entry.last_at + delay - now)
