"""Fetch requests accepted by the node (``POST /api/v1/fetch``): durable, so a restart loses none.

One row per request in the ``fetch_requests`` table of the retrieval log's
database (``<state_dir>/retrievals.sqlite``, created if missing).  A request is
``queued`` when accepted, ``running`` while a fetch of
:mod:`segnode.node.sources.fetch_queue` works on it, and ends ``done`` (every
series retrieved; the report kept) or ``failed`` (no matching study, a series
that failed, a source error: the reason kept, with the report when there is
one).  A node that stops with requests ``queued`` or ``running`` takes them up
again when it starts (:meth:`FetchRequests.requeue_interrupted`); ``attempt``
counts the runs, and only the latest run may record the outcome.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import date
from enum import StrEnum
from pathlib import Path

from segnode.errors import StorageError
from segnode.node.sources.record import connect
from segnode.node.sources.source import StudyQuery

_SCHEMA = """
CREATE TABLE IF NOT EXISTS fetch_requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    requested_at REAL NOT NULL,
    by TEXT NOT NULL,
    client TEXT,
    source TEXT NOT NULL,
    request TEXT NOT NULL,
    state TEXT NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 0,
    started_at REAL,
    finished_at REAL,
    report TEXT,
    error TEXT
);
CREATE INDEX IF NOT EXISTS fetch_requests_state ON fetch_requests (state);
"""


class FetchState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class FetchOrder:
    """What was asked: the source, the study query, and optionally a modality and a forced route or profile."""

    source: str
    accession: str | None = None
    study_uid: str | None = None
    patient_id: str | None = None  # kept in the state folder's database, never answered or logged
    since: str | None = None  # YYYY-MM-DD
    modality: str | None = None
    route: str | None = None
    profile: str | None = None

    def query(self) -> StudyQuery:
        """The study query (raises :class:`~segnode.errors.InputError` / ``ValueError`` for a bad one)."""
        return StudyQuery(accession=self.accession, study_uid=self.study_uid, patient_id=self.patient_id,
                          since=date.fromisoformat(self.since) if self.since else None)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: str) -> FetchOrder:
        return cls(**json.loads(raw))


@dataclass(frozen=True)
class FetchRequest:
    """One accepted request and how far it got."""

    id: int
    order: FetchOrder
    by: str
    client: str | None
    state: FetchState
    attempt: int
    requested_at: float
    started_at: float | None = None
    finished_at: float | None = None
    report: dict[str, object] | None = None
    error: str | None = None


class FetchRequests:
    """The ``fetch_requests`` table (one connection per call: safe from any thread)."""

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path, self.clock = Path(path), clock
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._db() as db:
            db.executescript(_SCHEMA)

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        db = connect(self.path, "the fetch requests")
        try:
            yield db
        except sqlite3.Error as exc:
            raise StorageError(f"fetch requests: {exc}", where=str(self.path)) from exc
        finally:
            db.close()

    def add(self, order: FetchOrder, *, by: str, client: str | None) -> FetchRequest:
        """A new request, ``queued``."""
        now = self.clock()
        with self._db() as db:
            cursor = db.execute("INSERT INTO fetch_requests (requested_at, by, client, source, request, state) "
                                "VALUES (?, ?, ?, ?, ?, ?)",
                                (now, by, client, order.source, order.to_json(), FetchState.QUEUED.value))
        return FetchRequest(int(cursor.lastrowid or 0), order, by, client, FetchState.QUEUED, 0, now)

    def get(self, request_id: int) -> FetchRequest | None:
        with self._db() as db:
            row = db.execute("SELECT * FROM fetch_requests WHERE id = ?", (request_id,)).fetchone()
        return None if row is None else _request(row)

    def recent(self, limit: int) -> list[FetchRequest]:
        """The newest ``limit`` requests, newest first."""
        with self._db() as db:
            rows = db.execute("SELECT * FROM fetch_requests ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [_request(r) for r in rows]

    def queued(self) -> list[FetchRequest]:
        """The requests waiting to run, oldest first."""
        with self._db() as db:
            rows = db.execute("SELECT * FROM fetch_requests WHERE state = ? ORDER BY id",
                              (FetchState.QUEUED.value,)).fetchall()
        return [_request(r) for r in rows]

    def requeue_interrupted(self) -> int:
        """Requests left ``running`` by a node that stopped → ``queued`` again; how many."""
        with self._db() as db:
            cursor = db.execute("UPDATE fetch_requests SET state = ? WHERE state = ?",
                                (FetchState.QUEUED.value, FetchState.RUNNING.value))
        return cursor.rowcount

    def start(self, request_id: int) -> int | None:
        """A queued request → ``running``: its attempt number, or ``None`` if it was not queued."""
        with self._db() as db:
            row = db.execute("UPDATE fetch_requests SET state = ?, attempt = attempt + 1, started_at = ? "
                             "WHERE id = ? AND state = ? RETURNING attempt",
                             (FetchState.RUNNING.value, self.clock(), request_id, FetchState.QUEUED.value)).fetchone()
        return None if row is None else int(row["attempt"])

    def finish(self, request_id: int, attempt: int, *, report: dict[str, object] | None,
               error: str | None) -> bool:
        """The outcome of run ``attempt``: ``done`` without ``error``, else ``failed``; False for a stale run."""
        state = FetchState.DONE if error is None else FetchState.FAILED
        with self._db() as db:
            cursor = db.execute("UPDATE fetch_requests SET state = ?, finished_at = ?, report = ?, error = ? "
                                "WHERE id = ? AND attempt = ? AND state = ?",
                                (state.value, self.clock(), None if report is None else json.dumps(report),
                                 error, request_id, attempt, FetchState.RUNNING.value))
        return cursor.rowcount == 1


def _request(row: sqlite3.Row) -> FetchRequest:
    return FetchRequest(row["id"], FetchOrder.from_json(row["request"]), row["by"], row["client"],
                        FetchState(row["state"]), row["attempt"], row["requested_at"], row["started_at"],
                        row["finished_at"], None if row["report"] is None else json.loads(row["report"]),
                        row["error"])
