"""The retrieval log: which series the node retrieved, from which source, for whom, and how it went.

One row per series retrieve, in ``<state_dir>/retrievals.sqlite`` (WAL; the
node, ``segnode fetch`` and ``segnode reprocess`` may write at once).  The
instances themselves are in the spool and the index like any push; this log
is what marks them as retrieved rather than sent to the node.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from segnode.errors import StorageError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS retrievals (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    source TEXT NOT NULL,
    method TEXT NOT NULL,
    by TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    completed INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    refused INTEGER NOT NULL DEFAULT 0,
    error TEXT
);
CREATE INDEX IF NOT EXISTS retrievals_series ON retrievals (series_uid);
"""


@dataclass(frozen=True)
class Retrieval:
    source: str
    method: str
    by: str
    study_uid: str
    series_uid: str
    completed: int = 0
    failed: int = 0
    refused: int = 0
    error: str | None = None
    at: float = 0.0


def connect(path: Path, what: str) -> sqlite3.Connection:
    """A connection to ``retrievals.sqlite`` (WAL, rows by name); :class:`StorageError` naming ``what`` if it fails."""
    try:
        db = sqlite3.connect(path, timeout=30, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
    except sqlite3.Error as exc:
        raise StorageError(f"cannot open {what}: {exc}", where=str(path)) from exc
    db.row_factory = sqlite3.Row
    return db


class RetrievalLog:
    """Append-only log of retrieves (one connection per call: safe from any thread)."""

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path, self.clock = Path(path), clock
        db = self._db()
        try:
            db.executescript(_SCHEMA)
        finally:
            db.close()

    def _db(self) -> sqlite3.Connection:
        return connect(self.path, "the retrieval log")

    def add(self, entry: Retrieval) -> None:
        db = self._db()
        try:
            db.execute("INSERT INTO retrievals (at, source, method, by, study_uid, series_uid, completed, failed, "
                       "refused, error) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (self.clock(), entry.source, entry.method, entry.by, entry.study_uid, entry.series_uid,
                        entry.completed, entry.failed, entry.refused, entry.error))
        finally:
            db.close()

    def of_series(self, series_uid: str) -> list[Retrieval]:
        """The retrieves of one series, oldest first (empty: it was sent to the node, never retrieved)."""
        db = self._db()
        try:
            rows = db.execute("SELECT * FROM retrievals WHERE series_uid = ? ORDER BY id", (series_uid,)).fetchall()
        finally:
            db.close()
        return [Retrieval(**{k: r[k] for k in r.keys() if k != "id"}) for r in rows]
