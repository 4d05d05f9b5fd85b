"""The node process: SCP, completion sweep, worker processes, dispatch, housekeeping.

Data flows one way through the index (:mod:`segnode.storage.index`):

1. the receiver (:mod:`segnode.node.dicom_in.server`) spools instances and opens ``received`` jobs;
2. the completion sweep, on evidence or after the quiet period, selects and
   routes each series (:mod:`segnode.node.sweep`) → ``complete`` (or
   ``skipped``, ``not_routed``);
3. the job starter claims ``complete`` jobs (→ ``segmenting``) and runs each in
   its own process (:mod:`segnode.node.jobs.worker`) → ``encoded`` or ``failed``;
4. each destination's delivery queue sends it the objects it takes (SEG,
   RTSTRUCT, overlay, SR), tracked one by one, with retries and backoff
   (:mod:`segnode.node.sending.queues`, policy in :mod:`segnode.node.dispatch`)
   → ``done`` or ``dead_letter``; a destination that is down or slow delays
   only its own deliveries, and accepting a result never waits on a send;
5. housekeeping removes spooled series some time after their job is done.

APScheduler drives 2–5 on intervals; a finished step also triggers the next
one directly, so latency does not wait for a tick.  Anything acknowledged but
unfinished resumes on restart, because every step reads its work from the
index.  Listeners (:attr:`Service.listeners`, :class:`segnode.node.events.EventSink`)
receive the node's typed events (:mod:`segnode.node.events`) for an ops API,
metrics or an audit log; :meth:`Service.emit` is how other parts emit into them.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from apscheduler.schedulers.background import BackgroundScheduler
from segnode.errors import ConfigError, SegnodeError
from segnode.node.config import NodeConfig
from segnode.node.config.datasets import dataset_store_root
from segnode.node.corrections import Corrections
from segnode.node.dicom_in.processes import ReceiverPool
from segnode.node.dicom_in.server import RunningSCP, start_scp
from segnode.node.dispatch import encoded_kinds
from segnode.node.events import Event, EventSink, Harvested, JobMoved
from segnode.node.jobs.result import job_folder
from segnode.node.jobs.worker import JobOutcome, JobSpec, WorkerPool, run_job
from segnode.node.review import decide
from segnode.node.sending.queues import Senders
from segnode.node.sources.prior_lookups import PriorLookups
from segnode.node.supersede import supersede_options
from segnode.node.sweep import CompletionSweep
from segnode.output_kinds import REJECTION_NOTE, encoded_with
from segnode.routing.rules import QcPolicy
from segnode.storage.index import Index, Job, JobState
from segnode.storage.recovery import reindex_spool
from segnode.storage.spool import Spool

if TYPE_CHECKING:  # imported when configured (start-up cost)
    from segnode.node.http_in.dicomweb import RunningDicomWeb
    from segnode.node.remote.jobs import RemoteJobs
    from segnode.routing import RulesHolder

logger = logging.getLogger(__name__)

SENDER = "@sender"


def _rules_holder(config: NodeConfig) -> RulesHolder:
    from segnode.profiles.loader import profile_paths
    from segnode.routing import RulesHolder

    return RulesHolder(config.routes, profiles=tuple(profile_paths()),
                       destinations=tuple(d.name for d in config.destinations))


def private_state_dir(folder: Path) -> None:
    """Create the state folder for its owner only; warn if an existing one lets others in.

    It holds the spool, that is patient data as received.
    """
    if not folder.exists():
        folder.mkdir(parents=True, mode=0o700)
        folder.chmod(0o700)  # mkdir's mode is filtered by the umask
        return
    mode = folder.stat().st_mode & 0o777
    if mode & 0o077:
        logger.warning("state folder %s (spool with patient data) is open to other users (mode %03o); "
                       "chmod 700 it", folder, mode)


class Service:
    """Everything ``segnode serve`` runs, in one object (also used by tests in-process)."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        private_state_dir(config.state_dir)
        self.spool = Spool(config.spool_dir)
        self.index = Index(config.index_path)
        self.rules = _rules_holder(config)
        self._completion = CompletionSweep(config, self.index, self.spool, self.rules, self.emit,
                                           self._resolve_destinations)
        self.listeners: list[EventSink] = []
        self.scp: RunningSCP | None = None
        self.receivers: ReceiverPool | None = None
        self.remote: RemoteJobs | None = None  # when `broker:` is configured (docs/scaling.md)
        self.dicomweb: RunningDicomWeb | None = None  # when `dicomweb.enabled`
        self.prior_lookups: PriorLookups | None = None  # routes with priors: looked up before a job is claimed
        self._pool = ThreadPoolExecutor(max_workers=config.worker.concurrency, thread_name_prefix="segnode-job")
        self.workers = WorkerPool()  # local worker processes, each started when a job first needs it
        self._running = 0
        self._lock = threading.Lock()
        self.senders = Senders(config, self.index, self.emit)  # a queue and thread(s) per destination
        self.corrections = Corrections(config, self.index, self.spool, self.emit)  # a SEG stored back (docs/review.md)
        self._scheduler = BackgroundScheduler(job_defaults={"coalesce": True, "max_instances": 1})

    # -- life cycle -------------------------------------------------------------------
    def start(self) -> int:
        """Recover, listen, schedule; return the SCP's port."""
        self.spool.clean_partial()
        reindex_spool(self.spool, self.index, called_ae=self.config.ae_title)
        for job_id in self.index.recover():
            logger.info("job %d was interrupted while segmenting; it will run again", job_id)
        extra = self.config.limits.receiver_processes - 1
        self.scp = start_scp(self.config, self.spool, self.index, self.emit, reuse_port=extra > 0)
        self.scp.handler.corrections = self.corrections
        self.prior_lookups = PriorLookups(self.config, self.index, self.spool, self.scp.handler, self.start_jobs)
        if extra:
            self.receivers = ReceiverPool(self.config, self.scp, extra)
            self.receivers.start()
        self._start_scaleout()  # before the scheduler: start_jobs must see `remote` from its first call
        self.senders.start()
        every = self._scheduler.add_job
        every(self.sweep_completion, "interval", seconds=self.config.completion.sweep_interval_s, id="completion")
        every(self.start_jobs, "interval", seconds=1.0, id="jobs")
        every(self.dispatch_due, "interval", seconds=self.config.dispatch.poll_interval_s, id="dispatch")
        every(self.housekeeping, "interval", seconds=self.config.housekeeping.interval_s, id="housekeeping")
        self._scheduler.start()
        (self.config.state_dir / "segnode.pid").write_text(f"{os.getpid()}\n")
        self.start_jobs()  # resume at once what a restart left
        return self.scp.port

    def _start_scaleout(self) -> None:
        """Remote workers through the broker, and the DICOMweb server (node/remote/jobs.py, node/http_in/dicomweb.py)."""
        if self.config.broker is not None:
            from segnode.node.remote.jobs import RemoteJobs

            self.remote = RemoteJobs(self)
        if self.config.dicomweb.enabled:
            from segnode.node.http_in.dicomweb import start_for_node

            assert self.scp is not None  # started before: STOW-RS shares its store path
            self.dicomweb = start_for_node(self.config, self.scp.handler, self.index, self.spool, self.remote)

    def stop(self) -> None:
        """Stop listening and scheduling; running worker processes exit with us."""
        if self.dicomweb is not None:
            self.dicomweb.stop()
        if self.remote is not None:
            self.remote.close()
        if self.receivers is not None:
            self.receivers.stop()
        if self.scp is not None:
            self.scp.stop()
        self._scheduler.shutdown(wait=False)
        if self.prior_lookups is not None:
            self.prior_lookups.close()
        self.senders.stop()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.workers.shutdown()
        (self.config.state_dir / "segnode.pid").unlink(missing_ok=True)

    def emit(self, event: Event) -> None:
        """An :class:`~segnode.node.events.EventSink`: ``event`` to every listener (receiver, sweep, remote jobs)."""
        for listener in self.listeners:
            listener(event)

    # -- 2. completion and routing ------------------------------------------------------
    def sweep_completion(self) -> None:
        """Complete on evidence or quiet period, select and route (node/sweep.py)."""
        if self._completion.sweep():
            self.start_jobs()

    def _resolve_destinations(self, names: tuple[str, ...], calling_ae: str, host: str) -> tuple[str, ...]:
        out: list[str] = []
        for name in names:
            if name == SENDER:
                sender = self.config.sender_for(calling_ae, host)
                if sender is None or sender.destination is None:
                    logger.warning("rule sends back to the sender, but %s at %s has no destination configured",
                                   calling_ae, host)
                    continue
                name = sender.destination
            if name not in out:
                out.append(name)
        return tuple(out)

    # -- 3. segmentation ------------------------------------------------------------------
    def start_jobs(self) -> None:
        """Claim ``complete`` jobs up to the configured concurrency (with ``broker:``, enqueue them all)."""
        if self.prior_lookups is not None:
            self.prior_lookups.start()  # jobs with priors are claimed once they are looked up
        if self.remote is not None:
            self.remote.start_jobs()
            return
        while True:
            with self._lock:
                if self._running >= self.config.worker.concurrency:
                    return
                job = self.index.claim_next()
                if job is None:
                    return
                self._running += 1
            self.emit(JobMoved(job.job_id, JobState.SEGMENTING))
            self._pool.submit(self._segment, job)

    def job_spec(self, job: Job) -> JobSpec:
        info = self.index.series(job.series_uid)
        if info is None or job.profile is None:
            raise ConfigError("job has no series or no profile", where=f"job {job.job_id}")
        worker = self.config.worker
        out = job_folder(self.config.results_dir, job.job_id, job.segment_attempts)
        return JobSpec(job_id=job.job_id, series_uid=job.series_uid,
                       input_dir=str(self.spool.series_dir(info.study_uid, info.series_uid)),
                       profile=job.profile, out_dir=str(out), backend=job.backend, seg_type=worker.seg_type,
                       device=worker.device, threads=worker.threads,
                       weights_dir=str(worker.weights_dir) if worker.weights_dir else None,
                       memory_budget_mb=worker.memory_budget_mb, harvest=job.harvest, rule=job.rule, calling_ae=info.calling_ae,
                       dataset_store=str(dataset_store_root(self.config)),
                       deid_secret_file=str(self.config.deid_secret_file) if self.config.deid_secret_file else None,
                       options={**job.options, "outputs": list(self.encoded_kinds(job)),
                                **supersede_options(self.index, job)})  # a newer version: its number, what it rejects

    def encoded_kinds(self, job: Job) -> tuple[str, ...]:
        """The kinds the job encodes: the route's ``outputs``, else what its destinations take."""
        return encoded_kinds(self.config, job.options.get("outputs"), job.destinations)

    def _takes(self, job: Job) -> dict[str, tuple[str, ...]]:
        """Per destination, the encoded kinds it is sent (docs/node.md, "Which destination gets what")."""
        kinds = encoded_with(self.encoded_kinds(job))  # the SR's SEG goes with it where the destination takes SEG
        kinds += (REJECTION_NOTE,)  # a superseding job's rejection note, to destinations with rejection_notes: true
        names = [d.name for d in self.config.destinations]
        return {n: self.config.destination(n).takes(kinds) for n in job.destinations if n in names}

    def _segment(self, job: Job) -> None:
        try:
            self._segment_one(job)
        finally:
            with self._lock:
                self._running -= 1
        self.start_jobs()

    def _segment_one(self, job: Job) -> None:
        try:
            spec = self.job_spec(job)
        except SegnodeError as exc:
            self.index.transition(job.job_id, JobState.FAILED, str(exc))
            return
        started = time.monotonic()
        outcome = run_job(spec, self.workers, timeout_s=self.config.worker.timeout_s)
        self.finish_job(job, outcome, started)

    def finish_job(self, job: Job, outcome: JobOutcome, started: float) -> None:
        """Record a worker's outcome: a local worker process's, or a remote worker's result (node/remote/jobs.py).

        The result's paths stay relative: the index records them with the job folder they are relative to.
        A job that a newer job of its series or study supersedes (routed while it ran) sends nothing:
        its result would come after the newer one's, or beside it, and be taken for the current one.
        """
        current = self.index.job(job.job_id)
        if current is None or current.state is not JobState.SEGMENTING:  # superseded meanwhile: nothing to record
            logger.info("job %d: its outcome is not recorded, the job is %s", job.job_id,
                        current.state.value if current else "gone")
            return
        newer = self.index.superseded_by(job)
        if newer is not None:
            why = f"superseded by job {newer}, routed while this one ran; its result is not sent"
            if self.index.transition(job.job_id, JobState.SUPERSEDED, why):
                self.emit(JobMoved(job.job_id, JobState.SUPERSEDED, why))
            return
        if outcome.result is None:
            reason = f"{outcome.error_kind}: {outcome.message}"
            logger.error("job %d failed: %s", job.job_id, reason)
            self.index.transition(job.job_id, JobState.FAILED, reason)
            self.emit(JobMoved(job.job_id, JobState.FAILED, reason))
            return
        result = outcome.result
        verdict = decide([f.as_dict() for f in result.qc], job.options.get("review"))  # docs/review.md
        if verdict.policy is QcPolicy.FAIL:
            self.index.transition(job.job_id, JobState.FAILED, verdict.reason)
            self.emit(JobMoved(job.job_id, JobState.FAILED, verdict.reason))
            return
        if verdict.policy is QcPolicy.SEND_WITH_WARNING:
            logger.warning("job %d sent with a QC warning: %s", job.job_id, verdict.reason)
        seg = result.seg
        self.index.mark_encoded(job.job_id, seg_path=seg.path, seg_series_uid=seg.series_instance_uid,
                                seg_sop_uid=seg.sop_instance_uid, backend_used=result.backend_used,
                                model_version=result.model_version,
                                hold=verdict.reason if verdict.policy is QcPolicy.HOLD else None,
                                warning=verdict.reason if verdict.policy is QcPolicy.SEND_WITH_WARNING else None,
                                outputs=[o.to_json() for o in result.objects], takes=self._takes(job),
                                result_dir=str(job_folder(self.config.results_dir, job.job_id, job.segment_attempts)))
        logger.info("job %d segmented in %.1f s", job.job_id, time.monotonic() - started)
        for earlier in job.options.get("supersedes") or ():  # a late instance re-ran the series
            if self.index.transition(int(earlier), JobState.SUPERSEDED, f"superseded by job {job.job_id}"):
                self.emit(JobMoved(int(earlier), JobState.SUPERSEDED))
        if result.harvest is not None:
            harvest = result.harvest
            self.emit(Harvested(job.job_id, harvest.dataset, harvest.status, harvest.reason))
        self.emit(JobMoved(job.job_id, JobState.ENCODED))
        self.dispatch_due()

    def review(self, job_id: int, approve: bool, reviewer: str, comment: str = "") -> str | None:
        """A reviewer's decision on a held job (HTTP API): the state it moved to, or None if not held.

        An approved job's deliveries are handed to their destinations' queues at once (never waited on).
        """
        moved = (self.index.approve if approve else self.index.reject)(job_id, reviewer, comment)
        if moved is None:
            return None
        state = moved.value
        self.emit(JobMoved(job_id, moved))
        if approve:
            self.dispatch_due()
        else:
            self._label_rejected(self.index.job(job_id))
        return state

    def _label_rejected(self, job: Job | None) -> None:
        """A rejected job's harvested case gets the label status ``rejected`` (the case ID is re-derived)."""
        if job is None or not job.harvest:
            return
        from segnode.storage.dataset import DatasetStore
        from segnode.storage.manifest import LabelStatus
        from segnode.storage.pseudonyms import load_secret

        try:
            store = DatasetStore.open(dataset_store_root(self.config),
                                      load_secret(self.config.deid_secret_file))
            case_id = store.case_id(job.harvest, "series|" + job.series_uid)
            if store.find_case(case_id, job.harvest).label_status is LabelStatus.AUTO:  # curated labels stay
                store.set_label_status(case_id, LabelStatus.REJECTED, dataset=job.harvest)
        except SegnodeError as exc:  # not harvested (quarantined, no secret): nothing to label
            logger.warning("job %d: harvested case not labelled rejected: %s", job.job_id, exc)

    # -- 4. dispatch --------------------------------------------------------------------
    def dispatch_due(self) -> None:
        """Hand every delivery whose time has come to its destination's queue (node/sending/queues.py).

        Returns at once: the queues' threads send, record each try's outcome in the index and emit it
        (:class:`segnode.node.events.Delivered`, on the destination's thread).
        """
        self.senders.dispatch_due()

    # -- 5. housekeeping ------------------------------------------------------------------
    def housekeeping(self) -> None:
        before = time.time() - self.config.housekeeping.spool_retention_s
        for series in self.index.purgeable_series(before):
            self.spool.remove_series(series.study_uid, series.series_uid)
            self.index.mark_purged(series.series_uid)
            logger.info("removed spooled series %s (done)", series.series_uid)
        if (keep := self.config.housekeeping.history_retention_s) is not None:
            self.index.prune_history(time.time() - keep)  # the index at a year's size (docs/reliability.md)
        self.index.optimize()


def serve_forever(service: Service, stop: threading.Event) -> None:
    """Run ``service`` until ``stop`` is set."""
    service.start()
    try:
        stop.wait()
    finally:
        service.stop()
