"""Read-only views of the index for the ops API, status page, metrics and audit log.

The index schema is part of the node's interface (:mod:`segnode.storage.index`); the
queries here only read it, through their own read-only SQLite connection per
thread (WAL lets them run beside the node's writers).  Nothing here writes.

Stages
------
A job's time is split into four stages, each the time spent in its states:

=========  ===================================  ==========================
stage      job states                           ends when the job enters
=========  ===================================  ==========================
ingest     ``received``                         ``complete``/``not_routed``
queue      ``complete``                         ``segmenting``
segment    ``segmenting``                       ``encoded``/``failed``
dispatch   ``encoded``, ``sending``             ``done``/``dead_letter``
=========  ===================================  ==========================

A stage entered more than once (a retry) adds up.  ``ingest`` includes the
completion quiet period.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segnode.errors import StorageError
from segnode.storage.index import JobState

STAGES = ("ingest", "queue", "segment", "dispatch")

#: job state → the stage it belongs to (terminal states belong to none).
STAGE_OF: dict[str, str] = {
    JobState.RECEIVED.value: "ingest",
    JobState.COMPLETE.value: "queue",
    JobState.SEGMENTING.value: "segment",
    JobState.ENCODED.value: "dispatch",
    JobState.SENDING.value: "dispatch",
}

#: states that need an operator's attention, shown as failures.
FAILURE_STATES = (JobState.FAILED.value, JobState.DEAD_LETTER.value, JobState.NOT_ROUTED.value)


@dataclass(frozen=True)
class Event:
    """One row of ``job_events``."""

    event_id: int
    job_id: int
    at: float
    state: str
    reason: str | None


@dataclass(frozen=True)
class StageSpan:
    """A finished stage of one job: ``seconds`` from entering it to leaving it."""

    job_id: int
    stage: str
    seconds: float
    ended_by: Event


def stage_spans(events: Sequence[Event], previous: Event | None = None) -> list[StageSpan]:
    """The stages that ``events`` (one job, in order) close.

    ``previous`` is the job's event just before ``events[0]``, when the caller
    reads the history in pieces (the audit follower does).
    """
    spans: list[StageSpan] = []
    open_stage, since = (STAGE_OF.get(previous.state), previous.at) if previous else (None, 0.0)
    for event in events:
        stage = STAGE_OF.get(event.state)
        if open_stage is not None and stage != open_stage:
            spans.append(StageSpan(event.job_id, open_stage, max(0.0, event.at - since), event))
        if stage != open_stage:
            open_stage, since = stage, event.at
    return spans


def stage_totals(events: Sequence[Event], now: float | None = None) -> dict[str, float]:
    """Seconds per stage for one job; a stage still open counts up to ``now`` (if given)."""
    totals: dict[str, float] = {}
    for span in stage_spans(events):
        totals[span.stage] = totals.get(span.stage, 0.0) + span.seconds
    if events and now is not None:
        last = events[-1]
        stage = STAGE_OF.get(last.state)
        if stage is not None:
            start = last.at
            for event in reversed(events):  # the stage began at the earliest event of this run of it
                if STAGE_OF.get(event.state) != stage:
                    break
                start = event.at
            totals[stage] = totals.get(stage, 0.0) + max(0.0, now - start)
    return totals


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile (0–1) by the nearest-rank method; ``None`` for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 1))))
    return ordered[rank - 1]


class OpsDB:
    """Read-only queries on the index database at ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._local = threading.local()

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            try:
                db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10, check_same_thread=False)
            except sqlite3.Error as exc:
                raise StorageError(f"cannot open the index read-only: {exc}", where=str(self.path)) from exc
            db.row_factory = sqlite3.Row
            self._local.db = db
        return db

    def query(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        try:
            return self._db().execute(sql, tuple(params)).fetchall()
        except sqlite3.Error as exc:
            raise StorageError(f"index query failed: {exc}", where=str(self.path)) from exc

    def ping(self) -> bool:
        """``True`` if the index answers a query."""
        return bool(self.query("SELECT 1 FROM meta LIMIT 1") is not None)

    # -- jobs ---------------------------------------------------------------------
    def jobs(self, *, state: str | None = None, study_uid: str | None = None, limit: int = 100,
             states: Sequence[str] = ()) -> list[dict[str, Any]]:
        where, params = [], []
        if state is not None:
            where.append("state = ?")
            params.append(state)
        if states:
            where.append(f"state IN ({','.join('?' * len(states))})")
            params.extend(states)
        if study_uid is not None:
            where.append("study_uid = ?")
            params.append(study_uid)
        clause = f"WHERE {' AND '.join(where)} " if where else ""
        rows = self.query(f"SELECT * FROM jobs {clause}ORDER BY job_id DESC LIMIT ?", (*params, limit))
        return [_job(r) for r in rows]

    def job(self, job_id: int) -> dict[str, Any] | None:
        rows = self.query("SELECT * FROM jobs WHERE job_id = ?", (job_id,))
        return _job(rows[0]) if rows else None

    def events_of(self, job_ids: Sequence[int]) -> dict[int, list[Event]]:
        """Events of each job in ``job_ids``, in order."""
        out: dict[int, list[Event]] = {j: [] for j in job_ids}
        for chunk_start in range(0, len(job_ids), 500):
            chunk = job_ids[chunk_start:chunk_start + 500]
            rows = self.query(f"SELECT * FROM job_events WHERE job_id IN ({','.join('?' * len(chunk))}) "
                              "ORDER BY event_id", chunk)
            for r in rows:
                out[r["job_id"]].append(_event(r))
        return out

    def events_after(self, event_id: int, limit: int = 500) -> list[Event]:
        rows = self.query("SELECT * FROM job_events WHERE event_id > ? ORDER BY event_id LIMIT ?", (event_id, limit))
        return [_event(r) for r in rows]

    def event_before(self, job_id: int, event_id: int) -> Event | None:
        rows = self.query("SELECT * FROM job_events WHERE job_id = ? AND event_id < ? ORDER BY event_id DESC "
                          "LIMIT 1", (job_id, event_id))
        return _event(rows[0]) if rows else None

    def last_event_id(self) -> int:
        return int(self.query("SELECT COALESCE(MAX(event_id), 0) FROM job_events")[0][0])

    def deliveries(self, job_id: int) -> list[dict[str, Any]]:
        rows = self.query("SELECT * FROM deliveries WHERE job_id = ? ORDER BY destination", (job_id,))
        return [dict(r) for r in rows]

    def delivery_objects(self, job_id: int) -> list[dict[str, Any]]:
        """Each object of each delivery (SEG, RTSTRUCT, overlay image, SR) with its own state."""
        try:
            rows = self.query("SELECT * FROM delivery_objects WHERE job_id = ? ORDER BY destination, kind, path",
                              (job_id,))
        except StorageError:  # an index older than per-object tracking, not yet opened by the node
            return []
        return [dict(r) for r in rows]

    def counts(self) -> dict[str, int]:
        return {r[0]: r[1] for r in self.query("SELECT state, COUNT(*) FROM jobs GROUP BY state")}

    # -- studies and series -------------------------------------------------------
    def studies(self, limit: int = 100) -> list[dict[str, Any]]:
        rows = self.query("SELECT * FROM studies ORDER BY last_received_at DESC LIMIT ?", (limit,))
        return [dict(r) for r in rows]

    def study(self, study_uid: str) -> dict[str, Any] | None:
        rows = self.query("SELECT * FROM studies WHERE study_uid = ?", (study_uid,))
        return dict(rows[0]) if rows else None

    def series_of(self, study_uids: Sequence[str]) -> list[dict[str, Any]]:
        if not study_uids:
            return []
        rows = self.query(
            "SELECT s.*, (SELECT COALESCE(SUM(size_bytes), 0) FROM instances i WHERE i.series_uid = s.series_uid) "
            f"AS bytes FROM series s WHERE s.study_uid IN ({','.join('?' * len(study_uids))}) "
            "ORDER BY s.first_received_at", study_uids)
        return [dict(r) for r in rows]

    def series(self, series_uid: str) -> dict[str, Any] | None:
        rows = self.query(
            "SELECT s.*, (SELECT COALESCE(SUM(size_bytes), 0) FROM instances i WHERE i.series_uid = s.series_uid) "
            "AS bytes FROM series s WHERE s.series_uid = ?", (series_uid,))
        return dict(rows[0]) if rows else None

    def totals(self) -> dict[str, int]:
        row = self.query("SELECT COUNT(*), COALESCE(SUM(size_bytes), 0) FROM instances")[0]
        return {"instances": int(row[0]), "bytes": int(row[1])}


def _job(row: sqlite3.Row) -> dict[str, Any]:
    data = dict(row)
    data["destinations"] = json.loads(data["destinations"] or "[]")
    return data


def _event(row: sqlite3.Row) -> Event:
    return Event(row["event_id"], row["job_id"], row["at"], row["state"], row["reason"])
