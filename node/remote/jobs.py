"""Jobs run by remote workers through the broker: the node's side (``broker:`` in the node config).

The index stays the source of truth.  :meth:`RemoteJobs.start_jobs` claims each
``complete`` job (→ ``segmenting``, one more attempt) and publishes a message
(job id, attempt, a per-job token, the node's DICOMweb URL, the job's spec) to
the route's queue with its priority; when the broker cannot take it the job
goes back to ``complete`` and is tried again on the next tick.  A worker
(:mod:`segnode.node.remote.worker`) fetches the series by WADO-RS and posts the result
with that token; :meth:`accept_result` records it once: the first result of
the current attempt moves the job on exactly as a local worker's outcome does
(:meth:`segnode.node.service.Service.finish_job`), later ones — a redelivered message,
a worker thought dead that finished after all — are acknowledged and ignored.
The result is the worker's :class:`~segnode.node.jobs.result.JobResult` as is:
its paths are relative to the job folder, where the posted files are written,
and every file it names must have come with it.
A job with no result within ``broker.result_timeout_s`` is enqueued again.

Tokens are ``job.<id>.<attempt>.<HMAC-SHA256>`` under a secret kept in
``<state_dir>/remote.secret`` (0600): nothing to store per job, and a token
stops working as soon as its attempt is no longer the one the node waits for.
A token also grants the series of the job's priors (``priors_found`` in its
options, looked up before it is published) and, for a prior that is the
node's own earlier result, that result's SEG and summary
(:meth:`RemoteJobs.prior_file`, only from the results folder).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from segnode.errors import ConfigError, InputError, StorageError
from segnode.node.config import NodeConfig
from segnode.node.config.dicomweb import BrokerConfig, Priority
from segnode.node.events import Event, JobMoved
from segnode.node.http_in.base import RunningHTTP
from segnode.node.http_in.dicomweb import JobGrant
from segnode.node.http_in.multipart import Part
from segnode.node.jobs.result import JobResult, job_folder, safe_relative
from segnode.node.jobs.worker import JobOutcome, JobSpec
from segnode.node.remote.broker import TASK, celery_app
from segnode.storage.index import Index, Job, JobState

logger = logging.getLogger(__name__)

MAX_RESULT_FILES = 1000


@dataclass
class InFlight:
    """A job handed to the broker, as the status page and metrics show it."""

    job_id: int
    attempt: int
    queue: str
    priority: str
    enqueued_at: float
    fetched_by: str | None = None
    fetched_at: float | None = None


def _secret(path: Path) -> bytes:
    if not path.is_file():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(32))
    return path.read_text().strip().encode("ascii")


def _priors_found(job: Job) -> list[dict[str, Any]]:
    """The job's priors as the node found them (node/sources/priors.py): in its options when it is published."""
    found = job.options.get("priors_found")
    return [p for p in found if isinstance(p, dict)] if isinstance(found, list) else []


class NodeSide(Protocol):
    """What remote jobs need of the node (:class:`segnode.node.service.Service`)."""

    @property
    def config(self) -> NodeConfig: ...

    @property
    def index(self) -> Index: ...

    @property
    def dicomweb(self) -> RunningHTTP | None: ...

    def job_spec(self, job: Job) -> JobSpec: ...

    def emit(self, event: Event) -> None: ...

    def finish_job(self, job: Job, outcome: JobOutcome, started: float) -> None: ...


