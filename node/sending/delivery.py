"""One try of one delivery: send what is still pending, record the outcome in the index, emit it.

A delivery is one (job, destination) row of the index with one row per
object (SEG, RTSTRUCT, overlay images, SR) that the destination takes
(:mod:`segnode.storage.index`), an IOCM rejection note for a superseded result
last of all, and only once the rest is stored there.  A try sends the objects still ``pending`` in
one association or request, marks each stored one ``done``, each refused for
good ``dead``, and leaves the others ``pending`` for the next try at the time
the retry policy gives (:func:`segnode.node.dispatch.next_try_at`); after
``dispatch.max_attempts`` tries the delivery is dead-lettered.

To a destination with ``commit: true`` (a :class:`~segnode.node.sending.commitment.Committer`),
a try that leaves every object stored then asks for their Storage Commitment: the
delivery is ``stored`` until the destination's report makes it ``done``
(:mod:`segnode.node.commitment`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from segnode.errors import SegnodeError
from segnode.node.config import Dispatch
from segnode.node.dispatch import Summary, next_try_at, summarise
from segnode.node.events import Delivered, EventSink
from segnode.node.sending.commitment import Committer, new_transaction_uid
from segnode.node.sending.sender import Sender, SendResult
from segnode.node.status import Category
from segnode.output_kinds import REJECTION_NOTE
from segnode.storage.index import Delivery, DeliveryObject, DeliveryState, Index, Job, JobState, ObjectOutcome

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeliveryTask:
    """A delivery due: the job, the destination, and how many tries it had when it was found due."""

    job_id: int
    destination: str
    attempts: int


class Courier:
    """Makes the tries of one destination's deliveries (one courier per destination queue)."""

    def __init__(self, destination: str, sender: Sender, index: Index, policy: Dispatch,
                 report: EventSink, committer: Committer | None = None) -> None:
        self.destination = destination
        self.sender = sender
        self.index = index
        self.policy = policy
        self.report = report
        self.committer = committer

    def attempt(self, task: DeliveryTask) -> None:
        """Try ``task`` once, unless it is no longer due as it was found (done, tried since, superseded)."""
        due = self._still_due(task)
        if due is None:
            return
        job, delivery = due
        objects = self.index.delivery_objects(job.job_id, self.destination)
        pending = notes_last([o for o in objects if o.state is DeliveryState.PENDING])
        try:
            sent, result = self._send(job, objects, pending)
        except SegnodeError as exc:  # an unreadable file: retrying will not help
            sent, result = [], Summary(Category.PERMANENT, str(exc))
        if self.committer is not None and result.ok and job.outputs:
            self._commit(self.committer, job.job_id, objects, pending, result)
        else:
            self._record(job.job_id, delivery.attempts + 1, pending, sent, result)

    def _still_due(self, task: DeliveryTask) -> tuple[Job, Delivery] | None:
        job = self.index.job(task.job_id)
        if job is None or job.state is not JobState.SENDING:
            return None
        delivery = next((d for d in self.index.deliveries(task.job_id) if d.destination == self.destination), None)
        if delivery is None or delivery.state is not DeliveryState.PENDING or delivery.attempts != task.attempts:
            return None
        return job, delivery

    def _send(self, job: Job, objects: list[DeliveryObject],
              pending: list[DeliveryObject]) -> tuple[list[SendResult], Summary]:
        if not job.outputs:  # a job encoded before its objects were tracked: the SEG alone
            seg = job.file(job.seg_path or "")
            [result] = self.sender.send([seg])
            _log(job.job_id, self.destination, seg.name, result)
            return [], Summary(result.category, result.message)
        sent = self._send_in_order(job, objects, pending)
        for obj, one in zip(pending, sent):
            _log(job.job_id, self.destination, Path(obj.path).name, one)
        dead = [(o.kind, o.last_error or "") for o in objects if o.state is DeliveryState.DEAD]
        return sent, summarise([o.kind for o in pending], sent, dead=dead)

    def _send_in_order(self, job: Job, objects: list[DeliveryObject],
                       pending: list[DeliveryObject]) -> list[SendResult]:
        """Send ``pending`` (rejection notes last), a rejection note only once the rest of the result is stored.

        IHE IOCM: the PACS hides what a Rejection Note names, so it goes only to a destination that holds the
        newer result; until then it waits (retryable), and if the result is refused for good, so is the note.
        """
        result = [o for o in pending if o.kind != REJECTION_NOTE]
        notes = pending[len(result):]
        sent = self.sender.send([job.file(o.path) for o in result]) if result else []  # paths: in the job folder
        if not notes:
            return sent
        others = [o for o in objects if o.kind != REJECTION_NOTE and o.state is not DeliveryState.PENDING]
        if all(r.ok for r in sent) and all(o.state is DeliveryState.DONE for o in others):
            return sent + self.sender.send([job.file(o.path) for o in notes])
        waiting = (SendResult.retry if all(r.ok or r.retryable for r in sent)
                   and not any(o.state is DeliveryState.DEAD for o in others) else SendResult.refused)
        return sent + [waiting("rejection note not sent: the newer result is not stored there yet")
                       for _ in notes]

    def _commit(self, committer: Committer, job_id: int, objects: list[DeliveryObject],
                pending: list[DeliveryObject], result: Summary) -> None:
        """Every object is stored: record the commitment asked for, then send the N-ACTION."""
        sent = {o.sop_instance_uid for o in pending}
        stored = [(o.sop_class_uid, o.sop_instance_uid) for o in objects
                  if o.state is DeliveryState.DONE or o.sop_instance_uid in sent]
        transaction = new_transaction_uid()
        self.index.request_commitment(job_id, self.destination, transaction, stored,
                                      self.index.clock() + committer.timeout_s,
                                      [ObjectOutcome(uid, DeliveryState.DONE) for uid in sent])
        self.report(Delivered(job_id, self.destination, True, f"{result.message}; storage commitment requested"))
        for event in committer.request(transaction, stored):
            self.report(event)

    def _record(self, job_id: int, tries: int, pending: list[DeliveryObject], sent: list[SendResult],
                result: Summary) -> None:
        retry_at = next_try_at(result.category, tries, self.policy, time.time())
        outcomes = [ObjectOutcome(o.sop_instance_uid, DeliveryState.DONE if r.ok else
                                  DeliveryState.PENDING if r.retryable and retry_at is not None else DeliveryState.DEAD,
                                  None if r.ok else r.message) for o, r in zip(pending, sent)]
        self.index.delivery_result(job_id, self.destination, ok=result.ok, error=None if result.ok else result.message,
                                   retry_at=retry_at, objects=outcomes)
        self.report(Delivered(job_id, self.destination, result.ok, result.message))


def notes_last(objects: list[DeliveryObject]) -> list[DeliveryObject]:
    """``objects`` in their order, rejection notes moved to the end (they follow the result they replace it with)."""
    return [o for o in objects if o.kind != REJECTION_NOTE] + [o for o in objects if o.kind == REJECTION_NOTE]


def record_unknown(index: Index, task: DeliveryTask, report: EventSink) -> None:
    """A delivery to a destination gone from the configuration since routing: dead at once."""
    message = f"unknown destination {task.destination!r}"
    index.delivery_result(task.job_id, task.destination, ok=False, error=message)
    report(Delivered(task.job_id, task.destination, False, message))


def _log(job_id: int, destination: str, name: str, result: SendResult) -> None:
    log = logger.info if result.ok else logger.warning
    log("job %d: delivery of %s to %s: %s", job_id, name, destination, result.message)
