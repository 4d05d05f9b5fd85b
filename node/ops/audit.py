"""The audit log: append-only JSON lines of who sent what, what was decided, what went where.

One record per line, UTF-8, keys sorted::

    {"event": "job.complete", "time": "2025-01-01T12:00:00.123Z", "node": "SEGNODE", "job_id": 4, ...}

What is recorded (``event``):

``job.<state>``          every state change of every job, from the index's
                         ``job_events`` (``index_event`` is its id): the
                         sender (calling/called AE, host), study and series
                         UIDs, instance count and bytes, the routing decision
                         (rule, profile, backend, destinations), the model
                         used and the SEG's UIDs, the reason of a failure, the
                         deliveries' outcome.
``delivery.attempt``     each C-STORE of a result: destination name, AE, host
                         and port, the SEG's SOP Instance UID, ok, message.
``association.rejected`` an association refused: the calling AE, host and
                         the reason (``sender_not_allowed``,
                         ``called_ae_unknown``, ``too_many_associations``, ...).
``instance.refused``     an instance the SCP did not store: sender, the SOP
                         Instance UID of the request, the DIMSE status and its
                         comment (undecodable, invalid UID, too large, disk).

The last two come from the node's typed events (:func:`record_of`).
``api.retry``            a retry asked through the HTTP API, with the client.
``review.decision``      a held job approved or rejected (docs/review.md): the
                         reviewer's name, the comment, the client, the new state.
``fetch.requested``      a study fetch asked through ``POST /api/v1/fetch``: the
                         user, how they logged in, the client, the request's
                         id and source (docs/sources.md).
``audit.opened``         the writer started (and the cursor it resumes at).
``audit.rotated``        first line of a new file after rotation.

No record holds a patient name, patient ID, birth date or any other element
value of the images: :data:`FIELDS` is the closed list of keys a record may
carry, checked on every write.

Durability and ownership
------------------------
One writer per file: the node holds an exclusive ``flock`` on it while it
runs (a second node on the same file refuses to start).  Each record is one
``write`` to a file opened ``O_APPEND``, followed by ``fsync`` when
``audit.fsync`` is ``always`` (the default; records are per series and per
delivery, not per image, so this costs little).  The file is never truncated:
past ``audit.rotate_bytes`` it is renamed ``audit.jsonl.<UTC time>`` and a new
one starts with an ``audit.rotated`` record.  Rotated files are never deleted
by the node; archiving them is the operator's job.

Restart
-------
The :class:`AuditFollower` resumes after the last ``index_event`` found in the
current file, so a restart neither loses nor repeats job records.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from segnode.errors import StorageError
from segnode.node.events import AssociationRejected, InstanceRefused
from segnode.node.events import Event as NodeEvent
from segnode.node.ops.views import Event, OpsDB, StageSpan, stage_spans

logger = logging.getLogger(__name__)

#: every key an audit record may carry; anything else is refused (no PHI by construction).
FIELDS = frozenset({
    "event", "time", "node", "index_event", "job_id", "state", "reason",
    "study_uid", "series_uid", "calling_ae", "called_ae", "host", "instances", "bytes",
    "rule", "profile", "backend", "destinations", "backend_used", "model_version",
    "seg_series_uid", "seg_sop_uid", "deliveries", "destination", "destination_ae", "destination_host",
    "destination_port", "ok", "message", "attempts", "client", "previous", "path", "resumes_after",
    "sop_uid", "status", "decision", "reviewer", "comment",
    "user", "via", "wait_s",  # who acted and how they authenticated (ops/auth.py), a login throttle's wait
})

#: keys allowed inside the ``deliveries`` list of a record.
DELIVERY_FIELDS = frozenset({"destination", "state", "attempts", "delivered_at", "last_error"})


def record_of(event: NodeEvent) -> tuple[str, dict[str, str]] | None:
    """The audit record (``event`` name, fields) of a node event audited as it happens, or ``None``.

    Job events are audited from the index instead (:class:`AuditFollower`),
    deliveries with their destination's address (:mod:`segnode.node.ops.runner`).
    """
    match event:
        case AssociationRejected(calling_ae=calling, host=host, reason=reason):
            return "association.rejected", {"calling_ae": calling, "host": host, "reason": reason.value}
        case InstanceRefused():
            return "instance.refused", {"calling_ae": event.calling_ae, "host": event.host, "sop_uid": event.sop_uid,
                                        "status": f"0x{int(event.status):04X}", "reason": event.comment or event.reason}
    return None


def utc_iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"


class AuditLog:
    """The single writer of one audit file.

    Parameters
    ----------
    path:
        The current file (``audit.jsonl``); its folder is created.
    node:
        Our AE title, written in every record.
    fsync:
        ``True``: each record is on disk before :meth:`write` returns.
    rotate_bytes:
        Size past which the file is renamed and a new one begun.
    clock:
        Source of "now" (POSIX seconds).
    """

    def __init__(self, path: Path, *, node: str, fsync: bool = True, rotate_bytes: int = 64 << 20,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.node = node
        self.fsync = fsync
        self.rotate_bytes = rotate_bytes
        self.clock = clock
        self.records = 0
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = self._open()

    def _open(self) -> int:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        except OSError as exc:
            raise StorageError(f"cannot open the audit log: {exc.strerror}", where=str(self.path)) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise StorageError("the audit log is held by another running node", where=str(self.path)) from exc
            raise StorageError(f"cannot lock the audit log: {exc.strerror}", where=str(self.path)) from exc
        return fd

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)  # releases the flock
                self._fd = -1

    def write(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one record; return it.  Unknown keys raise ``ValueError`` (a programming error)."""
        record = {"event": event, "time": utc_iso(self.clock()), "node": self.node, **fields}
        _check_fields(record)
        line = (json.dumps(record, ensure_ascii=False, sort_keys=True, default=str) + "\n").encode("utf-8")
        with self._lock:
            if self._fd < 0:
                raise StorageError("the audit log is closed", where=str(self.path))
            self._append(line)
            self.records += 1
            if os.fstat(self._fd).st_size >= self.rotate_bytes:
                self._rotate(fields.get("index_event"))
        return record

    def _append(self, line: bytes) -> None:
        try:
            written = os.write(self._fd, line)
            if written != len(line):
                raise StorageError(f"short write to the audit log ({written} of {len(line)} bytes)",
                                   where=str(self.path))
            if self.fsync:
                os.fsync(self._fd)
        except OSError as exc:
            raise StorageError(f"cannot write the audit log: {exc.strerror}", where=str(self.path)) from exc

    def _rotate(self, cursor: int | None) -> None:
        """Rename the full file aside and start a new one (called under the lock)."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self.clock()))
        target = self.path.with_name(f"{self.path.name}.{stamp}")
        n = 1
        while target.exists():
            target = self.path.with_name(f"{self.path.name}.{stamp}.{n}")
            n += 1
        os.rename(self.path, target)
        old = self._fd
        self._fd = self._open()
        os.close(old)
        cursor = cursor if cursor is not None else last_index_event(target)
        record = {"event": "audit.rotated", "time": utc_iso(self.clock()), "node": self.node,
                  "previous": target.name, "index_event": cursor}
        self._append((json.dumps(record, sort_keys=True) + "\n").encode("utf-8"))
        logger.info("audit log rotated to %s", target)


def _check_fields(record: dict[str, Any]) -> None:
    unknown = set(record) - FIELDS
    if unknown:
        raise ValueError(f"audit record {record['event']!r} has keys outside the audit schema: {sorted(unknown)}")
    for item in record.get("deliveries") or ():
        extra = set(item) - DELIVERY_FIELDS
        if extra:
            raise ValueError(f"audit delivery entry has keys outside the audit schema: {sorted(extra)}")


def last_index_event(path: Path, chunk: int = 1 << 20) -> int | None:
    """The highest ``index_event`` in the last ``chunk`` bytes of ``path`` (``None``: none there)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - chunk))
            tail = f.read()
    except FileNotFoundError:
        return None
    for line in reversed(tail.splitlines()):
        try:
            value = json.loads(line).get("index_event")
        except (ValueError, AttributeError):  # a cut first line of the chunk, or a non-object line
            continue
        if isinstance(value, int):
            return value
    return None


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every record of one audit file (for tests and tools)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class AuditFollower:
    """Turns the index's job events into audit records (and stage timings), in a thread.

    Parameters
    ----------
    audit:
        The writer.
    db:
        Read-only view of the index.
    on_spans:
        Called with the stages each batch of events closed (the metrics'
        histograms); optional.
    """

    def __init__(self, audit: AuditLog, db: OpsDB, *, poll_interval_s: float = 0.5,
                 on_spans: Callable[[list[StageSpan]], None] | None = None) -> None:
        self.audit = audit
        self.db = db
        self.poll_interval_s = poll_interval_s
        self.on_spans = on_spans
        self.cursor = last_index_event(audit.path) or 0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._polling = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.audit.write("audit.opened", path=str(self.audit.path), resumes_after=self.cursor,
                         index_event=self.cursor)
        self._thread = threading.Thread(target=self._run, name="segnode-audit", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self.poll()  # whatever happened before the stop is recorded

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wake(self) -> None:
        """Poll now rather than at the next interval."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll()
            except StorageError as exc:  # the index or the audit disk is unavailable: retry next tick
                logger.error("audit follower: %s", exc)
            self._wake.wait(self.poll_interval_s)
            self._wake.clear()

    def poll(self) -> int:
        """Record every job event after the cursor; return how many (one poll at a time)."""
        with self._polling:
            return self._poll()

    def _poll(self) -> int:
        done = 0
        while True:
            events = self.db.events_after(self.cursor)
            if not events:
                return done
            spans = []
            for event in events:
                self.audit.write(f"job.{event.state}", **self._fields(event))
                spans.extend(self._spans(event))
                self.cursor = event.event_id
                done += 1
            if spans and self.on_spans is not None:
                self.on_spans(spans)

    def _spans(self, event: Event) -> list[StageSpan]:
        return stage_spans([event], previous=self.db.event_before(event.job_id, event.event_id))

    def _fields(self, event: Event) -> dict[str, Any]:
        job = self.db.job(event.job_id) or {}
        fields: dict[str, Any] = {"index_event": event.event_id, "job_id": event.job_id, "state": event.state,
                                  "reason": event.reason, "study_uid": job.get("study_uid"),
                                  "series_uid": job.get("series_uid")}
        series = self.db.series(job["series_uid"]) if job.get("series_uid") else None
        if series is not None and event.state in ("received", "complete", "not_routed"):
            fields.update(calling_ae=series["calling_ae"], called_ae=series["called_ae"],
                          host=series["sender_host"])
            if event.state != "received":
                fields.update(instances=series["instance_count"], bytes=series["bytes"])
        if event.state == "complete":
            fields.update(rule=job.get("rule"), profile=job.get("profile"), backend=job.get("backend"),
                          destinations=job.get("destinations"))
        elif event.state == "encoded":
            fields.update(backend_used=job.get("backend_used"), model_version=job.get("model_version"),
                          seg_series_uid=job.get("seg_series_uid"), seg_sop_uid=job.get("seg_sop_uid"))
        elif event.state == "sending":
            fields.update(destinations=job.get("destinations"))
        elif event.state in ("done", "dead_letter"):
            fields.update(seg_sop_uid=job.get("seg_sop_uid"), deliveries=[
                {k: d[k] for k in ("destination", "state", "attempts", "delivered_at", "last_error")}
                for d in self.db.deliveries(event.job_id)])
        return fields