class RemoteJobs:
    """Enqueues jobs, grants their tokens, and accepts their results once."""

    def __init__(self, service: NodeSide) -> None:
        self.service = service
        self.config = service.config
        if self.config.broker is None:
            raise ConfigError("remote jobs need the broker: section of the node configuration")
        self.broker: BrokerConfig = self.config.broker
        self.index = service.index
        self.app = celery_app(self.broker.url, self.broker.queues, connect_timeout_s=self.broker.publish_timeout_s)
        self.key = _secret(self.config.state_dir / "remote.secret")
        self.inflight: dict[int, InFlight] = {}
        self._lock = threading.Lock()  # results are accepted one at a time: exactly once
        self._publish_lock = threading.Lock()
        self.counters = {"enqueued": 0, "publish_failures": 0, "results_accepted": 0, "results_ignored": 0,
                         "timeouts": 0}
        self._queues: tuple[float, dict[str, dict[str, int]]] = (0.0, {})
        self._accepted: set[tuple[int, int]] = set()  # (job, attempt) whose result is being recorded or was
        self._publish_after = 0.0  # after a failed publish: back off before claiming again
        self._publish_backoff = 1.0

    def close(self) -> None:
        self.app.close()

    # -- tokens -------------------------------------------------------------------------
    def token(self, job_id: int, attempt: int) -> str:
        mac = hmac.new(self.key, f"{job_id}.{attempt}".encode(), hashlib.sha256).digest()
        return f"job.{job_id}.{attempt}." + base64.urlsafe_b64encode(mac).decode().rstrip("=")

    def grant(self, token: str) -> JobGrant | None:
        """The job a token is for, if its MAC is right (``current``: the node still waits for that attempt)."""
        parts = token.split(".")
        if len(parts) != 4 or len(token) > 200 or not all(p.isascii() and p.isdigit() for p in parts[1:3]):
            return None
        job_id, attempt = int(parts[1]), int(parts[2])
        if not hmac.compare_digest(token.encode("ascii", "replace"), self.token(job_id, attempt).encode()):
            return None
        job = self.index.job(job_id)
        if job is None:
            return None
        current = job.state is JobState.SEGMENTING and job.segment_attempts == attempt
        priors = tuple((str(p.get("study_uid")), str(p.get("series_uid"))) for p in _priors_found(job))
        return JobGrant(job_id, attempt, job.study_uid, job.series_uid, current=current, priors=priors)

    def prior_file(self, grant: JobGrant, number: int, kind: str) -> Path | None:
        """The SEG (``seg``) or summary (``summary``) of the job's prior ``number`` (1-based, in ``priors_found``).

        Only when that prior is the node's own earlier result, and only a file inside the results folder:
        the path is the node's, from the job's options, never one a worker sends.
        """
        job = self.index.job(grant.job_id)
        found = _priors_found(job) if job is not None else []
        if kind not in ("seg", "summary") or not 0 < number <= len(found):
            return None
        name = found[number - 1].get(f"{kind}_path")
        if not isinstance(name, str) or not name:
            return None
        path, root = Path(name).resolve(), self.config.results_dir.resolve()
        return path if root in path.parents and path.is_file() else None

    def fetched(self, grant: JobGrant, worker: str | None) -> None:
        with self._lock:
            flight = self.inflight.get(grant.job_id)
            if flight is not None and flight.attempt == grant.attempt:
                flight.fetched_by, flight.fetched_at = (worker or "?")[:100], time.time()

    # -- enqueue ------------------------------------------------------------------------
    def start_jobs(self) -> None:
        """Enqueue every ``complete`` job; re-enqueue those whose result is overdue."""
        if time.monotonic() < self._publish_after or not self._publish_lock.acquire(blocking=False):
            return
        try:
            self._requeue_overdue()
            while (job := self.index.claim_next()) is not None:
                if not self._publish(job):
                    self._publish_after = time.monotonic() + self._publish_backoff
                    self._publish_backoff = min(self._publish_backoff * 2, 30.0)
                    return
                self._publish_backoff = 1.0
        finally:
            self._publish_lock.release()

    def _route(self, job: Job) -> tuple[str, Priority]:
        queue = job.options.get("queue") or self.broker.default_queue
        priority = Priority(job.options.get("priority") or self.broker.default_priority.value)
        return queue, priority

    def _publish(self, job: Job) -> bool:
        queue, priority = self._route(job)
        if queue not in self.broker.queues:
            reason = f"route asks for queue {queue!r}; the broker has {', '.join(self.broker.queues)}"
            self.index.transition(job.job_id, JobState.FAILED, reason)
            return True
        try:
            spec = self.service.job_spec(job)
        except Exception as exc:  # noqa: BLE001 - job_spec raises SegnodeError; recorded on the job
            self.index.transition(job.job_id, JobState.FAILED, str(exc))
            return True
        message = {"job_id": job.job_id, "attempt": job.segment_attempts, "token": self.token(job.job_id,
                   job.segment_attempts), "node_url": self.node_url(), "study_uid": job.study_uid,
                   "series_uid": job.series_uid, "spec": json.loads(spec.to_json())}
        try:
            self.app.send_task(TASK, kwargs={"message": message}, queue=queue, routing_key=queue,
                               priority=priority.level, retry=True,
                               retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5})
        except Exception as exc:  # noqa: BLE001 - kombu/amqp raise many types for "broker unreachable"
            self.counters["publish_failures"] += 1
            logger.warning("job %d: broker unavailable (%s: %s); it stays complete and is enqueued later",
                           job.job_id, type(exc).__name__, exc)
            self.index.transition(job.job_id, JobState.COMPLETE, "broker unavailable, enqueued again later")
            return False
        with self._lock:
            self.inflight[job.job_id] = InFlight(job.job_id, job.segment_attempts, queue, priority.value, time.time())
        self.counters["enqueued"] += 1
        self.service.emit(JobMoved(job.job_id, JobState.SEGMENTING))
        logger.info("job %d (attempt %d) enqueued on %s, priority %s", job.job_id, job.segment_attempts, queue,
                    priority.value)
        return True

    def _requeue_overdue(self) -> None:
        now = time.time()
        with self._lock:
            overdue = [f for f in self.inflight.values() if now - f.enqueued_at > self.broker.result_timeout_s]
            for flight in overdue:
                del self.inflight[flight.job_id]
        for flight in overdue:
            reason = f"no result from a remote worker within {self.broker.result_timeout_s:.0f} s; enqueued again"
            if self.index.transition(flight.job_id, JobState.COMPLETE, reason):
                self.counters["timeouts"] += 1
                logger.warning("job %d: %s", flight.job_id, reason)

    def node_url(self) -> str:
        dicomweb = self.config.dicomweb
        if dicomweb.public_url:
            return dicomweb.public_url.rstrip("/")
        running = self.service.dicomweb
        return running.url if running is not None else f"http://{dicomweb.host}:{dicomweb.port}"

    # -- results ------------------------------------------------------------------------
    def accept_result(self, grant: JobGrant, parts: Iterator[Part]) -> dict[str, Any]:
        """Record a worker's result once; a later one for the same job is acknowledged and ignored."""
        head = next(parts, None)
        if head is None or head.content_type.value != "application/json":
            raise InputError("the result's first part must be application/json")
        try:
            record = json.loads(bytes(head.body))
        except (ValueError, RecursionError):  # RecursionError: nested too deeply
            raise InputError("the result's first part is not JSON") from None
        if not isinstance(record, dict):
            raise InputError("the result's first part must be a JSON object")
        with self._lock:
            job = self.index.job(grant.job_id)
            if job is None or job.state is not JobState.SEGMENTING or job.segment_attempts != grant.attempt \
                    or (grant.job_id, grant.attempt) in self._accepted:
                for _ in parts:  # read to the end: the worker gets its answer and acknowledges the message
                    pass
                self.counters["results_ignored"] += 1
                state = job.state.value if job else "gone"
                logger.info("job %d: a result for attempt %d ignored (job is %s, attempt %d)", grant.job_id,
                            grant.attempt, state, job.segment_attempts if job else 0)
                return {"accepted": False, "job_id": grant.job_id, "state": state,
                        "reason": "the node has this job's result already, or no longer waits for this attempt"}
            out = job_folder(self.config.results_dir, job.job_id, job.segment_attempts)
            self._write_files(parts, out)
            self._accepted.add((grant.job_id, grant.attempt))  # the state moves on below, outside the lock
            (out / "remote.json").write_text(json.dumps({"worker": str(record.get("worker", "?"))[:100],
                                                          "accepted_at": time.time()}))
            outcome = self._outcome(record, out)
            flight = self.inflight.pop(job.job_id, None)
            self.counters["results_accepted"] += 1
            started = time.monotonic() - (time.time() - flight.enqueued_at if flight else 0.0)
            logger.info("job %d: result accepted from worker %s", job.job_id, str(record.get("worker", "?"))[:100])
        self.service.finish_job(job, outcome, started)
        now = self.index.job(job.job_id)
        return {"accepted": True, "job_id": job.job_id, "state": now.state.value if now else "gone"}

    @staticmethod
    def _outcome(record: dict[str, Any], out: Path) -> JobOutcome:
        """The worker's outcome; a result that is malformed or names a file not sent is a failed job."""
        if record.get("ok") is True:
            try:
                result = JobResult.from_dict(record.get("result"))
                missing = result.missing(out)
                if missing:
                    raise InputError(f"the result names files that were not sent: {', '.join(missing[:5])}")
            except InputError as exc:
                return JobOutcome(False, error_kind="InputError", message=f"remote result refused: {exc}")
            return JobOutcome(True, result=result)
        kind = str(record.get("error_kind") or "RemoteError")[:64]
        return JobOutcome(False, error_kind=kind, message=str(record.get("message") or "")[:2000])

    @staticmethod
    def _write_files(parts: Iterator[Part], out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        for count, part in enumerate(parts, 1):
            if count > MAX_RESULT_FILES or part.too_large:
                raise InputError("too many or too large result files")
            name = safe_relative(part.headers.get("content-location", ""))
            target = out / name
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".part")
            try:
                with open(tmp, "wb") as fh:
                    fh.write(part.body)
                    fh.flush()
                    os.fdatasync(fh.fileno())
                os.replace(tmp, target)
            except OSError as exc:
                raise StorageError(f"cannot write a result file: {exc.strerror}", where=str(target)) from exc
        fd = os.open(out, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- ops --------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """Queues (depth, consumers) and in-flight jobs, for the status page, the API and metrics."""
        with self._lock:
            flights = [vars(f).copy() for f in self.inflight.values()]
        return {"queues": self.queue_depths(), "in_flight": sorted(flights, key=lambda f: f["job_id"]),
                "counters": dict(self.counters)}

    def queue_depths(self, max_age_s: float = 5.0) -> dict[str, dict[str, int]]:
        """Messages ready and consumers per queue (passive declare, cached ``max_age_s``); {} if unreachable."""
        at, cached = self._queues
        if time.monotonic() - at < max_age_s:
            return cached
        depths: dict[str, dict[str, int]] = {}
        try:
            with self.app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=2)
                channel = conn.default_channel
                for name in self.broker.queues:
                    try:
                        _, ready, consumers = channel.queue_declare(name, passive=True)
                    except Exception:  # noqa: BLE001 - not declared yet: no worker or message so far
                        channel = conn.channel()
                        ready, consumers = 0, 0
                    depths[name] = {"ready": int(ready), "consumers": int(consumers)}
        except Exception as exc:  # noqa: BLE001 - the broker is down: the page says so, no exception
            logger.debug("queue depths unavailable: %s", exc)
            depths = {}
        self._queues = (time.monotonic(), depths)
        return depths
