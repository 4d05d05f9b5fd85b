"""The completion sweep: ``received`` jobs → ``complete`` (routed), ``skipped`` or ``not_routed``.

Each sweep (every ``completion.sweep_interval_s``) looks at every ``received``
job.  Its series is complete on evidence or after the quiet period
(:mod:`segnode.node.completion`); the evidence is recorded on the job
(:attr:`segnode.storage.index.Job.completion`).  With ``completion.group_by: series``
each complete series is routed on its own.  With ``group_by: study`` a study
waits until all its received series are complete, then:

1. a series that cannot be segmented (localizer, secondary capture, derived,
   SEG/RTSTRUCT/SR, our own output) is ``skipped`` with the reason;
2. every other series is matched against the rules; none matching: ``not_routed``;
3. for a rule with ``select``, one series is chosen per study
   (:func:`segnode.routing.selection.choose`) and the others are ``skipped`` with the
   reason; a rule without ``select`` takes every series it matches.

A routed series becomes one job per profile of its rule (``profiles:``), all
sharing one model run (:mod:`segnode.node.jobs.shared_run`), or one job for all with
``combine: true``.

A late instance after completion opens a new ``received`` job for the series
(:meth:`segnode.storage.index.Index.record_instance`): it is completed and routed
again and run on the whole series; its result supersedes the earlier job's
(that job becomes ``superseded`` once the new result is encoded), so a
series never has two current results.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from pydicom import dcmread
from segnode.node.completion import judge, read_facts
from segnode.node.config import NodeConfig
from segnode.node.events import EventSink, JobMoved
from segnode.routing.matcher import Decision
from segnode.routing.reload import RulesHolder
from segnode.routing.selection import SeriesFacts, choose, ineligible
from segnode.storage.index import Index, Job, JobState, SeriesInfo
from segnode.storage.spool import Spool

logger = logging.getLogger(__name__)

Resolve = Callable[[tuple[str, ...], str, str], tuple[str, ...]]


class CompletionSweep:
    """Judges completion and routes; one per :class:`segnode.node.service.Service`."""

    def __init__(self, config: NodeConfig, index: Index, spool: Spool, rules: RulesHolder, emit: EventSink,
                 resolve: Resolve) -> None:
        self.config, self.index, self.spool, self.rules = config, index, spool, rules
        self.emit, self.resolve = emit, resolve
        #: series → (instance count, facts) of the series still ``received``; read again when the count changes
        self._facts: dict[str, tuple[int, SeriesFacts | None]] = {}

    def sweep(self) -> bool:
        """One pass; ``True`` if a job became ``complete``."""
        now = self.index.clock()
        jobs = self.index.received_jobs()
        waiting = {job.series_uid for job in jobs}
        self._facts = {uid: known for uid, known in self._facts.items() if uid in waiting}
        if self.config.completion.group_by == "series":
            routed = False
            for job in jobs:
                evidence = self.evidence(job.series_uid, now)
                if evidence is not None:
                    routed |= self._route_study([(job, evidence)], by_study=False)
            return routed
        studies: dict[str, list[Job]] = {}
        for job in jobs:
            studies.setdefault(job.study_uid, []).append(job)
        routed = False
        for members in studies.values():
            ready = [(job, e) for job in members if (e := self.evidence(job.series_uid, now)) is not None]
            if len(ready) == len(members):  # every series of the study has its evidence
                routed |= self._route_study(ready, by_study=True)
        return routed

    # -- completion ---------------------------------------------------------------------
    def facts(self, info: SeriesInfo) -> SeriesFacts | None:
        count, facts = self._facts.get(info.series_uid, (-1, None))
        if count != info.instance_count:
            paths = [self.spool.root / p for p in self.index.instance_paths(info.series_uid)]
            facts = read_facts(info.series_uid, paths)
            self._facts[info.series_uid] = (info.instance_count, facts)
        return facts

    def evidence(self, series_uid: str, now: float) -> str | None:
        """The sentence saying why the series is complete now, or ``None`` if it is not yet."""
        info = self.index.series(series_uid)
        if info is None:
            return None
        settings = self.config.completion
        why_not = ""
        released = info.released_at is not None and info.released_at >= info.last_received_at
        if settings.evidence and released and now - info.released_at >= settings.grace_s:  # type: ignore[operator]
            facts = self.facts(info)
            verdict = judge(facts) if facts is not None else None
            if verdict is not None and verdict.whole:
                return f"association released; {verdict.reason} (grace {settings.grace_s:g} s)"
            why_not = f" (released, but {verdict.reason if verdict else 'headers unreadable'})"
        if now - info.last_received_at >= settings.quiet_period_s:
            return f"quiet period {settings.quiet_period_s:g} s{why_not}"
        return None

    # -- routing ------------------------------------------------------------------------
    def _route_study(self, members: list[tuple[Job, str]], *, by_study: bool) -> bool:
        chosen: dict[str, list[tuple[Job, SeriesInfo, SeriesFacts | None, Decision]]] = {}
        for job, evidence in members:
            self.index.set_completion(job.job_id, evidence)
            info = self.index.series(job.series_uid)
            paths = self.index.instance_paths(job.series_uid)
            if info is None or not paths:
                continue
            facts = self.facts(info)
            skip = ineligible(facts, strict=by_study) if facts is not None else None
            if skip is not None:
                self._finish(job, JobState.SKIPPED, f"skipped: {skip}")
                continue
            header = dcmread(self.spool.root / paths[0], stop_before_pixels=True)
            decision = self.rules.current.evaluate(header, calling_ae=info.calling_ae, called_ae=info.called_ae,
                                                   sender_host=info.sender_host)
            if decision is None:
                self._finish(job, JobState.NOT_ROUTED, "no routing rule matched")
                continue
            chosen.setdefault(decision.rule, []).append((job, info, facts, decision))
        routed = False
        for candidates in chosen.values():
            select = candidates[0][3].select
            if select is None or not by_study:
                for job, info, _, decision in candidates:
                    routed |= self._complete(job, info, decision, note=None)
                continue
            choice = choose([f for _, _, f, _ in candidates if f is not None], select)
            for job, info, facts, decision in candidates:
                uid = job.series_uid
                if uid == choice.chosen:
                    routed |= self._complete(job, info, decision, note=choice.reason)
                else:
                    self._finish(job, JobState.SKIPPED, f"rule {decision.rule!r}: "
                                 + choice.skipped.get(uid, "not selected: headers unreadable"))
        return routed

    def _finish(self, job: Job, state: JobState, reason: str) -> None:
        if self.index.transition(job.job_id, state, reason):
            logger.info("series %s %s: %s", job.series_uid, state.value, reason)
            self.emit(JobMoved(job.job_id, state, reason))

    def _complete(self, job: Job, info: SeriesInfo, decision: Decision, note: str | None) -> bool:
        destinations = self.resolve(decision.destinations, info.calling_ae, info.sender_host)
        options = dict(decision.options)
        earlier = [j.job_id for j in self.index.earlier_results(job.series_uid, job.job_id)]
        if earlier:
            options["supersedes"] = earlier
            note = "; ".join(filter(None, (note, f"re-opened by a late instance: supersedes job(s) "
                                                 f"{', '.join(map(str, earlier))} once encoded")))
        every = decision.profiles or (decision.profile,)
        profiles = every[:1] if options.get("combine") else every
        if len(every) > 1:
            options["shared_run"] = str(self.config.results_dir / f"shared-job-{job.job_id}")
        if not self.index.mark_complete(job.job_id, profile=profiles[0], note=note, rule=decision.rule,
                                        backend=decision.backend, destinations=destinations,
                                        harvest=decision.harvest, options=options):
            return False
        like = self.index.job(job.job_id)  # as just routed: each sibling copies it
        for profile in profiles[1:]:
            if like is None:  # the row is gone (cannot happen after mark_complete): no siblings
                break
            sibling = self.index.add_complete_job(
                like,
                reason=f"routed by rule {decision.rule!r} (profile {profile}, model run shared with job "
                       f"{job.job_id})" + (f"; {note}" if note else ""),
                profile=profile, rule=decision.rule, backend=decision.backend, destinations=destinations,
                harvest=decision.harvest, options=options)
            self.emit(JobMoved(sibling, JobState.COMPLETE))
        logger.info("series %s complete (%d instances): rule %s, profile(s) %s, to %s", job.series_uid,
                    info.instance_count, decision.rule, ", ".join(profiles), ", ".join(destinations) or "nowhere")
        self.emit(JobMoved(job.job_id, JobState.COMPLETE))
        return True
