"""The node's index: SQLite (WAL) of studies, series, instances, jobs and deliveries.

The schema is part of the node's interface: the ops API, metrics and audit log
read it.  Times are POSIX seconds (UTC, ``REAL``).  Tables:

``studies``     one row per Study Instance UID seen.
``series``      one row per Series Instance UID: who sent it (calling/called AE,
                host), how many instances, when the first and last arrived, and
                ``purged_at`` once housekeeping removed its spool folder (a purged
                series received again, fetched or re-sent, starts over: its old
                instance rows go, its instances are new and a new job opens).
``instances``   one row per acknowledged instance; ``path`` is relative to the
                spool root.  A row exists only once the file is durable.
``jobs``        one row per unit of work on a series; ``state`` follows
                :class:`JobState`; the routing decision, the SEG produced and
                the last ``reason`` are kept on the row.  ``result_dir`` is the
                job folder its result was written in; ``seg_path``, the
                ``outputs`` paths and ``delivery_objects.path`` are relative to
                it (:meth:`Job.file` resolves them; rows written before the
                column existed hold absolute paths, which resolve to themselves).
``job_events``  every state change of every job, with its time and reason.
``deliveries``  one row per (job, destination): attempts, next attempt time,
                last error, delivery time.
``delivery_objects`` one row per (job, destination, object): each SEG, RTSTRUCT,
                overlay image or SR the destination takes, with its own state,
                so that a retry re-sends only what was not stored.  The job's
                ``outputs`` column lists every object encoded; ``committed_at``
                is when the destination committed to keep it (Storage Commitment).
``commitments`` one row per Storage Commitment request (Transaction UID) to a
                destination with ``commit: true``: the objects asked for, the
                deadline for the N-EVENT-REPORT and what came of it
                (:class:`CommitmentState`).  While one waits, its delivery is
                ``stored`` (not ``done``): kept here, a restart does not forget it.

Job states::

    received → complete → segmenting → encoded → sending → done
        │                       └→ failed           └→ dead_letter
        └→ not_routed | skipped (a study's series not segmented, with the reason)

    a job with a result → superseded, once a late instance's re-run is encoded

``series.released_at`` is when an association that sent instances of the
series last ended with an A-RELEASE; ``jobs.completion`` the evidence that
completed the series (node/completion.py).

Durability: WAL with ``synchronous=NORMAL``.  A commit survives a crash of
the process at once; after a power loss the last commits may be missing, but
each acknowledged instance is a durable spool file by then (the spool syncs
before the index row is written), and :func:`segnode.storage.recovery.reindex_spool`
re-creates the missing rows at start-up.  Job and delivery changes lost that
way are redone (SEG UIDs are deterministic, so a resend is idempotent).

Size: every query the node runs on a tick or a request is answered through an
index (tests/storage/test_index_scale.py checks the plans), so its cost follows
what it returns, not the size of a year's index (bench/index_scale.py; figures
in docs/reliability.md).  Housekeeping deletes the history (events, deliveries,
delivered objects) of jobs finished longer ago than
``housekeeping.history_retention_s`` (:meth:`Index.prune_history`), keeping
the jobs, series and instances rows, and runs ``PRAGMA optimize``.

A job is created (``received``) by the first instance of a series; a new
instance arriving after the job left ``received`` opens a new job.  On
restart :meth:`Index.recover` returns ``segmenting`` jobs to ``complete``;
every other state resumes by itself.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from segnode.errors import StorageError

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS studies (
    study_uid          TEXT PRIMARY KEY,
    first_received_at  REAL NOT NULL,
    last_received_at   REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS series (
    series_uid         TEXT PRIMARY KEY,
    study_uid          TEXT NOT NULL REFERENCES studies(study_uid),
    modality           TEXT,
    calling_ae         TEXT NOT NULL,
    called_ae          TEXT NOT NULL,
    sender_host        TEXT NOT NULL,
    instance_count     INTEGER NOT NULL DEFAULT 0,
    duplicate_count    INTEGER NOT NULL DEFAULT 0,
    first_received_at  REAL NOT NULL,
    last_received_at   REAL NOT NULL,
    purged_at          REAL,
    released_at        REAL
);
CREATE TABLE IF NOT EXISTS instances (
    sop_uid              TEXT PRIMARY KEY,
    series_uid           TEXT NOT NULL REFERENCES series(series_uid),
    sop_class_uid        TEXT NOT NULL,
    transfer_syntax_uid  TEXT NOT NULL,
    path                 TEXT NOT NULL,
    size_bytes           INTEGER NOT NULL,
    received_at          REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_series ON instances(series_uid);
CREATE INDEX IF NOT EXISTS series_study ON series(study_uid);
CREATE INDEX IF NOT EXISTS series_unpurged ON series(series_uid) WHERE purged_at IS NULL;
CREATE INDEX IF NOT EXISTS studies_last ON studies(last_received_at);
CREATE TABLE IF NOT EXISTS jobs (
    job_id            INTEGER PRIMARY KEY AUTOINCREMENT,
    series_uid        TEXT NOT NULL REFERENCES series(series_uid),
    study_uid         TEXT NOT NULL,
    state             TEXT NOT NULL,
    reason            TEXT,
    rule              TEXT,
    profile           TEXT,
    backend           TEXT,
    destinations      TEXT NOT NULL DEFAULT '[]',
    segment_attempts  INTEGER NOT NULL DEFAULT 0,
    seg_path          TEXT,
    seg_series_uid    TEXT,
    seg_sop_uid       TEXT,
    backend_used      TEXT,
    model_version     TEXT,
    harvest           TEXT,
    options           TEXT NOT NULL DEFAULT '{}',
    outputs           TEXT NOT NULL DEFAULT '[]',
    result_dir        TEXT,
    completion        TEXT,
    created_at        REAL NOT NULL,
    updated_at        REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE INDEX IF NOT EXISTS jobs_series ON jobs(series_uid);
CREATE INDEX IF NOT EXISTS jobs_study ON jobs(study_uid);
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs(state, updated_at);
CREATE TABLE IF NOT EXISTS job_events (
    event_id  INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id    INTEGER NOT NULL REFERENCES jobs(job_id),
    at        REAL NOT NULL,
    state     TEXT NOT NULL,
    reason    TEXT
);
CREATE INDEX IF NOT EXISTS job_events_job ON job_events(job_id);
CREATE TABLE IF NOT EXISTS deliveries (
    job_id           INTEGER NOT NULL REFERENCES jobs(job_id),
    destination      TEXT NOT NULL,
    state            TEXT NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  REAL NOT NULL,
    last_error       TEXT,
    delivered_at     REAL,
    PRIMARY KEY (job_id, destination)
);
CREATE INDEX IF NOT EXISTS deliveries_state ON deliveries(state);
CREATE TABLE IF NOT EXISTS delivery_objects (
    job_id            INTEGER NOT NULL REFERENCES jobs(job_id),
    destination       TEXT NOT NULL,
    sop_instance_uid  TEXT NOT NULL,
    kind              TEXT NOT NULL,
    sop_class_uid     TEXT NOT NULL,
    path              TEXT NOT NULL,
    state             TEXT NOT NULL,
    last_error        TEXT,
    delivered_at      REAL,
    PRIMARY KEY (job_id, destination, sop_instance_uid)
);
CREATE TABLE IF NOT EXISTS commitments (
    transaction_uid   TEXT PRIMARY KEY,
    job_id            INTEGER NOT NULL REFERENCES jobs(job_id),
    destination       TEXT NOT NULL,
    state             TEXT NOT NULL,
    objects           TEXT NOT NULL,
    requested_at      REAL NOT NULL,
    deadline_at       REAL NOT NULL,
    answered_at       REAL,
    detail            TEXT
);
CREATE INDEX IF NOT EXISTS commitments_state ON commitments(state, deadline_at);
CREATE TABLE IF NOT EXISTS expected_moves (
    message_id        INTEGER PRIMARY KEY,
    study_uid         TEXT NOT NULL,
    series_uid        TEXT NOT NULL,
    expires_at        REAL NOT NULL
);
"""


