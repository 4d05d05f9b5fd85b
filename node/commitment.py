"""Storage Commitment (Push Model, PS3.4 Annex J): what a request asks, what a report says, what it changes.

A destination with ``commit: true`` is sent an N-ACTION (Action Type 1) with
a Transaction UID and the Referenced SOP Sequence of every object stored
there (:mod:`segnode.node.sending.commitment`, the SCU).  Its answer, an
N-EVENT-REPORT (Event Type 1: all committed; 2: some failed), comes on the
same association or on a new one the PACS opens to the node's receiver
(:mod:`segnode.node.dicom_in.receiver`); both hand it to a
:class:`CommitmentBook`, which records it in the index
(:meth:`segnode.storage.index.Index.settle_commitment`): the delivery is
``done`` (committed) only then.  Failed references are sent again and a
commitment with no report by its deadline is asked again, both under the
dispatch policy (:func:`segnode.node.dispatch.next_try_at`).

An N-ACTION that fails is judged by :func:`action_category` (PS3.7 Annex C
status classes, PS3.7 10.1.4.1.10 for N-ACTION): a failure status says the
destination will not commit what it was asked, however often it is asked
(0x0112 no such SOP instance, 0x0118/0x0122 SOP class, 0x0119 class-instance
conflict, 0x0123 no such action, 0x0115 invalid argument value, 0x0124 not
authorized, ...), so the commitment ends at once (:meth:`CommitmentBook.refused`
with a permanent category): the delivery is dead with the status and its
meaning as the reason, the job dead-lettered, never ``done``; the objects
stay stored, and ``segnode jobs retry`` asks again once the destination is
fixed.  Only the failures that say the SCP cannot do it *now* are asked again
under the dispatch policy: 0x0110 processing failure, 0x0213 resource
limitation, 0xA7xx refused: out of resources — as are no association, no
answer and an abort.

A report is checked before it changes anything; what cannot be accepted is
answered with a named N-EVENT-REPORT-RSP status (:class:`segnode.node.status.Status`,
PS3.7 §10.1.1.1.8), never an exception.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO

from pydicom import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset
from pydicom.sequence import Sequence as DicomSequence
from segnode.errors import SegnodeError
from segnode.node.config import NodeConfig
from segnode.node.dispatch import next_try_at
from segnode.node.events import CommitmentSettled
from segnode.node.status import Category, Status, category
from segnode.storage.index import Commitment, CommitmentState, Index
from segnode.uids import is_valid_uid

logger = logging.getLogger(__name__)

#: Storage Commitment Push Model SOP Class and its well-known SOP Instance (PS3.4 J.3)
STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"
#: N-ACTION Action Type ID: Request Storage Commitment
REQUEST_COMMITMENT = 1
#: N-EVENT-REPORT Event Type IDs (PS3.4 J.3.3.1)
ALL_COMMITTED, SOME_FAILED = 1, 2
#: transfer syntaxes the receiver accepts on the Storage Commitment context (implicit, explicit VR LE)
TRANSFER_SYNTAXES = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")

Reference = tuple[str, str]  # (SOP Class UID, SOP Instance UID)


class ReportRefused(Exception):
    """A report that cannot be accepted: answered with ``status`` and the message as its Error Comment."""

    def __init__(self, message: str, status: Status) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class CommitmentReport:
    """An N-EVENT-REPORT of the Storage Commitment Push Model, checked."""

    transaction_uid: str
    event_type: int
    committed: tuple[Reference, ...]
    failed: tuple[tuple[Reference, int | None], ...]  # with the Failure Reason, when one was given


@dataclass(frozen=True)
class ReportAnswer:
    """What to answer a report with, and the event to emit when it changed a delivery."""

    status: Status
    comment: str | None = None
    event: CommitmentSettled | None = None


# -- the request ----------------------------------------------------------------------------


def action_category(code: int) -> Category:
    """What an N-ACTION-RSP status means: asked (stored), to ask again (retryable), refused for good (permanent).

    The status table's category (:func:`segnode.node.status.category`), except
    0x0110 processing failure: for an N-ACTION it is the SCP's own failure to
    handle the request now (PS3.7 C.4.2), not a verdict on what was asked.
    """
    if code == Status.PROCESSING_FAILURE:
        return Category.RETRYABLE
    return category(code)


def status_text(code: int) -> str:
    """``0x0112 (no such SOP instance)``: a status code with its meaning from the status table."""
    try:
        meaning = Status(code).name.lower().replace("_", " ").replace("sop", "SOP")
    except ValueError:  # not in the table: its PS3.7 Annex C class
        meaning = {Category.STORED: "warning", Category.RETRYABLE: "refused: out of resources"}.get(
            category(code), "failure")
    return f"0x{code:04X} ({meaning})"


def request_dataset(transaction_uid: str, objects: Sequence[Reference]) -> Dataset:
    """The N-ACTION's Action Information: the Transaction UID and the Referenced SOP Sequence."""
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    ds.ReferencedSOPSequence = DicomSequence([_reference(c, i) for c, i in objects])
    return ds


