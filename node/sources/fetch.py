"""Fetch on demand: query a source, retrieve each series of the matching studies, log it, settle failures.

The retrieved instances take the node's store path (C-MOVE: the node's
receiver; C-GET, WADO-RS: the store handler the source was opened with), so
the node's completion sweep completes and routes them like any push.  Each
series' retrieve is written to the retrieval log (:mod:`segnode.node.sources.record`:
source, method, who asked, counts, error).  A retrieve that fails part-way
leaves no job waiting on a partial series: the series' ``received`` job is
moved to ``not_routed`` with the error as its reason (``segnode jobs retry``
routes it again once the series is whole).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from segnode.node.config import NodeConfig
from segnode.node.config.sources import SourceKind
from segnode.node.ingest.store import StoreHandler
from segnode.node.sources.open import open_source, source_config
from segnode.node.sources.pin import Pin, apply_pin
from segnode.node.sources.record import Retrieval, RetrievalLog
from segnode.node.sources.source import RetrieveResult, SeriesMatch, Source, SourceError, StudyQuery
from segnode.storage.index import Index, JobState

logger = logging.getLogger(__name__)

#: series a fetch leaves on the PACS: derived objects and reports, never segmented
NOT_FETCHED = frozenset({"SEG", "SR", "RTSTRUCT", "KO", "PR", "DOC", "REG", "RTPLAN", "RTDOSE"})


@dataclass(frozen=True)
class SeriesOutcome:
    study_uid: str
    series_uid: str
    modality: str | None
    result: RetrieveResult | None = None
    error: str | None = None
    pinned: int | None = None  # the job completed on a forced route (--route/--profile)
    note: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class FetchReport:
    source: str
    query: str
    studies: int
    series: tuple[SeriesOutcome, ...]

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.series)

    def as_dict(self) -> dict[str, object]:
        """For the ops API: UIDs, counts and errors (never a patient ID)."""
        return {"source": self.source, "query": self.query, "studies": self.studies, "ok": self.ok,
                "series": [{"study_uid": s.study_uid, "series_uid": s.series_uid, "modality": s.modality,
                            "method": s.result.method if s.result else None,
                            "completed": s.result.completed if s.result else 0,
                            "refused": s.result.refused if s.result else 0, "error": s.error,
                            "pinned_job": s.pinned, "note": s.note}
                           for s in self.series]}

    def lines(self) -> list[str]:
        out = [f"{self.source}: {self.studies} stud{'y' if self.studies == 1 else 'ies'} match {self.query}"]
        for s in self.series:
            counts = f"{s.result.completed} instance(s)" if s.result is not None else ""
            refused = f", {s.result.refused} not asked for refused" if s.result and s.result.refused else ""
            pinned = f"; job {s.pinned} routed as asked" if s.pinned is not None else ""
            pinned += f"; {s.note}" if s.note else ""
            out.append(f"  series {s.series_uid} ({s.modality or '?'}): "
                       + (f"retrieved, {counts}{refused}{pinned}" if s.ok else f"FAILED: {s.error}"))
        return out


class Fetcher:
    """Runs fetches against one source, for one requester (``by``: a user, ``cli:<login>``, ...)."""

    def __init__(self, source: Source, *, method: str, log: RetrievalLog, index: Index, by: str,
                 modality: str | None = None, pin: Pin | None = None) -> None:
        self.source, self.method, self.log, self.index = source, method, log, index
        self.by, self.modality, self.pin = by, modality, pin

    def fetch(self, query: StudyQuery) -> FetchReport:
        """Find the studies, retrieve their series; raises :class:`SourceError` / ``NoMatchError`` for the query."""
        studies = self.source.find_studies(query)
        outcomes: list[SeriesOutcome] = []
        for study in studies:
            for series in self.source.find_series(study.study_uid):
                if self._wanted(series):
                    outcomes.append(self.retrieve(series))
        logger.info("fetch from %s: %d study(ies), %d series, %d failed", self.source.name, len(studies),
                    len(outcomes), sum(not o.ok for o in outcomes))
        return FetchReport(self.source.name, query.describe(), len(studies), tuple(outcomes))

    def _wanted(self, series: SeriesMatch) -> bool:
        if series.modality in NOT_FETCHED:
            return False
        return self.modality is None or series.modality == self.modality

    def retrieve(self, series: SeriesMatch, pin: Pin | None = None) -> SeriesOutcome:
        """One series: retrieved and logged; on failure its waiting job settled; pinned on ``pin`` (else the fetch's)."""
        pin = pin or self.pin
        result: RetrieveResult | None = None
        error: str | None = None
        held = self.index.series(series.series_uid) is not None
        try:
            result = self.source.retrieve_series(series.study_uid, series.series_uid)
        except SourceError as exc:
            error = str(exc)
        if result is not None and not result.ok:
            error = (f"source {self.source.name}: {result.failed} instance(s) of series {series.series_uid} "
                     f"failed ({result.completed} stored)")
        self.log.add(Retrieval(self.source.name, self.method, self.by, series.study_uid, series.series_uid,
                               completed=result.completed if result else 0, failed=result.failed if result else 0,
                               refused=result.refused if result else 0, error=error))
        if error is not None:
            logger.warning("retrieve of series %s failed: %s", series.series_uid, error)
            self.settle(series.series_uid, error)
        pinned = None
        if error is None and pin is not None:
            pinned = apply_pin(self.index, series.series_uid, pin,
                               note=f"forced by a fetch from {self.source.name} by {self.by}")
        note = None
        if error is None and held and pinned is None and self.index.received_job(series.series_uid) is None:
            note = "already held by the node: nothing new to route (segnode reprocess runs it again)"
        return SeriesOutcome(series.study_uid, series.series_uid, series.modality, result, error, pinned, note)

    def settle(self, series_uid: str, error: str) -> None:
        """The series' ``received`` job (a partial series) → ``not_routed``, with why."""
        job = self.index.received_job(series_uid)
        if job is not None:
            self.index.transition(job.job_id, JobState.NOT_ROUTED,
                                  f"retrieve failed, partial series not segmented: {error}"[:500])


def fetcher_for(config: NodeConfig, name: str, *, store: StoreHandler | None, index: Index, by: str,
                modality: str | None = None, pin: Pin | None = None) -> Fetcher:
    """A fetcher for the source ``name`` of ``config``, logging to ``<state_dir>/retrievals.sqlite``."""
    settings = source_config(config, name)
    method = settings.retrieve.value if settings.kind is SourceKind.DIMSE else "wado"
    return Fetcher(open_source(config, name, store=store), method=method,
                   log=RetrievalLog(config.state_dir / "retrievals.sqlite"), index=index, by=by, modality=modality,
                   pin=pin)
