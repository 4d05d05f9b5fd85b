"""Priors of a job: the patient's earlier studies on a source PACS, the series to measure, and its result.

For a route with ``priors:`` (:class:`segnode.routing.rules.Priors`) the node,
before the job is claimed (:func:`prior_options`, run by
:class:`~segnode.node.sources.prior_lookups.PriorLookups` off the job path):

1. reads the job's series header: patient, study, date, modality (never logged);
2. asks the route's source for the patient's studies of that modality from
   ``max_age_days`` before the study date until the day before it, the
   current study left out, and takes the newest ``count``;
3. picks each one's series (:func:`pick_series`: by what a C-FIND or QIDO-RS
   answers — modality, the route's ``select.description`` and
   ``select.min_slices``, then the most instances; the full selection needs
   the headers, which a query does not give);
4. reuses the node's own earlier result on that series when it has one of the
   same profile (the worker then keeps it only if its model version is the one
   it runs: :class:`segnode.node.writers.sr_priors.PriorResult`), else
   retrieves the series through the node's store path and lets the worker
   segment it in the job's folder before the SR is written.

What it finds goes to the worker in the job's options (``priors_found``); a
source that cannot answer leaves the report without priors and says why
(``priors_note``), it never fails the job.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from segnode.errors import SegnodeError
from segnode.node.config import NodeConfig
from segnode.node.ingest.store import StoreHandler
from segnode.node.sources.open import open_source
from segnode.node.sources.source import SeriesMatch, Source, StudyMatch, StudyQuery
from segnode.routing.rules import Priors, Select
from segnode.routing.selection import NOT_IMAGES
from segnode.storage.index import Index, Job, JobState
from segnode.storage.spool import Spool

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class CurrentStudy:
    """What the prior search needs of the job's study (the patient ID is never logged)."""

    patient_id: str
    study_uid: str
    study_date: date
    modality: str


def current_study(index: Index, spool: Spool, job: Job) -> CurrentStudy | None:
    """From the first instance's header; None when it lacks a patient ID, a study date or a modality."""
    paths = index.instance_paths(job.series_uid)
    if not paths:
        return None
    try:
        ds = dcmread(spool.root / paths[0], stop_before_pixels=True)
    except (OSError, InvalidDicomError) as exc:
        logger.warning("job %d: cannot read its series' header for priors: %s", job.job_id, exc)
        return None
    patient, modality = str(ds.get("PatientID") or "").strip(), str(ds.get("Modality") or "").strip()
    when = str(ds.get("StudyDate") or "").strip()
    try:
        day = date(int(when[:4]), int(when[4:6]), int(when[6:8])) if len(when) == 8 else None
    except ValueError:
        day = None
    if not patient or not modality or day is None:
        return None
    return CurrentStudy(patient, str(ds.StudyInstanceUID), day, modality)


def find_prior_studies(source: Source, current: CurrentStudy, option: Priors) -> list[StudyMatch]:
    """The patient's earlier studies of the same modality within ``max_age_days``, newest first, at most ``count``."""
    query = StudyQuery(patient_id=current.patient_id, modality=current.modality, before=current.study_date,
                       since=current.study_date - timedelta(days=option.max_age_days))
    found = [s for s in source.find_studies(query) if s.study_uid != current.study_uid
             and s.study_date is not None and s.study_date < current.study_date
             and (not s.modalities or current.modality in s.modalities)]
    found.sort(key=lambda s: s.study_date or date.min, reverse=True)
    return found[:option.count]


def pick_series(series: list[SeriesMatch], modality: str, select: Select | None) -> SeriesMatch | None:
    """The prior's series to measure: the modality's images passing ``select``'s query-level tests, most instances."""
    fits = [s for s in series if (s.modality or modality) == modality and (s.modality or "") not in NOT_IMAGES]
    if select is not None and select.description is not None:
        pattern = select.description
        fits = [s for s in fits if pattern.search(s.description or "")]
    if select is not None and select.min_slices is not None:
        least = select.min_slices
        fits = [s for s in fits if s.instance_count is None or s.instance_count >= least]
    return max(fits, key=lambda s: (s.instance_count or 0, s.series_uid), default=None)


def earlier_result(index: Index, series_uid: str, profile: str) -> dict[str, Any] | None:
    """The node's newest result on ``series_uid`` with ``profile``: its SEG, summary and model version."""
    jobs = [j for j in index.earlier_results(series_uid, before_job=2**62) if j.profile == profile and j.result_dir]
    for job in reversed(jobs):
        seg = next((o["path"] for o in job.outputs if o.get("kind") == "seg"), job.seg_path)
        summaries = sorted(Path(job.result_dir or "").glob("summary_*.json"))
        if seg and summaries and job.file(seg).is_file():
            return {"seg_path": str(job.file(seg)), "summary_path": str(summaries[0]),
                    "model_version": job.model_version, "job_id": job.job_id}
    return None


def prior_options(config: NodeConfig, index: Index, spool: Spool, job: Job,
                  store: StoreHandler | None = None) -> dict[str, Any]:
    """The job's ``priors_found`` (and ``priors_note`` when none could be had); {} without ``priors:``."""
    raw = job.options.get("priors")
    if not raw:
        return {}
    option = Priors.model_validate(raw)
    select = Select.model_validate(job.options["select"]) if job.options.get("select") else None
    current = current_study(index, spool, job)
    if current is None:
        return {"priors_found": [], "priors_note": "no patient ID, study date or modality in the series"}
    try:
        source = open_source(config, option.source, store=store)
        found = [_prior(source, index, spool, job, current, study, select)
                 for study in find_prior_studies(source, current, option)]
    except SegnodeError as exc:
        logger.warning("job %d: priors not found on %s: %s", job.job_id, option.source, exc)
        return {"priors_found": [], "priors_note": f"priors from {option.source}: {exc}"}
    kept = [f for f in found if f is not None]
    logger.info("job %d: %d prior(s) from %s", job.job_id, len(kept), option.source)
    return {"priors_found": kept}


def _prior(source: Source, index: Index, spool: Spool, job: Job, current: CurrentStudy, study: StudyMatch,
           select: Select | None) -> dict[str, Any] | None:
    series = pick_series(source.find_series(study.study_uid), current.modality, select)
    if series is None:
        logger.info("job %d: prior study %s has no series to measure", job.job_id, study.study_uid)
        return None
    facts = {"study_uid": study.study_uid, "series_uid": series.series_uid,
             "study_date": study.study_date.isoformat() if study.study_date else None}
    reuse = earlier_result(index, series.series_uid, job.profile or "")
    if reuse is not None:
        return {**facts, **reuse}
    result = source.retrieve_series(study.study_uid, series.series_uid)
    if not result.ok:
        logger.warning("job %d: prior series %s not retrieved (%d failed)", job.job_id, series.series_uid,
                       result.failed)
        return None
    _settle_as_prior(index, series.series_uid, job.job_id)
    return {**facts, "input_dir": str(spool.series_dir(study.study_uid, series.series_uid))}


def _settle_as_prior(index: Index, series_uid: str, job_id: int) -> None:
    """The retrieved prior's own waiting job skipped: it is measured inside job ``job_id``, never sent on its own.

    Without this the completion sweep would route the prior like any push and
    send the PACS a result for a study nobody asked about.
    """
    waiting = index.received_job(series_uid)
    if waiting is not None:
        index.transition(waiting.job_id, JobState.SKIPPED, f"retrieved as a prior of job {job_id}")