def _reference(sop_class: str, sop_instance: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    return item


# -- the report -----------------------------------------------------------------------------


def decode_event_information(data: bytes, transfer_syntax: str) -> Dataset:
    """The Event Information dataset as received (implicit or explicit VR little endian)."""
    if transfer_syntax not in TRANSFER_SYNTAXES:
        raise ReportRefused(f"transfer syntax {transfer_syntax} not accepted for reports",
                            Status.PROCESSING_FAILURE)
    try:
        ds = read_dataset(BytesIO(data), transfer_syntax == TRANSFER_SYNTAXES[0], True)
        ds.ensure_file_meta()  # nothing lazy is left: every element below is read here
        for elem in ds.iterall():
            _ = elem.value
    except (InvalidDicomError, ValueError, TypeError, KeyError, IndexError, EOFError, OverflowError, struct.error,
            NotImplementedError, UserWarning) as exc:  # what pydicom raises on broken bytes (an unknown VR: NIE);
        # UserWarning: its warnings, where a strict warnings filter makes them errors
        raise ReportRefused(f"event information cannot be decoded: {exc}", Status.PROCESSING_FAILURE) from exc
    return ds


def parse_report(sop_class: str, sop_instance: str, event_type: int | None, info: Dataset) -> CommitmentReport:
    """A report's parts, checked; :class:`ReportRefused` with the status to answer otherwise."""
    if sop_class != STORAGE_COMMITMENT:
        raise ReportRefused(f"not the Storage Commitment SOP Class: {sop_class!r}", Status.NO_SUCH_SOP_CLASS)
    if sop_instance != STORAGE_COMMITMENT_INSTANCE:
        raise ReportRefused(f"not the Storage Commitment SOP Instance: {sop_instance!r}",
                            Status.NO_SUCH_SOP_INSTANCE)
    if event_type not in (ALL_COMMITTED, SOME_FAILED):
        raise ReportRefused(f"event type {event_type} is not 1 or 2", Status.NO_SUCH_EVENT_TYPE)
    transaction = _text(info, "TransactionUID")
    if transaction is None or not is_valid_uid(transaction):
        raise ReportRefused("no valid Transaction UID", Status.INVALID_ARGUMENT_VALUE)
    committed = tuple(ref for ref, _ in _references(info, "ReferencedSOPSequence"))
    failed = _references(info, "FailedSOPSequence")
    if event_type == SOME_FAILED and not failed:
        raise ReportRefused("event type 2 without a Failed SOP Sequence", Status.INVALID_ARGUMENT_VALUE)
    if event_type == ALL_COMMITTED and failed:
        raise ReportRefused("event type 1 with a Failed SOP Sequence", Status.INVALID_ARGUMENT_VALUE)
    return CommitmentReport(transaction, event_type, committed, failed)


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    return str(value).strip("\x00 ") if isinstance(value, str) and value else None


def _references(info: Dataset, keyword: str) -> tuple[tuple[Reference, int | None], ...]:
    items = info.get(keyword)
    if items is None:
        return ()
    if not isinstance(items, DicomSequence):
        raise ReportRefused(f"{keyword} is not a sequence", Status.INVALID_ARGUMENT_VALUE)
    out = []
    for item in items:
        sop_class, sop_instance = _text(item, "ReferencedSOPClassUID"), _text(item, "ReferencedSOPInstanceUID")
        if sop_class is None or sop_instance is None or not is_valid_uid(sop_instance):
            raise ReportRefused(f"an item of {keyword} lacks a valid SOP Class or Instance UID",
                                Status.INVALID_ARGUMENT_VALUE)
        reason = item.get("FailureReason")
        out.append(((sop_class, sop_instance), int(reason) if isinstance(reason, int) else None))
    return tuple(out)


# -- what a report or a silence changes -------------------------------------------------------


class CommitmentBook:
    """Records commitment requests' outcomes in the index, under the dispatch policy."""

    def __init__(self, index: Index, config: NodeConfig) -> None:
        self.index = index
        self.policy = config.dispatch
        self.peers = {d.name: d.ae_title for d in config.destinations if d.commit and d.ae_title}

    def is_peer(self, calling_ae: str) -> bool:
        """Whether ``calling_ae`` is a destination the node asks for commitment (may report to the node)."""
        return calling_ae in self.peers.values()

    def receive(self, context_class: str, sop_class: str, sop_instance: str, event_type: int | None,
                data: bytes | None, transfer_syntax: str, calling_ae: str) -> ReportAnswer:
        """An N-EVENT-REPORT-RQ as the receiver read it (``data``: its dataset, None if it had none), answered."""
        try:
            if context_class != STORAGE_COMMITMENT:
                raise ReportRefused(f"N-EVENT-REPORT on a {context_class} context", Status.NO_SUCH_SOP_CLASS)
            if data is None:
                raise ReportRefused("N-EVENT-REPORT without event information", Status.INVALID_ARGUMENT_VALUE)
            info = decode_event_information(data, transfer_syntax)
            return self.accept(parse_report(sop_class, sop_instance, event_type, info), calling_ae)
        except ReportRefused as exc:
            logger.warning("storage commitment report from %s refused: %s", calling_ae, exc)
            return ReportAnswer(exc.status, str(exc))
        except SegnodeError as exc:  # the index could not record it: the peer may report again
            logger.error("storage commitment report from %s not recorded: %s", calling_ae, exc)
            return ReportAnswer(Status.PROCESSING_FAILURE, "report could not be recorded")

    def accept(self, report: CommitmentReport, calling_ae: str | None = None) -> ReportAnswer:
        """Record ``report`` (from ``calling_ae``, checked against the transaction's destination when given)."""
        found = self.index.commitment(report.transaction_uid)
        if found is None:
            return ReportAnswer(Status.INVALID_ARGUMENT_VALUE, "unknown Transaction UID")
        if calling_ae is not None and self.peers.get(found.destination) != calling_ae:
            return ReportAnswer(Status.INVALID_ARGUMENT_VALUE, "transaction of another destination")
        if found.state is not CommitmentState.WAITING:
            logger.info("commitment %s already %s; report ignored", found.transaction_uid, found.state.value)
            return ReportAnswer(Status.SUCCESS)
        return self._settle(found, report)

    def _settle(self, found: Commitment, report: CommitmentReport) -> ReportAnswer:
        asked = {uid for _, uid in found.objects}
        committed = {uid for _, uid in report.committed} & asked
        failed = {ref[1]: f"not committed (failure reason {reason if reason is not None else 'not given'})"
                  for ref, reason in report.failed if ref[1] in asked}
        failed.update({uid: "not committed (not in the report)" for uid in asked - committed - failed.keys()})
        if not failed:
            return self._record(found, CommitmentState.COMMITTED, f"committed {len(asked)} object(s)")
        detail = f"{len(failed)} of {len(asked)} object(s) not committed"
        return self._record(found, CommitmentState.FAILED, detail, failed)

    def _record(self, found: Commitment, state: CommitmentState, detail: str,
                failed: dict[str, str] | None = None, *, final: bool = False) -> ReportAnswer:
        """Settle ``found``; asked again under the policy unless committed or ``final`` (refused for good)."""
        retry_at = None if state is CommitmentState.COMMITTED or final else self._retry_at(found)
        if not self.index.settle_commitment(found.transaction_uid, state, failed=failed, retry_at=retry_at,
                                            detail=detail):
            return ReportAnswer(Status.SUCCESS)  # settled meanwhile (a second report, the deadline)
        log = logger.info if state is CommitmentState.COMMITTED else logger.warning
        log("job %d: storage commitment %s by %s: %s", found.job_id, found.transaction_uid, found.destination,
            detail)
        return ReportAnswer(Status.SUCCESS, None,
                            CommitmentSettled(found.job_id, found.destination, state.value, detail))

    def _retry_at(self, found: Commitment) -> float | None:
        delivery = next((d for d in self.index.deliveries(found.job_id) if d.destination == found.destination), None)
        tries = delivery.attempts if delivery is not None else self.policy.max_attempts
        return next_try_at(Category.RETRYABLE, tries, self.policy, self.index.clock())

    def refused(self, transaction_uid: str, message: str,
                outcome: Category = Category.RETRYABLE) -> CommitmentSettled | None:
        """The N-ACTION for ``transaction_uid`` failed (``outcome``: :func:`action_category`).

        Retryable: asked again under the dispatch policy.  Permanent: the
        commitment ends now, its delivery dead and the job dead-lettered with
        ``message`` as the reason (``segnode jobs retry`` asks again).
        """
        found = self.index.commitment(transaction_uid)
        if found is None:
            return None
        if outcome is Category.PERMANENT:
            return self._record(found, CommitmentState.REFUSED,
                                f"storage commitment refused for good: {message}", final=True).event
        return self._record(found, CommitmentState.REFUSED, f"storage commitment request: {message}").event

    def expire_overdue(self) -> list[CommitmentSettled]:
        """Commitments with no report by their deadline: asked again (or dead after the last try)."""
        events = []
        for found in self.index.overdue_commitments():
            event = self._record(found, CommitmentState.EXPIRED, "no storage commitment report before the "
                                 "deadline").event
            if event is not None:
                events.append(event)
        return events
