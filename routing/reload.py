"""Hold the current rules and swap them on reload (SIGHUP), keeping old ones on error.

A :class:`~segnode.routing.matcher.RuleSet` is immutable; reloading builds a new one
and swaps one reference, so an association that is being handled keeps the
rules it started with and none is dropped.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Collection
from pathlib import Path
from typing import Any

from segnode.errors import ConfigError
from segnode.routing.matcher import RuleSet, load_rules

logger = logging.getLogger(__name__)


class RulesHolder:
    """The rules in force; ``path=None`` holds the built-in default rules.

    The first load raises :class:`~segnode.errors.ConfigError` (invalid rules
    fail at start); a failed :meth:`reload` logs the error and keeps the
    previous rules.
    """

    def __init__(
        self,
        path: Path | None,
        *,
        profiles: Collection[str] | None = None,
        destinations: Collection[str] | None = None,
    ) -> None:
        self.path = path
        self._profiles = profiles
        self._destinations = destinations
        self._lock = threading.RLock()  # re-entrant: a SIGHUP may arrive during reload()
        self._current = self._load()

    @property
    def current(self) -> RuleSet:
        return self._current

    def _load(self) -> RuleSet:
        if self.path is None:
            return RuleSet.default()
        return load_rules(self.path, profiles=self._profiles, destinations=self._destinations)

    def reload(self) -> bool:
        """Read the rules file again; ``True`` if the new rules are now in force."""
        with self._lock:
            try:
                new = self._load()
            except ConfigError as exc:
                logger.error("routing rules not reloaded, keeping the previous ones: %s", exc)
                return False
            self._current = new
        logger.info("routing rules reloaded from %s: %d rules", new.source, len(new.rules))
        return True


def install_sighup(holder: RulesHolder) -> Any:
    """Reload ``holder`` on SIGHUP (main thread only); returns the previous handler."""

    def _on_sighup(signum: int, frame: object) -> None:
        holder.reload()

    return signal.signal(signal.SIGHUP, _on_sighup)
