"""The typed events parts of the node emit, and the sink they are emitted into.

The receiver (:mod:`segnode.node.dicom_in.receiver`) emits association
events, the store path (:mod:`segnode.node.ingest.store`) instance events, the
service (:mod:`segnode.node.service`), the completion sweep and remote jobs
the job and delivery events; metrics (:mod:`segnode.node.ops.metrics`) and
audit (:mod:`segnode.node.ops.audit`) consume them.  Nobody reaches into
anybody else: an :class:`EventSink` is a callable taking one :data:`Event`.

Events are frozen dataclasses of plain values, so receiver processes
(:mod:`segnode.node.dicom_in.processes`) send them to the main process over
their pipe as they are.  No event carries a patient name or ID.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from segnode.node.status import Status
from segnode.storage.index import JobState


class RejectionReason(StrEnum):
    """Why an association was rejected (the value is the metric reason)."""

    SENDER_NOT_ALLOWED = "sender_not_allowed"
    CALLED_AE_UNKNOWN = "called_ae_unknown"
    TOO_MANY_ASSOCIATIONS = "too_many_associations"
    INVALID_REQUEST = "invalid_request"
    APPLICATION_CONTEXT_UNKNOWN = "application_context_unknown"
    PROTOCOL_VERSION_UNSUPPORTED = "protocol_version_unsupported"
    OTHER = "association_rejected"


@dataclass(frozen=True)
class AssociationAccepted:
    calling_ae: str
    host: str


@dataclass(frozen=True)
class AssociationRejected:
    calling_ae: str  # empty when the request did not decode
    host: str
    reason: RejectionReason


@dataclass(frozen=True)
class AssociationReleased:
    """An association (or a STOW-RS request) ended with a release: evidence that its series are whole."""

    series_uids: tuple[str, ...]


@dataclass(frozen=True)
class InstanceStored:
    sop_uid: str
    series_uid: str
    size: int


@dataclass(frozen=True)
class InstanceRefused:
    """An instance answered with a failure ``status``; ``reason`` is the metric reason, ``comment`` the peer's."""

    status: Status
    reason: str
    comment: str | None
    calling_ae: str
    host: str
    sop_uid: str


@dataclass(frozen=True)
class JobMoved:
    job_id: int
    state: JobState
    reason: str | None = None


@dataclass(frozen=True)
class Delivered:
    """One delivery attempt of a job's objects to ``destination``."""

    job_id: int
    destination: str
    ok: bool
    message: str


@dataclass(frozen=True)
class CommitmentSettled:
    """A Storage Commitment of a job's objects at ``destination``: ``outcome`` is a ``CommitmentState`` value."""

    job_id: int
    destination: str
    outcome: str  # committed, failed, expired, refused
    message: str


@dataclass(frozen=True)
class Harvested:
    """A job's de-identified copy went into (or was kept out of) a dataset."""

    job_id: int
    dataset: str
    status: str  # "harvested" or "not harvested"
    reason: str | None = None


Event = (AssociationAccepted | AssociationRejected | AssociationReleased | InstanceStored | InstanceRefused
         | JobMoved | Delivered | CommitmentSettled | Harvested)


class EventSink(Protocol):
    """Where events go: metrics, audit, a service's fan-out, a receiver process's pipe."""

    def __call__(self, event: Event) -> None: ...


def discard(event: Event) -> None:
    """An :class:`EventSink` that keeps nothing."""
