"""Storage Commitment SCU: the N-ACTION asking a DIMSE destination to commit what it stored (PS3.4 J.3).

A delivery to a destination with ``commit: true`` whose objects are all
stored is asked for their commitment in a second association (pynetdicom as
SCU, public API only): an N-ACTION (Action Type 1) with a new Transaction UID
and the Referenced SOP Sequence, recorded in the index before it is sent
(:meth:`segnode.storage.index.Index.request_commitment`).  The destination
may answer with an N-EVENT-REPORT on that association: the node waits for it
at most :data:`SAME_ASSOCIATION_WAIT_S` (bounded by the response deadline)
before releasing; a report on a later association goes to the receiver
(:mod:`segnode.node.dicom_in.receiver`).  Either way the report is handed to
the hub's :class:`~segnode.node.commitment.CommitmentBook`.

An N-ACTION that fails is handed to the book with its category
(:func:`~segnode.node.commitment.action_category`, the decision is documented
in :mod:`segnode.node.commitment`): transient — no association, no answer
(timeout or abort), a transient association rejection, 0x0110 processing
failure, 0x0213 resource limitation, 0xA7xx out of resources — leaves the
delivery to be asked again under the dispatch policy; permanent — any other
failure status of the N-ACTION-RSP (its code, meaning and Error Comment make
the reason), a destination that accepts no Storage Commitment presentation
context, a permanent association rejection — ends the commitment at once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Protocol

from pydicom import Dataset
from pydicom.uid import generate_uid
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import N_EVENT_REPORT
from pynetdicom.events import Event
from segnode.node.commitment import (
    REQUEST_COMMITMENT,
    STORAGE_COMMITMENT,
    STORAGE_COMMITMENT_INSTANCE,
    CommitmentBook,
    Reference,
    ReportAnswer,
    ReportRefused,
    action_category,
    parse_report,
    request_dataset,
    status_text,
)
from segnode.node.config import Destination, Dispatch
from segnode.node.events import CommitmentSettled
from segnode.node.sending.dimse import DimseSender
from segnode.node.sending.sender import Deadlines, SendResult
from segnode.node.status import Category, Status

logger = logging.getLogger(__name__)

#: the longest wait for an N-EVENT-REPORT on the N-ACTION's own association (Orthanc opens a new one)
SAME_ASSOCIATION_WAIT_S = 2.0


class Committer(Protocol):
    """Asks one destination to commit objects it stored."""

    @property
    def timeout_s(self) -> float:
        """How long a report may take before the commitment is asked again."""
        ...

    def request(self, transaction_uid: str, objects: Sequence[Reference]) -> list[CommitmentSettled]:
        """Send the N-ACTION for ``objects`` (already recorded as asked); what was settled meanwhile."""
        ...


def new_transaction_uid() -> str:
    return str(generate_uid())


class DimseCommitter:
    """The N-ACTION to one DIMSE destination, and a report on the same association."""

    def __init__(self, sender: DimseSender, book: CommitmentBook, timeout_s: float) -> None:
        self.sender = sender
        self.book = book
        self.timeout_s = timeout_s

    def request(self, transaction_uid: str, objects: Sequence[Reference]) -> list[CommitmentSettled]:
        inbox = _SameAssociation(self.book, self.sender.ae_title)
        assoc = self.sender.associate([STORAGE_COMMITMENT], [(evt.EVT_N_EVENT_REPORT, inbox.on_report)])
        if isinstance(assoc, SendResult):
            return self._refused(transaction_uid, SendResult(assoc.category, f"{assoc.message} (Storage Commitment)"))
        try:
            result = self._n_action(assoc, transaction_uid, objects)
            if result.ok:
                inbox.reported.wait(min(SAME_ASSOCIATION_WAIT_S, self.sender.deadlines.response_s))
        finally:
            if assoc.is_established:
                assoc.release()
        if not result.ok:
            return inbox.events + self._refused(transaction_uid, result)
        logger.info("storage commitment %s of %d object(s) requested from %s", transaction_uid, len(objects),
                    self.sender.name)
        return inbox.events

    def _n_action(self, assoc: Association, transaction_uid: str, objects: Sequence[Reference]) -> SendResult:
        if not assoc.accepted_contexts:
            return SendResult.refused("destination accepts no Storage Commitment presentation context")
        status, _ = assoc.send_n_action(request_dataset(transaction_uid, objects), REQUEST_COMMITMENT,
                                        STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE)
        code = int(status.Status) if "Status" in status else None
        if code is None:
            return SendResult.retry("no N-ACTION response (timeout or abort)")
        outcome = action_category(code)
        if outcome is Category.STORED:
            return SendResult.stored(f"N-ACTION status {status_text(code)}", code)
        comment = str(status.get("ErrorComment", "") or "").strip()
        return SendResult(outcome, f"N-ACTION refused with status {status_text(code)}"
                          + (f": {comment}" if comment else ""), code)

    def _refused(self, transaction_uid: str, result: SendResult) -> list[CommitmentSettled]:
        log = logger.error if result.category is Category.PERMANENT else logger.warning
        log("storage commitment %s from %s not requested (%s): %s", transaction_uid, self.sender.name,
            result.category.value, result.message)
        event = self.book.refused(transaction_uid, result.message, result.category)
        return [event] if event is not None else []


class _SameAssociation:
    """Takes N-EVENT-REPORTs arriving on the N-ACTION's association (pynetdicom calls it on its own thread)."""

    def __init__(self, book: CommitmentBook, peer_ae: str) -> None:
        self.book = book
        self.peer_ae = peer_ae
        self.events: list[CommitmentSettled] = []
        self.reported = threading.Event()

    def on_report(self, event: Event) -> tuple[int, Dataset | None]:
        answer = self._answer(event)
        if answer.event is not None:
            self.events.append(answer.event)
        self.reported.set()
        return int(answer.status), None

    def _answer(self, event: Event) -> ReportAnswer:
        request = event.request
        if not isinstance(request, N_EVENT_REPORT):
            return ReportAnswer(Status.PROCESSING_FAILURE, "not an N-EVENT-REPORT")
        try:
            info = event.event_information
            report = parse_report(str(request.AffectedSOPClassUID or ""), str(request.AffectedSOPInstanceUID or ""),
                                  event.event_type, info)
        except ReportRefused as exc:
            logger.warning("storage commitment report refused: %s", exc)
            return ReportAnswer(exc.status, str(exc))
        except (ValueError, TypeError, AttributeError, KeyError) as exc:  # pynetdicom's decoding of the dataset
            logger.warning("storage commitment report cannot be decoded: %s", exc)
            return ReportAnswer(Status.PROCESSING_FAILURE, "event information cannot be decoded")
        return self.book.accept(report, self.peer_ae)


def committer_for(dest: Destination, *, calling_ae: str, dispatch: Dispatch, book: CommitmentBook) -> Committer | None:
    """The committer of a destination with ``commit: true``; None for the others."""
    if not dest.commit:
        return None
    sender = DimseSender(dest, calling_ae=dest.calling_ae_title or calling_ae, deadlines=Deadlines.of(dest, dispatch))
    return DimseCommitter(sender, book, dest.commit_timeout_s)