class JobState(str, Enum):
    RECEIVED = "received"
    COMPLETE = "complete"
    SEGMENTING = "segmenting"
    ENCODED = "encoded"
    SENDING = "sending"
    DONE = "done"
    FAILED = "failed"
    DEAD_LETTER = "dead_letter"
    NOT_ROUTED = "not_routed"
    HELD = "held"  # quality checks asked for a review before sending (node/review.py)
    REJECTED = "rejected"  # a reviewer rejected the result: never sent
    SKIPPED = "skipped"  # a study's series not segmented (localizer, not selected, ...): the reason says why
    SUPERSEDED = "superseded"  # a late instance re-opened the series; a newer job's result replaces this one


class DeliveryState(str, Enum):
    PENDING = "pending"
    DONE = "done"
    DEAD = "dead"
    STORED = "stored"  # a delivery: every object stored, the destination's Storage Commitment awaited


class CommitmentState(str, Enum):
    """What came of one Storage Commitment request (``commitments.state``)."""

    WAITING = "waiting"  # N-ACTION sent (or about to be); no N-EVENT-REPORT yet
    COMMITTED = "committed"  # Event Type 1: every object committed
    FAILED = "failed"  # Event Type 2: some objects not committed (they are sent again)
    EXPIRED = "expired"  # no report before the deadline: asked again
    REFUSED = "refused"  # the N-ACTION itself failed (no association, a failure status)


#: a job a rule routed whose result is current or on its way (not failed, superseded, rejected or skipped)
ROUTED = (JobState.COMPLETE, JobState.SEGMENTING, JobState.ENCODED, JobState.SENDING, JobState.DONE, JobState.HELD,
          JobState.DEAD_LETTER)

#: allowed transitions: target state → states it may be entered from.
_FROM: dict[JobState, tuple[JobState, ...]] = {
    JobState.COMPLETE: (JobState.RECEIVED, JobState.SEGMENTING, JobState.FAILED),
    JobState.NOT_ROUTED: (JobState.RECEIVED,),
    JobState.SKIPPED: (JobState.RECEIVED,),
    JobState.SUPERSEDED: (JobState.DONE, JobState.HELD, JobState.ENCODED, JobState.SENDING, JobState.DEAD_LETTER,
                          JobState.FAILED, JobState.COMPLETE, JobState.SEGMENTING),
    JobState.RECEIVED: (JobState.NOT_ROUTED, JobState.SKIPPED),
    JobState.SEGMENTING: (JobState.COMPLETE,),
    JobState.ENCODED: (JobState.SEGMENTING,),
    JobState.FAILED: (JobState.SEGMENTING, JobState.COMPLETE),
    JobState.SENDING: (JobState.ENCODED, JobState.DEAD_LETTER, JobState.HELD),
    JobState.DONE: (JobState.ENCODED, JobState.SENDING, JobState.HELD),
    JobState.HELD: (JobState.ENCODED,),
    JobState.REJECTED: (JobState.HELD,),
    JobState.DEAD_LETTER: (JobState.SENDING,),
}


@dataclass(frozen=True)
class InstanceRecord:
    """What the SCP knows about one received instance."""

    sop_uid: str
    series_uid: str
    study_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    modality: str | None
    path: str  # relative to the spool root
    size_bytes: int
    calling_ae: str
    called_ae: str
    sender_host: str


@dataclass(frozen=True)
class Job:
    job_id: int
    series_uid: str
    study_uid: str
    state: JobState
    reason: str | None
    rule: str | None
    profile: str | None
    backend: str | None
    destinations: tuple[str, ...]
    segment_attempts: int
    seg_path: str | None
    seg_series_uid: str | None
    seg_sop_uid: str | None
    backend_used: str | None
    model_version: str | None
    harvest: str | None
    created_at: float
    updated_at: float
    options: dict[str, Any] = field(default_factory=dict)  # the routing action's other settings
    outputs: list[dict[str, Any]] = field(default_factory=list)  # node.outputs.record of each object encoded
    completion: str | None = None  # the evidence that completed the series (node/completion.py)
    result_dir: str | None = None  # the job folder; result paths are relative to it

    def file(self, name: str) -> Path:
        """A file of the job's result (``seg_path``, an output's or a delivery object's ``path``), to open."""
        return Path(self.result_dir) / name if self.result_dir else Path(name)

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "Job":
        data = dict(row)
        data["state"] = JobState(data["state"])
        data["destinations"] = tuple(json.loads(data["destinations"]))
        data["options"] = json.loads(data.get("options") or "{}")
        data["outputs"] = json.loads(data.get("outputs") or "[]")
        return cls(**data)


@dataclass(frozen=True)
class Delivery:
    job_id: int
    destination: str
    state: DeliveryState
    attempts: int
    next_attempt_at: float
    last_error: str | None
    delivered_at: float | None


@dataclass(frozen=True)
class DeliveryObject:
    """One object of a job (SEG, RTSTRUCT, an overlay image, SR) for one destination."""

    job_id: int
    destination: str
    sop_instance_uid: str
    kind: str
    sop_class_uid: str
    path: str
    state: DeliveryState
    last_error: str | None
    delivered_at: float | None
    committed_at: float | None = None  # the destination committed to keep it (Storage Commitment)


