"""The one interface every PACS source offers, and the values it answers with.

A :class:`Source` finds studies and series and retrieves one series at a time;
the instances it retrieves take the node's normal store path (C-MOVE: the
node's own receiver; C-GET and WADO-RS: :class:`segnode.node.ingest.store.StoreHandler`),
so they are durable, indexed, completed and routed like any push.  The DIMSE
source is :mod:`segnode.node.sources.dimse`, the DICOMweb one
:mod:`segnode.node.sources.web`; :func:`segnode.node.sources.open.open_source`
picks by the config.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from typing import Protocol

from segnode.errors import InputError, SegnodeError


class SourceError(SegnodeError):
    """A source could not answer: refused, timed out, cancelled at a bound, or the peer is unreachable."""

    exit_code = 7


class NoMatchError(InputError):
    """A query matched nothing (an unknown accession, study or patient)."""


@dataclass(frozen=True)
class StudyQuery:
    """What to look for: an accession, a study, or a patient's studies (optionally from ``since`` to ``before``)."""

    accession: str | None = None
    study_uid: str | None = None
    patient_id: str | None = None
    since: date | None = None  # StudyDate from this day on
    before: date | None = None  # StudyDate before this day (priors)
    modality: str | None = None  # ModalitiesInStudy

    def __post_init__(self) -> None:
        if not (self.accession or self.study_uid or self.patient_id):
            raise InputError("a query needs an accession number, a study UID or a patient ID")
        if self.since is not None and self.before is not None and self.since >= self.before:
            raise InputError(f"since {self.since} is not before {self.before}")

    def describe(self) -> str:
        """For messages and logs: never the patient ID itself."""
        what = (f"accession {self.accession}" if self.accession else f"study {self.study_uid}" if self.study_uid
                else "the patient ID given")
        dates = (f" from {self.since}" if self.since else "") + (f" before {self.before}" if self.before else "")
        return what + (f" ({self.modality})" if self.modality else "") + dates


@dataclass(frozen=True)
class StudyMatch:
    study_uid: str
    accession: str | None = None
    patient_id: str | None = None  # not to be logged
    study_date: date | None = None
    modalities: tuple[str, ...] = ()
    description: str | None = None


@dataclass(frozen=True)
class SeriesMatch:
    study_uid: str
    series_uid: str
    modality: str | None = None
    series_number: int | None = None
    description: str | None = None
    instance_count: int | None = None


@dataclass(frozen=True)
class RetrieveResult:
    """What one series' retrieve did; ``refused``: instances the peer sent that were not asked for."""

    study_uid: str
    series_uid: str
    method: str  # move, get, wado
    completed: int = 0
    failed: int = 0
    warning: int = 0
    refused: int = 0

    @property
    def ok(self) -> bool:
        """Something stored, and no failure but the node's own refusals (a C-GET peer counts those as failed)."""
        return self.failed <= self.refused and self.completed + self.warning > 0


class Source(Protocol):
    """A PACS the node queries and retrieves from (``sources:`` in the node config)."""

    name: str

    def find_studies(self, query: StudyQuery) -> list[StudyMatch]:
        """The studies matching ``query`` (at most the source's ``max_results``, else :class:`SourceError`)."""
        ...

    def find_series(self, study_uid: str) -> list[SeriesMatch]:
        """The series of one study."""
        ...

    def retrieve_series(self, study_uid: str, series_uid: str) -> RetrieveResult:
        """Retrieve one series into the node's store path; raises :class:`SourceError` on a refusal or timeout."""
        ...
