"""The completion sweep: ``received`` jobs → ``complete`` (routed), ``skipped`` or ``not_routed``.

Each sweep (every ``completion.sweep_interval_s``) looks at every ``received``
job.  Its series is complete on evidence or after the quiet period
(:mod:`segnode.node.completion`); the evidence is recorded on the job
(:attr:`segnode.storage.index.Job.completion`).  With ``completion.group_by: series``
each complete series is routed on its own.  With ``group_by: study`` a study
waits until all its received series are complete.  Either way the verdict on
each series comes from :func:`segnode.routing.study.judge_series`, the
function ``segnode route test`` calls too:

1. a series that cannot be segmented (localizer, secondary capture, derived,
   SEG/RTSTRUCT/SR, our own output) is ``skipped`` with the reason;
2. every other series is matched against the rules; none matching: ``not_routed``;
3. by study, for a rule with ``select``, one series is chosen per study
   (:func:`segnode.routing.selection.choose`) and the others are ``skipped`` with the
   reason; a rule without ``select`` takes every series it matches;
4. by study, a series that arrives after the rule already routed another
   series of its study (a second association past the grace period) is
   judged against that series by the rule's preferences: worse, ``skipped``
   ("study already routed to series X, preferred by rule R"); better, routed,
   and its jobs supersede the earlier series' jobs of the same profile once
   encoded.

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
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from segnode.node.completion import judge, read_facts
from segnode.node.config import NodeConfig
from segnode.node.events import EventSink, JobMoved
from segnode.routing.matcher import Decision
from segnode.routing.reload import RulesHolder
from segnode.routing.selection import SeriesFacts
from segnode.routing.study import Candidate, Earlier, Outcome, judge_series
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
        #: series → (path, header) of its first instance, read whole once: for the routing rules and the facts
        self._first: dict[str, tuple[Path, Dataset]] = {}

    def sweep(self) -> bool:
        """One pass; ``True`` if a job became ``complete``."""
        now = self.index.clock()
        jobs = self.index.received_jobs()
        waiting = {job.series_uid for job in jobs}
        self._facts = {uid: known for uid, known in self._facts.items() if uid in waiting}
        self._first = {uid: header for uid, header in self._first.items() if uid in waiting}
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
            first = self.first_header(info.series_uid, paths[0]) if paths else None
            facts = read_facts(info.series_uid, paths, first)
            self._facts[info.series_uid] = (info.instance_count, facts)
        return facts

    def first_header(self, series_uid: str, path: Path) -> Dataset | None:
        """The header of the series' first instance (``path``), read once; ``None`` if it cannot be read."""
        known = self._first.get(series_uid)
        if known is not None and known[0] == path:
            return known[1]
        try:
            header = dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
            logger.warning("series %s: cannot read the header of %s: %s", series_uid, path.name, exc)
            return None
        self._first[series_uid] = (path, header)
        return header

    def evidence(self, series_uid: str, now: float) -> str | None:
        """The sentence saying why the series is complete now, or ``None`` if it is not yet."""
        info = self.index.series(series_uid)
        if info is None:
            return None
        settings = self.config.completion
        why_not = ""
        released_at = info.released_at
        released = released_at is not None and released_at >= info.last_received_at
        if settings.evidence and released and released_at is not None and now - released_at >= settings.grace_s:
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
        """Judge the complete series (:func:`segnode.routing.study.judge_series`) and act on each verdict."""
        batch: list[tuple[Job, SeriesInfo, Candidate]] = []
        for job, evidence in members:
            self.index.set_completion(job.job_id, evidence)
            info = self.index.series(job.series_uid)
            paths = self.index.instance_paths(job.series_uid)
            if info is None or not paths:
                continue
            facts = self.facts(info)  # reads the first header whole, once
            header = self.first_header(job.series_uid, self.spool.root / paths[0])
            if header is None:
                self._finish(job, JobState.NOT_ROUTED, "the first instance's header cannot be read")
                continue
            batch.append((job, info, Candidate(job.series_uid, facts, header, info.calling_ae,
                                               info.called_ae, info.sender_host)))
        if not batch:
            return False
        earlier = self._earlier(batch[0][0].study_uid, {job.series_uid for job, _, _ in batch}) if by_study else []
        verdicts = judge_series([c for _, _, c in batch], self.rules.current, by_study=by_study,
                                earlier=[e for e, _ in earlier])
        routed = False
        for (job, info, _), verdict in zip(batch, verdicts):
            if verdict.outcome is Outcome.ROUTED and verdict.decision is not None:
                replaced = [j for e, jobs in earlier if e.series_uid in verdict.supersedes for j in jobs]
                routed |= self._complete(job, info, verdict.decision, note=verdict.reason or None, replaced=replaced)
            elif verdict.outcome is Outcome.SKIPPED:
                self._finish(job, JobState.SKIPPED, verdict.reason)
            else:
                self._finish(job, JobState.NOT_ROUTED, verdict.reason)
        return routed

    def _earlier(self, study_uid: str, batch: set[str]) -> list[tuple[Earlier, list[Job]]]:
        """The study's series routed before this batch (by rule), with their jobs."""
        found: dict[tuple[str, str], list[Job]] = {}
        for job in self.index.routed_in_study(study_uid):
            if job.series_uid not in batch and job.rule is not None:
                found.setdefault((job.series_uid, job.rule), []).append(job)
        out = []
        for (series_uid, rule), jobs in found.items():
            info = self.index.series(series_uid)
            out.append((Earlier(series_uid, rule, self.facts(info) if info is not None else None), jobs))
        return out

    def _finish(self, job: Job, state: JobState, reason: str) -> None:
        if self.index.transition(job.job_id, state, reason):
            logger.info("series %s %s: %s", job.series_uid, state.value, reason)
            self.emit(JobMoved(job.job_id, state, reason))

    def _supersede_queued(self, by: int, jobs: list[Job]) -> None:
        """Jobs ``by`` supersedes that have not started: they never run (their result would not be sent)."""
        for old in jobs:
            if old.state is JobState.COMPLETE and self.index.transition(
                    old.job_id, JobState.SUPERSEDED, f"superseded by job {by} before it ran"):
                self.emit(JobMoved(old.job_id, JobState.SUPERSEDED))

    def _complete(self, job: Job, info: SeriesInfo, decision: Decision, note: str | None,
                  replaced: list[Job] | None = None) -> bool:
        """Route ``job``; its results supersede the series' earlier ones and ``replaced`` (a worse series).

        Each profile's job supersedes the earlier jobs of its own profile
        (``options["supersedes"]``, acted on once its result is encoded).
        """
        destinations = self.resolve(decision.destinations, info.calling_ae, info.sender_host)
        options = dict(decision.options)
        # the series' earlier results, and its earlier jobs still queued or segmenting (a result of theirs
        # would come after this one's and be taken for the newest: they are superseded before they run,
        # or as they finish: Service.finish_job)
        earlier = [*self.index.earlier_results(job.series_uid, job.job_id),
                   *self.index.unfinished(job.series_uid, job.job_id)]
        if earlier:
            note = "; ".join(filter(None, (note, f"re-opened by a late instance: supersedes job(s) "
                                                 f"{', '.join(str(j.job_id) for j in earlier)} once encoded")))
        if replaced:
            note = "; ".join(filter(None, (note, f"supersedes job(s) {', '.join(str(j.job_id) for j in replaced)} "
                                                 "of the series routed earlier once encoded")))
        old = [*earlier, *(replaced or ())]
        every = decision.profiles or (decision.profile,)
        profiles = every[:1] if options.get("combine") else every

        def for_profile(profile: str) -> dict[str, Any]:
            ids = [j.job_id for j in old if j.profile == profile or options.get("combine")]
            return {**options, "supersedes": ids} if ids else options

        if len(every) > 1:
            options["shared_run"] = str(self.config.results_dir / f"shared-job-{job.job_id}")
        if not self.index.mark_complete(job.job_id, profile=profiles[0], note=note, rule=decision.rule,
                                        backend=decision.backend, destinations=destinations,
                                        harvest=decision.harvest, options=for_profile(profiles[0])):
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
                harvest=decision.harvest, options=for_profile(profile))
            self.emit(JobMoved(sibling, JobState.COMPLETE))
        self._supersede_queued(job.job_id, [j for j in old if any(j.job_id in for_profile(p).get("supersedes", ())
                                                                   for p in profiles)])
        logger.info("series %s complete (%d instances): rule %s, profile(s) %s, to %s", job.series_uid,
                    info.instance_count, decision.rule, ", ".join(profiles), ", ".join(destinations) or "nowhere")
        self.emit(JobMoved(job.job_id, JobState.COMPLETE))
        return True