@dataclass(frozen=True)
class ObjectOutcome:
    """The result of one attempt to send one object (:meth:`Index.delivery_result`)."""

    sop_instance_uid: str
    state: DeliveryState
    error: str | None = None


@dataclass(frozen=True)
class SeriesInfo:
    series_uid: str
    study_uid: str
    modality: str | None
    calling_ae: str
    called_ae: str
    sender_host: str
    instance_count: int
    duplicate_count: int
    first_received_at: float
    last_received_at: float
    purged_at: float | None
    released_at: float | None = None  # an association that sent instances of it ended with A-RELEASE


class Index:
    """Thread-safe access to the index database (one connection per thread).

    Parameters
    ----------
    path:
        The SQLite file; created with the schema if missing.
    clock:
        Source of "now" (POSIX seconds); tests pass a fake.
    """

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.clock = clock
        self._local = threading.local()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db().executescript(_SCHEMA)  # idempotent; executescript manages its own transaction
        columns = {row["name"] for row in self._db().execute("PRAGMA table_info(jobs)")}
        if "harvest" not in columns:  # an index made before jobs could be harvested
            self._db().execute("ALTER TABLE jobs ADD COLUMN harvest TEXT")
        if "options" not in columns:  # an index made before routes had options
            self._db().execute("ALTER TABLE jobs ADD COLUMN options TEXT NOT NULL DEFAULT '{}'")
        if "outputs" not in columns:  # an index made before jobs had several output objects
            self._db().execute("ALTER TABLE jobs ADD COLUMN outputs TEXT NOT NULL DEFAULT '[]'")
        if "completion" not in columns:  # an index made before completion on evidence
            self._db().execute("ALTER TABLE jobs ADD COLUMN completion TEXT")
        if "result_dir" not in columns:  # an index made before result paths were relative: they stay absolute
            self._db().execute("ALTER TABLE jobs ADD COLUMN result_dir TEXT")
        if "released_at" not in {row["name"] for row in self._db().execute("PRAGMA table_info(series)")}:
            self._db().execute("ALTER TABLE series ADD COLUMN released_at REAL")
        if "committed_at" not in {row["name"] for row in self._db().execute("PRAGMA table_info(delivery_objects)")}:
            self._db().execute("ALTER TABLE delivery_objects ADD COLUMN committed_at REAL")  # before commitment
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))

    # -- connection ---------------------------------------------------------------
    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            try:
                db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
                db.row_factory = sqlite3.Row
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")  # see the module docstring: durability
                db.execute("PRAGMA foreign_keys=ON")
            except sqlite3.Error as exc:
                raise StorageError(f"cannot open index: {exc}", where=str(self.path)) from exc
            self._local.db = db
        return db

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        db = self._db()
        try:
            db.execute("BEGIN IMMEDIATE")
            yield db
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise StorageError(f"index: {exc}", where=str(self.path)) from exc
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    # -- ingest -------------------------------------------------------------------
    def has_instance(self, sop_uid: str) -> bool:
        row = self._db().execute("SELECT 1 FROM instances WHERE sop_uid = ?", (sop_uid,)).fetchone()
        return row is not None

    def holds_instance(self, sop_uid: str) -> bool:
        """Whether ``sop_uid`` is indexed in a series whose files are still in the spool (a duplicate if stored)."""
        row = self._db().execute("SELECT 1 FROM instances JOIN series USING (series_uid) WHERE sop_uid = ? "
                                 "AND purged_at IS NULL", (sop_uid,)).fetchone()
        return row is not None

    def instance_uids(self) -> set[str]:
        """Every SOP Instance UID in the index."""
        return {r[0] for r in self._db().execute("SELECT sop_uid FROM instances")}

    def known_instances(self, sop_uids: Iterable[str]) -> set[str]:
        """Those of ``sop_uids`` the index has (the start-up spool check: its cost follows the spool's size)."""
        uids, known = list(sop_uids), set[str]()
        for start in range(0, len(uids), _CHUNK):
            chunk = uids[start:start + _CHUNK]
            known.update(r[0] for r in self._db().execute(
                f"SELECT sop_uid FROM instances WHERE sop_uid IN ({','.join('?' * len(chunk))})", chunk))
        return known

    def touch_duplicate(self, series_uid: str) -> None:
        """Count a duplicate for ``series_uid`` (it also restarts the quiet period)."""
        with self._tx() as db:
            db.execute(
                "UPDATE series SET duplicate_count = duplicate_count + 1, last_received_at = ? "
                "WHERE series_uid = ?",
                (self.clock(), series_uid),
            )

    def record_instance(self, rec: InstanceRecord) -> bool:
        """Commit one durable instance; return ``False`` if it was already known.

        Also opens a ``received`` job for the series when none is open.
        """
        return self.record_instances([rec])[0]

    def record_instances(self, records: Sequence[InstanceRecord]) -> list[bool]:
        """Commit durable instances in one transaction (group commit); per record, whether it was new.

        A record whose SOP Instance UID is already known, or repeated earlier
        in ``records``, is ``False``.
        """
        now = self.clock()
        with self._tx() as db:
            return [self._insert_instance(db, rec, now) for rec in records]

    def _insert_instance(self, db: sqlite3.Connection, rec: InstanceRecord, now: float) -> bool:
        if db.execute("SELECT 1 FROM series WHERE series_uid = ? AND purged_at IS NOT NULL",
                      (rec.series_uid,)).fetchone():
            # received again after housekeeping removed its files (fetched again, re-sent): the series
            # starts over, so each of its instances is new again and a new job opens for it
            db.execute("DELETE FROM instances WHERE series_uid = ?", (rec.series_uid,))
            db.execute("UPDATE series SET instance_count = 0 WHERE series_uid = ?", (rec.series_uid,))
        if db.execute("SELECT 1 FROM instances WHERE sop_uid = ?", (rec.sop_uid,)).fetchone():
            return False
        db.execute(
            "INSERT INTO studies VALUES (?, ?, ?) ON CONFLICT(study_uid) "
            "DO UPDATE SET last_received_at = excluded.last_received_at",
            (rec.study_uid, now, now),
        )
        db.execute(
            "INSERT INTO series (series_uid, study_uid, modality, calling_ae, called_ae, sender_host, "
            "instance_count, first_received_at, last_received_at) VALUES (?, ?, ?, ?, ?, ?, 1, ?, ?) "
            "ON CONFLICT(series_uid) DO UPDATE SET instance_count = instance_count + 1, "
            "last_received_at = excluded.last_received_at, purged_at = NULL",
            (rec.series_uid, rec.study_uid, rec.modality, rec.calling_ae, rec.called_ae,
             rec.sender_host, now, now),
        )
        db.execute(
            "INSERT INTO instances VALUES (?, ?, ?, ?, ?, ?, ?)",
            (rec.sop_uid, rec.series_uid, rec.sop_class_uid, rec.transfer_syntax_uid,
             rec.path, rec.size_bytes, now),
        )
        open_job = db.execute(
            "SELECT 1 FROM jobs WHERE series_uid = ? AND state = ?", (rec.series_uid, JobState.RECEIVED.value)
        ).fetchone()
        if open_job is None:
            cur = db.execute(
                "INSERT INTO jobs (series_uid, study_uid, state, created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
                (rec.series_uid, rec.study_uid, JobState.RECEIVED.value, now, now),
            )
            self._event(db, cur.lastrowid, JobState.RECEIVED, "first instance received", now)
        return True

    # -- state machine ------------------------------------------------------------
    @staticmethod
    def _event(db: sqlite3.Connection, job_id: int | None, state: JobState, reason: str | None, now: float) -> None:
        db.execute("INSERT INTO job_events (job_id, at, state, reason) VALUES (?, ?, ?, ?)",
                   (job_id, now, state.value, reason))

    def _move(self, db: sqlite3.Connection, job_id: int, to: JobState, reason: str | None, **fields: object) -> bool:
        now = self.clock()
        sets = "".join(
            f", {name} = {name} + 1" if isinstance(value, _Increment) else f", {name} = ?"
            for name, value in fields.items()
        )
        values = [v for v in fields.values() if not isinstance(v, _Increment)]
        allowed = tuple(s.value for s in _FROM[to])
        cur = db.execute(
            f"UPDATE jobs SET state = ?, reason = ?, updated_at = ?{sets} "
            f"WHERE job_id = ? AND state IN ({','.join('?' * len(allowed))})",
            (to.value, reason, now, *values, job_id, *allowed),
        )
        if cur.rowcount:
            self._event(db, job_id, to, reason, now)
        return bool(cur.rowcount)

    def transition(self, job_id: int, to: JobState, reason: str | None = None, **fields: object) -> bool:
        """Move a job to ``to`` if the state machine allows it; return whether it moved."""
        with self._tx() as db:
            return self._move(db, job_id, to, reason, **fields)

    def due_for_completion(self, quiet_s: float, *, by_study: bool = False) -> list[Job]:
        """``received`` jobs whose series (or study) had no new instance for ``quiet_s``."""
        cutoff = self.clock() - quiet_s
        table, key = ("studies", "study_uid") if by_study else ("series", "series_uid")
        # by study: quiet only if every one of its series is (a duplicate restarts only its series' quiet period)
        every_series = (" AND NOT EXISTS (SELECT 1 FROM series s WHERE s.study_uid = jobs.study_uid "
                        "AND s.last_received_at > ?)") if by_study else ""
        rows = self._db().execute(
            f"SELECT jobs.* FROM jobs JOIN {table} ON {table}.{key} = jobs.{key} "
            f"WHERE jobs.state = ? AND {table}.last_received_at <= ?{every_series} ORDER BY jobs.job_id",
            (JobState.RECEIVED.value, cutoff, *((cutoff,) if by_study else ())),
        ).fetchall()
        return [Job.from_row(r) for r in rows]

    def mark_complete(self, job_id: int, *, rule: str, profile: str, backend: str | None,
                      destinations: tuple[str, ...], harvest: str | None = None,
                      options: dict[str, Any] | None = None, note: str | None = None) -> bool:
        """Routed: ``note`` adds to the reason (why this series was selected, what it supersedes)."""
        reason = f"routed by rule {rule!r}" + (f"; {note}" if note else "")
        return self.transition(job_id, JobState.COMPLETE, reason,
                               **_route_columns(rule, profile, backend, destinations, harvest, options))

    # -- completion on evidence (node/completion.py) ------------------------------
    def mark_released(self, series_uids: Collection[str]) -> None:
        """An association that stored instances of ``series_uids`` ended with an A-RELEASE."""
        if not series_uids:
            return
        now = self.clock()
        with self._tx() as db:
            db.executemany("UPDATE series SET released_at = ? WHERE series_uid = ?",
                           [(now, uid) for uid in series_uids])

    def received_job(self, series_uid: str) -> Job | None:
        """The series' ``received`` job, if one waits (there is at most one: the first instance opens it)."""
        row = self._db().execute("SELECT * FROM jobs WHERE series_uid = ? AND state = ?",
                                 (series_uid, JobState.RECEIVED.value)).fetchone()
        return None if row is None else Job.from_row(row)

    def received_jobs(self) -> list[Job]:
        """Every ``received`` job, oldest first (the completion sweep judges each)."""
        rows = self._db().execute("SELECT * FROM jobs WHERE state = ? ORDER BY job_id", (JobState.RECEIVED.value,))
        return [Job.from_row(r) for r in rows]

    def study_series(self, study_uid: str) -> list[SeriesInfo]:
        rows = self._db().execute("SELECT * FROM series WHERE study_uid = ? ORDER BY first_received_at, series_uid",
                                  (study_uid,))
        return [SeriesInfo(**dict(r)) for r in rows]

    def set_completion(self, job_id: int, evidence: str) -> None:
        """Record which evidence completed the job's series (shown by the job API and status page)."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET completion = ? WHERE job_id = ?", (evidence, job_id))

    def add_complete_job(self, like: Job, *, reason: str, rule: str, profile: str, backend: str | None,
                         destinations: tuple[str, ...], harvest: str | None = None,
                         options: dict[str, Any] | None = None) -> int:
        """A further ``complete`` job on ``like``'s series (one per profile of a multi-profile route)."""
        now = self.clock()
        state = JobState.COMPLETE
        fields = _route_columns(rule, profile, backend, destinations, harvest, options)
        names = ["series_uid", "study_uid", "state", "reason", "completion", "created_at", "updated_at", *fields]
        values = [like.series_uid, like.study_uid, state.value, reason, like.completion, now, now, *fields.values()]
        with self._tx() as db:
            cur = db.execute(f"INSERT INTO jobs ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})", values)
            self._event(db, cur.lastrowid, state, reason, now)
            return int(cur.lastrowid or 0)

    def earlier_results(self, series_uid: str, before_job: int) -> list[Job]:
        """Earlier jobs of a series that produced a result still current (a late instance supersedes them)."""
        current = (JobState.ENCODED, JobState.SENDING, JobState.DONE, JobState.HELD, JobState.DEAD_LETTER)
        rows = self._db().execute(
            f"SELECT * FROM jobs WHERE series_uid = ? AND job_id < ? AND state IN ({','.join('?' * len(current))}) "
            "ORDER BY job_id", (series_uid, before_job, *(s.value for s in current)))
        return [Job.from_row(r) for r in rows]

    def unfinished(self, series_uid: str, before_job: int) -> list[Job]:
        """Earlier jobs of a series still queued or segmenting (a newer job of the series supersedes them too)."""
        rows = self._db().execute(
            "SELECT * FROM jobs WHERE series_uid = ? AND job_id < ? AND state IN (?, ?) ORDER BY job_id",
            (series_uid, before_job, JobState.COMPLETE.value, JobState.SEGMENTING.value))
        return [Job.from_row(r) for r in rows]

    def superseded_by(self, job: Job) -> int | None:
        """The newer job of ``job``'s study that supersedes it and has not failed or ended: its result replaces ``job``'s."""
        row = self._db().execute(
            "SELECT jobs.job_id FROM jobs, json_each(jobs.options, '$.supersedes') AS earlier "
            f"WHERE jobs.study_uid = ? AND jobs.job_id > ? AND jobs.state IN ({','.join('?' * len(ROUTED))}) "
            "AND earlier.value = ? ORDER BY jobs.job_id LIMIT 1",
            (job.study_uid, job.job_id, *(s.value for s in ROUTED), job.job_id)).fetchone()
        return None if row is None else int(row[0])

    def routed_in_study(self, study_uid: str) -> list[Job]:
        """Jobs of a study that a rule routed, result current or on its way (a late series is judged against them)."""
        rows = self._db().execute(
            f"SELECT * FROM jobs WHERE study_uid = ? AND state IN ({','.join('?' * len(ROUTED))}) ORDER BY job_id",
            (study_uid, *(s.value for s in ROUTED)))
        return [Job.from_row(r) for r in rows]

    def claim_next(self) -> Job | None:
        """Atomically move the oldest ``complete`` job to ``segmenting`` and return it.

        A job whose route asks for priors waits until they are looked up (:meth:`awaiting_priors`).
        """
        with self._tx() as db:
            row = db.execute(f"SELECT job_id FROM jobs WHERE state = ? AND NOT ({_AWAITS_PRIORS}) "
                             "ORDER BY job_id LIMIT 1", (JobState.COMPLETE.value,)).fetchone()
            if row is None:
                return None
            self._move(db, row["job_id"], JobState.SEGMENTING, None, segment_attempts=_Increment())
            return Job.from_row(db.execute("SELECT * FROM jobs WHERE job_id = ?", (row["job_id"],)).fetchone())

    def awaiting_priors(self, limit: int = 100) -> list[Job]:
        """``complete`` jobs whose route asks for priors not looked up yet, oldest first (node/sources/prior_lookups.py)."""
        rows = self._db().execute(f"SELECT * FROM jobs WHERE state = ? AND {_AWAITS_PRIORS} ORDER BY job_id LIMIT ?",
                                  (JobState.COMPLETE.value, limit))
        return [Job.from_row(r) for r in rows]

    def record_priors(self, job_id: int, found: Mapping[str, Any]) -> bool:
        """Add a lookup's ``priors_found`` (and ``priors_note``) to a job's options; False if it is no longer complete."""
        with self._tx() as db:
            row = db.execute("SELECT options FROM jobs WHERE job_id = ? AND state = ?",
                             (job_id, JobState.COMPLETE.value)).fetchone()
            if row is None:
                return False
            options = {**json.loads(row["options"] or "{}"), "priors_found": [], **found}
            db.execute("UPDATE jobs SET options = ?, updated_at = ? WHERE job_id = ?",
                       (json.dumps(options, sort_keys=True), self.clock(), job_id))
            return True

    def mark_encoded(self, job_id: int, *, seg_path: str | None, seg_series_uid: str | None,
                     seg_sop_uid: str | None, backend_used: str, model_version: str,
                     hold: str | None = None, warning: str | None = None,
                     outputs: list[dict[str, Any]] | None = None,
                     takes: Mapping[str, Collection[str]] | None = None, result_dir: str | None = None) -> None:
        """Record the SEG, open one delivery per destination, and move on.

        ``hold``: to HELD with this reason (review before send); ``warning``: a QC warning for the reason.
        ``outputs``: every object encoded (:class:`segnode.node.writers.record.EncodedObject`); each destination's
        delivery tracks the objects whose kind it takes (``takes[destination]``; absent: all of them).
        ``result_dir``: the job folder ``seg_path`` and the outputs' paths are relative to.
        """
        now = self.clock()
        with self._tx() as db:
            moved = self._move(db, job_id, JobState.ENCODED, "segmentation encoded", seg_path=seg_path,
                               seg_series_uid=seg_series_uid, seg_sop_uid=seg_sop_uid,
                               backend_used=backend_used, model_version=model_version,
                               outputs=json.dumps(outputs or []), result_dir=result_dir)
            if not moved:
                return
            job = Job.from_row(db.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone())
            db.execute("DELETE FROM delivery_objects WHERE job_id = ?", (job_id,))
            for name in job.destinations:
                db.execute("INSERT OR REPLACE INTO deliveries (job_id, destination, state, attempts, "
                           "next_attempt_at) VALUES (?, ?, ?, 0, ?)", (job_id, name, DeliveryState.PENDING.value, now))
                kinds = None if takes is None or name not in takes else set(takes[name])
                db.executemany(
                    "INSERT OR REPLACE INTO delivery_objects (job_id, destination, sop_instance_uid, kind, "
                    "sop_class_uid, path, state) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(job_id, name, o["sop_instance_uid"], o["kind"], o["sop_class_uid"], o["path"],
                      DeliveryState.PENDING.value) for o in outputs or () if kinds is None or o["kind"] in kinds])
            if hold:
                self._move(db, job_id, JobState.HELD, hold)
            elif job.destinations and seg_path:
                self._move(db, job_id, JobState.SENDING, f"sending to {', '.join(job.destinations)}"
                           + (f" with {warning}" if warning else ""))
            else:
                self._move(db, job_id, JobState.DONE, "no destination" + (f"; {warning}" if warning else ""))

    def approve(self, job_id: int, reviewer: str, comment: str = "") -> JobState | None:
        """A held job's result approved: on to SENDING (DONE without destinations); None if not held."""
        reason = _review_reason("approved", reviewer, comment)
        with self._tx() as db:
            row = db.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            job = Job.from_row(row)
            if job.state is not JobState.HELD:
                return None
            sends = bool(job.destinations and job.seg_path)
            if sends:
                db.execute("UPDATE deliveries SET next_attempt_at = ? WHERE job_id = ? AND state = ?",
                           (self.clock(), job_id, DeliveryState.PENDING.value))
            target = JobState.SENDING if sends else JobState.DONE
            return target if self._move(db, job_id, target, reason) else None

    def reject(self, job_id: int, reviewer: str, comment: str = "") -> JobState | None:
        """A held job's result rejected: REJECTED, never sent; None if not held."""
        with self._tx() as db:
            moved = self._move(db, job_id, JobState.REJECTED, _review_reason("rejected", reviewer, comment))
            return JobState.REJECTED if moved else None

    # -- deliveries ---------------------------------------------------------------
    def due_deliveries(self) -> list[tuple[Job, Delivery]]:
        rows = self._db().execute(
            "SELECT d.* FROM deliveries d JOIN jobs j ON j.job_id = d.job_id "
            "WHERE j.state = ? AND d.state = ? AND d.next_attempt_at <= ? ORDER BY d.next_attempt_at",
            (JobState.SENDING.value, DeliveryState.PENDING.value, self.clock()),
        ).fetchall()
        return [(job, _delivery(r)) for r in rows if (job := self.job(r["job_id"])) is not None]

    def delivery_result(self, job_id: int, destination: str, *, ok: bool, error: str | None = None,
                        retry_at: float | None = None, objects: Collection[ObjectOutcome] = ()) -> None:
        """Record one attempt: delivered, to retry at ``retry_at``, or dead (``retry_at`` None).

        ``objects``: the outcome of each object sent in this attempt (see :meth:`delivery_objects`).
        """
        now = self.clock()
        state = DeliveryState.DONE if ok else (DeliveryState.PENDING if retry_at is not None else DeliveryState.DEAD)
        with self._tx() as db:
            db.executemany(
                "UPDATE delivery_objects SET state = ?, last_error = ?, delivered_at = ? "
                "WHERE job_id = ? AND destination = ? AND sop_instance_uid = ?",
                [(o.state.value, o.error, now if o.state is DeliveryState.DONE else None, job_id, destination,
                  o.sop_instance_uid) for o in objects])
            db.execute(
                "UPDATE deliveries SET state = ?, attempts = attempts + 1, last_error = ?, "
                "next_attempt_at = ?, delivered_at = ? WHERE job_id = ? AND destination = ?",
                (state.value, error, retry_at or now, now if ok else None, job_id, destination),
            )
            self._settle_job(db, job_id, destination, ok, error, now)

    def _settle_job(self, db: sqlite3.Connection, job_id: int, destination: str, ok: bool, error: str | None,
                    now: float) -> None:
        """After a delivery changed: the job is done once every delivery is, dead-lettered once one is dead."""
        states = {r[0] for r in db.execute("SELECT state FROM deliveries WHERE job_id = ?", (job_id,))}
        if states & {DeliveryState.PENDING.value, DeliveryState.STORED.value}:
            if not ok:
                db.execute("UPDATE jobs SET reason = ?, updated_at = ? WHERE job_id = ?",
                           (f"{destination}: {error} (will retry)", now, job_id))
        elif DeliveryState.DEAD.value in states:
            self._move(db, job_id, JobState.DEAD_LETTER, f"{destination}: {error}")
        else:
            self._move(db, job_id, JobState.DONE, "delivered")

    def deliveries(self, job_id: int) -> list[Delivery]:
        rows = self._db().execute("SELECT * FROM deliveries WHERE job_id = ? ORDER BY destination", (job_id,))
        return [_delivery(r) for r in rows]

    def delivery_objects(self, job_id: int, destination: str | None = None) -> list[DeliveryObject]:
        """The objects tracked for a job's deliveries (one destination's, or all), in a stable order."""
        where, args = ("job_id = ?", (job_id,)) if destination is None else (
            "job_id = ? AND destination = ?", (job_id, destination))
        rows = self._db().execute(f"SELECT * FROM delivery_objects WHERE {where} "
                                  "ORDER BY destination, kind, path", args)
        return [DeliveryObject(**{**dict(r), "state": DeliveryState(r["state"])}) for r in rows]

    # -- storage commitment ---------------------------------------------------------
    def request_commitment(self, job_id: int, destination: str, transaction_uid: str,
                           objects: Collection[tuple[str, str]], deadline_at: float,
                           outcomes: Collection[ObjectOutcome] = ()) -> None:
        """Record a try that stored every object and asks for their commitment: the delivery is ``stored``.

        ``objects``: (SOP Class UID, SOP Instance UID) of each object asked for; ``outcomes``: the objects
        sent in this try (as :meth:`delivery_result`).  Recorded before the N-ACTION is sent, so a report
        arriving at once on another association finds its transaction.
        """
        now = self.clock()
        with self._tx() as db:
            _record_outcomes(db, job_id, destination, outcomes, now)
            db.execute("INSERT INTO commitments (transaction_uid, job_id, destination, state, objects, requested_at, "
                       "deadline_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (transaction_uid, job_id, destination, CommitmentState.WAITING.value,
                        json.dumps([list(o) for o in objects]), now, deadline_at))
            db.execute("UPDATE deliveries SET state = ?, attempts = attempts + 1, last_error = NULL, "
                       "next_attempt_at = ? WHERE job_id = ? AND destination = ?",
                       (DeliveryState.STORED.value, deadline_at, job_id, destination))

    # -- C-MOVEs the node asked for (the sources wing): what their sub-operations may store ---------------
    def expect_move(self, study_uid: str, series_uid: str, expires_at: float) -> int:
        """A Message ID for a C-MOVE of one series, free in the whole node (every process shares the index).

        The node's receiver refuses a C-STORE whose Move Originator is the node
        itself unless its Move Originator Message ID is expected here and the
        instance is of that study and series (:meth:`expected_move`).
        """
        with self._tx() as db:
            db.execute("DELETE FROM expected_moves WHERE expires_at < ?", (self.clock(),))
            taken = {row[0] for row in db.execute("SELECT message_id FROM expected_moves")}
            free = next((m for m in range(1, 0x10000) if m not in taken), None)
            if free is None:
                raise StorageError("every C-MOVE Message ID is in use", where=str(self.path))
            db.execute("INSERT INTO expected_moves VALUES (?, ?, ?, ?)", (free, study_uid, series_uid, expires_at))
        return free

    def expected_move(self, message_id: int) -> tuple[str, str] | None:
        """(study, series) the node's C-MOVE ``message_id`` asked for, while it runs; ``None`` otherwise."""
        row = self._db().execute("SELECT study_uid, series_uid FROM expected_moves WHERE message_id = ? "
                                 "AND expires_at >= ?", (message_id, self.clock())).fetchone()
        return None if row is None else (row[0], row[1])

    def end_move(self, message_id: int) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM expected_moves WHERE message_id = ?", (message_id,))

    def commitment(self, transaction_uid: str) -> "Commitment | None":
        row = self._db().execute("SELECT * FROM commitments WHERE transaction_uid = ?", (transaction_uid,)).fetchone()
        return None if row is None else Commitment.from_row(row)

    def commitments(self, job_id: int) -> list["Commitment"]:
        rows = self._db().execute("SELECT * FROM commitments WHERE job_id = ? ORDER BY requested_at", (job_id,))
        return [Commitment.from_row(r) for r in rows]

    def overdue_commitments(self) -> list["Commitment"]:
        """Commitments still waiting whose deadline has passed."""
        rows = self._db().execute("SELECT * FROM commitments WHERE state = ? AND deadline_at <= ? "
                                  "ORDER BY deadline_at", (CommitmentState.WAITING.value, self.clock()))
        return [Commitment.from_row(r) for r in rows]

    def settle_commitment(self, transaction_uid: str, state: CommitmentState, *,
                          failed: Mapping[str, str] | None = None, retry_at: float | None = None,
                          detail: str | None = None) -> bool:
        """What came of a waiting commitment; False (nothing changed) if it is unknown or no longer waiting.

        ``committed``: the delivery is done.  Otherwise it is pending again at ``retry_at`` (dead when
        None): ``failed`` objects (SOP Instance UID → reason) are sent again, the others only asked again.
        """
        now, failed = self.clock(), dict(failed or {})
        with self._tx() as db:
            row = db.execute("SELECT * FROM commitments WHERE transaction_uid = ? AND state = ?",
                             (transaction_uid, CommitmentState.WAITING.value)).fetchone()
            if row is None:
                return False
            found = Commitment.from_row(row)
            db.execute("UPDATE commitments SET state = ?, answered_at = ?, detail = ? WHERE transaction_uid = ?",
                       (state.value, now, detail, transaction_uid))
            if state in (CommitmentState.COMMITTED, CommitmentState.FAILED):
                db.executemany("UPDATE delivery_objects SET committed_at = ? WHERE job_id = ? AND destination = ? "
                               "AND sop_instance_uid = ?", [(now, found.job_id, found.destination, uid)
                                                            for _, uid in found.objects if uid not in failed])
            again = DeliveryState.PENDING if retry_at is not None else DeliveryState.DEAD
            db.executemany("UPDATE delivery_objects SET state = ?, last_error = ?, delivered_at = NULL "
                           "WHERE job_id = ? AND destination = ? AND sop_instance_uid = ?",
                           [(again.value, why, found.job_id, found.destination, uid) for uid, why in failed.items()])
            ok = state is CommitmentState.COMMITTED
            db.execute("UPDATE deliveries SET state = ?, last_error = ?, next_attempt_at = ?, delivered_at = ? "
                       "WHERE job_id = ? AND destination = ?",
                       (DeliveryState.DONE.value if ok else again.value, None if ok else detail, retry_at or now,
                        now if ok else None, found.job_id, found.destination))
            self._settle_job(db, found.job_id, found.destination, ok, detail, now)
        return True

    # -- operator actions and recovery --------------------------------------------
    def retry(self, job_id: int) -> JobState:
        """Put a failed, dead-lettered or not-routed job back in the pipeline; return its new state."""
        job = self.existing_job(job_id)
        with self._tx() as db:
            if job.state is JobState.FAILED:
                self._move(db, job_id, JobState.COMPLETE, "retry requested")
            elif job.state is JobState.DEAD_LETTER:
                db.execute("UPDATE deliveries SET state = ?, attempts = 0, next_attempt_at = ? "
                           "WHERE job_id = ? AND state = ?",
                           (DeliveryState.PENDING.value, self.clock(), job_id, DeliveryState.DEAD.value))
                db.execute("UPDATE delivery_objects SET state = ? WHERE job_id = ? AND state = ?",
                           (DeliveryState.PENDING.value, job_id, DeliveryState.DEAD.value))
                self._move(db, job_id, JobState.SENDING, "retry requested")
            elif job.state is JobState.NOT_ROUTED:
                self._move(db, job_id, JobState.RECEIVED, "re-route requested")
            else:
                raise StorageError(f"job is {job.state.value}; only failed, dead_letter or not_routed "
                                   "jobs can be retried", where=f"job {job_id}")
        return self.existing_job(job_id).state

    def recover(self) -> list[int]:
        """At start-up: jobs interrupted while segmenting go back to ``complete``."""
        with self._tx() as db:
            ids = [r[0] for r in db.execute("SELECT job_id FROM jobs WHERE state = ?", (JobState.SEGMENTING.value,))]
            for job_id in ids:
                self._move(db, job_id, JobState.COMPLETE, "resumed after restart")
        return ids

    # -- queries ------------------------------------------------------------------
    def job(self, job_id: int) -> Job | None:
        row = self._db().execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return Job.from_row(row) if row else None

    def existing_job(self, job_id: int) -> Job:
        """The job ``job_id`` (``StorageError`` when there is none)."""
        job = self.job(job_id)
        if job is None:
            raise StorageError("no such job", where=f"job {job_id}")
        return job

    def jobs(self, state: JobState | None = None, limit: int = 100) -> list[Job]:
        if state is None:
            rows = self._db().execute("SELECT * FROM jobs ORDER BY job_id DESC LIMIT ?", (limit,))
        else:
            rows = self._db().execute("SELECT * FROM jobs WHERE state = ? ORDER BY job_id DESC LIMIT ?",
                                      (JobState(state).value, limit))
        return [Job.from_row(r) for r in rows]

    def newest_done(self, *, since: float, rule: str | None = None) -> list[Job]:
        """The newest ``done`` job per series and profile created since ``since`` (of ``rule``), oldest first."""
        where, args = "state = ? AND created_at >= ?", [JobState.DONE.value, since]
        if rule is not None:
            where, args = where + " AND rule = ?", [*args, rule]
        rows = self._db().execute(f"SELECT * FROM jobs WHERE job_id IN (SELECT MAX(job_id) FROM jobs WHERE {where} "
                                  "GROUP BY series_uid, profile) ORDER BY job_id", args)
        return [Job.from_row(r) for r in rows]

    def events(self, job_id: int) -> list[tuple[float, JobState, str | None]]:
        rows = self._db().execute("SELECT at, state, reason FROM job_events WHERE job_id = ? ORDER BY event_id",
                                  (job_id,))
        return [(r["at"], JobState(r["state"]), r["reason"]) for r in rows]

    def counts(self) -> dict[JobState, int]:
        rows = self._db().execute("SELECT state, COUNT(*) FROM jobs GROUP BY state")
        return {JobState(state): n for state, n in rows}

    def series(self, series_uid: str) -> SeriesInfo | None:
        row = self._db().execute("SELECT * FROM series WHERE series_uid = ?", (series_uid,)).fetchone()
        return SeriesInfo(**dict(row)) if row else None

    def instance_paths(self, series_uid: str) -> list[str]:
        rows = self._db().execute("SELECT path FROM instances WHERE series_uid = ? ORDER BY path", (series_uid,))
        return [r[0] for r in rows]

    def instance_count(self) -> int:
        return self._db().execute("SELECT COUNT(*) FROM instances").fetchone()[0]

    def purgeable_series(self, done_before: float) -> list[SeriesInfo]:
        """Series not yet purged whose latest job is ``done`` since before ``done_before``."""
        rows = self._db().execute(  # driven by the few series not yet purged (series_unpurged), never by jobs
            "SELECT s.* FROM series s WHERE s.purged_at IS NULL AND (SELECT state = ? AND updated_at <= ? "
            "FROM jobs WHERE series_uid = s.series_uid ORDER BY job_id DESC LIMIT 1)",
            (JobState.DONE.value, done_before),
        ).fetchall()
        return [SeriesInfo(**dict(r)) for r in rows]

    def mark_purged(self, series_uid: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE series SET purged_at = ? WHERE series_uid = ?", (self.clock(), series_uid))

    # -- housekeeping of the index itself -----------------------------------------
    def prune_history(self, before: float) -> int:
        """Delete the history of jobs finished before ``before``; return how many jobs' history went.

        A finished job (:data:`FINISHED`) whose last change is older than
        ``before`` loses its ``job_events``, ``deliveries`` and
        ``delivery_objects``; its ``jobs`` row stays (final state, reason, the
        result's UIDs and outputs: what supersession and the API need), and so
        do studies, series and instances.  Jobs waiting for an operator
        (failed, dead-lettered, held) keep everything.  Deleted in transactions
        of :data:`_CHUNK` jobs, so writers wait for one chunk at most.  Only
        jobs finished since the previous prune are looked at (the ``meta`` row
        ``history_pruned_before``).
        """
        row = self._db().execute("SELECT value FROM meta WHERE key = 'history_pruned_before'").fetchone()
        since = float(row[0]) if row else 0.0
        if before <= since:
            return 0
        states = [s.value for s in FINISHED]
        ids = [r[0] for r in self._db().execute(
            f"SELECT job_id FROM jobs WHERE state IN ({','.join('?' * len(states))}) "
            "AND updated_at >= ? AND updated_at < ?", (*states, since, before))]
        for start in range(0, len(ids), _CHUNK):
            chunk = ids[start:start + _CHUNK]
            marks = ",".join("?" * len(chunk))
            with self._tx() as db:
                for table in ("job_events", "delivery_objects", "deliveries"):
                    db.execute(f"DELETE FROM {table} WHERE job_id IN ({marks})", chunk)
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES ('history_pruned_before', ?)", (repr(before),))
        return len(ids)

    def optimize(self) -> None:
        """``PRAGMA optimize`` (bounded by ``analysis_limit``): keeps the planner's statistics current.

        Run after each housekeeping pass.  The node never runs ``VACUUM`` itself
        (it rewrites the whole file under an exclusive lock); pages freed by
        retention are reused (docs/reliability.md, "Index at a year's size").
        """
        db = self._db()
        db.execute(f"PRAGMA analysis_limit={ANALYSIS_LIMIT}")
        db.execute("PRAGMA optimize")


#: job states whose history retention deletes (:meth:`Index.prune_history`): nothing will happen to them
FINISHED = (JobState.DONE, JobState.REJECTED, JobState.SUPERSEDED, JobState.SKIPPED, JobState.NOT_ROUTED)
#: rows per ``IN (...)`` list and jobs per retention transaction
_CHUNK = 500
#: rows ``PRAGMA optimize`` samples per index
ANALYSIS_LIMIT = 1000


class _Increment:
    """Marker for :meth:`Index._move`: add one to the column instead of setting it."""


@dataclass(frozen=True)
class Commitment:
    """One Storage Commitment request (a row of ``commitments``)."""

    transaction_uid: str
    job_id: int
    destination: str
    state: CommitmentState
    objects: tuple[tuple[str, str], ...]  # (SOP Class UID, SOP Instance UID) asked for
    requested_at: float
    deadline_at: float
    answered_at: float | None
    detail: str | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "Commitment":
        data = dict(row)
        data["state"] = CommitmentState(data["state"])
        data["objects"] = tuple((str(c), str(i)) for c, i in json.loads(data["objects"]))
        return cls(**data)


def _record_outcomes(db: sqlite3.Connection, job_id: int, destination: str, objects: Collection[ObjectOutcome],
                     now: float) -> None:
    db.executemany(
        "UPDATE delivery_objects SET state = ?, last_error = ?, delivered_at = ? "
        "WHERE job_id = ? AND destination = ? AND sop_instance_uid = ?",
        [(o.state.value, o.error, now if o.state is DeliveryState.DONE else None, job_id, destination,
          o.sop_instance_uid) for o in objects])


def _delivery(row: sqlite3.Row) -> Delivery:
    data = dict(row)
    data["state"] = DeliveryState(data["state"])
    return Delivery(**data)


#: a job whose route asks for priors that are not looked up yet: not claimed until they are
_AWAITS_PRIORS = "json_extract(options, '$.priors') IS NOT NULL AND json_extract(options, '$.priors_found') IS NULL"


def _route_columns(rule: str, profile: str, backend: str | None, destinations: tuple[str, ...],
                   harvest: str | None, options: dict[str, Any] | None) -> dict[str, Any]:
    """A routing decision as the jobs table stores it."""
    return {"rule": rule, "profile": profile, "backend": backend, "destinations": json.dumps(list(destinations)),
            "harvest": harvest, "options": json.dumps(options or {}, sort_keys=True)}


def _review_reason(verdict: str, reviewer: str, comment: str) -> str:
    return f"{verdict} by {reviewer}" + (f": {comment}" if comment else "")
