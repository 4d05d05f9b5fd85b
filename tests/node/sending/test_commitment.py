"""Storage Commitment: reports on the N-ACTION's own association, failed references, deadlines, restarts.

The PACS here is a scripted pynetdicom peer (Storage SCP and Storage
Commitment SCP that reports on the same association, which Orthanc never
does: test_commitment_orthanc.py covers the new-association path).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydicom import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pynetdicom import AE, evt
from pynetdicom.events import Event as PynetdicomEvent
from pynetdicom.sop_class import CTImageStorage
from segnode.node.commitment import (
    STORAGE_COMMITMENT,
    STORAGE_COMMITMENT_INSTANCE,
    CommitmentBook,
    CommitmentReport,
)
from segnode.node.status import Status
from segnode.node.config import NodeConfig
from segnode.node.events import CommitmentSettled, Event
from segnode.node.ops.metrics import NodeMetrics
from segnode.node.ops.views import OpsDB
from segnode.node.sending.commitment import committer_for
from segnode.node.sending.delivery import Courier, DeliveryTask
from segnode.node.sending.sender import sender_for
from segnode.storage.index import CommitmentState, DeliveryState, Index, JobState

from tests.node.ops.test_metrics import samples, value
from tests.node.sending.test_commitment_orthanc import sending_job
from tests.node.sending.test_senders import sending_job as fake_sending_job
from tests.peers import wait_until

CT = "1.2.840.10008.5.1.4.1.1.2"


@dataclass
class ScriptedPacs:
    """Stores CT, and answers each N-ACTION with an N-EVENT-REPORT on the same association.

    ``fail``: per N-ACTION, the SOP Instance UIDs to report as not committed (event type 2).
    """

    fail: list[set[str]] = field(default_factory=list)
    stored: list[str] = field(default_factory=list)
    actions: list[Dataset] = field(default_factory=list)
    answers: list[int] = field(default_factory=list)

    def on_store(self, event: PynetdicomEvent) -> int:
        self.stored.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    def on_action(self, event: PynetdicomEvent) -> tuple[int, None]:
        request = event.action_information
        self.actions.append(request)
        failing = self.fail.pop(0) if self.fail else set()
        report = Dataset()
        report.TransactionUID = request.TransactionUID
        refs = list(request.ReferencedSOPSequence)
        report.ReferencedSOPSequence = DicomSequence([r for r in refs if r.ReferencedSOPInstanceUID not in failing])
        if failing:
            failed = [r for r in refs if r.ReferencedSOPInstanceUID in failing]
            for item in failed:
                item.FailureReason = 0x0112
            report.FailedSOPSequence = DicomSequence(failed)
        status, _ = event.assoc.send_n_event_report(report, 2 if failing else 1, STORAGE_COMMITMENT,
                                                    STORAGE_COMMITMENT_INSTANCE)
        self.answers.append(int(status.Status) if "Status" in status else -1)
        return 0x0000, None


@pytest.fixture
def pacs() -> Iterator[tuple[ScriptedPacs, int]]:
    script = ScriptedPacs()
    ae = AE("PACS")
    ae.add_supported_context(CTImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    ae.add_supported_context(STORAGE_COMMITMENT)
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[
        (evt.EVT_C_STORE, script.on_store), (evt.EVT_N_ACTION, script.on_action)])
    yield script, server.server_address[1]
    server.shutdown()


def config_for(tmp_path: Path, port: int, **dispatch: float) -> NodeConfig:
    return NodeConfig(state_dir=tmp_path / "state",
                      dispatch={"max_attempts": 3, "backoff_initial_s": 0.1, "backoff_max_s": 0.1, **dispatch},
                      destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": port,
                                     "commit": True, "commit_timeout_s": 60}])


def courier(config: NodeConfig, index: Index, events: list[Event]) -> Courier:
    [dest] = config.destinations
    book = CommitmentBook(index, config)
    return Courier(dest.name, sender_for(dest, calling_ae="SEGNODE", dispatch=config.dispatch), index, config.dispatch,
                   events.append, committer_for(dest, calling_ae="SEGNODE", dispatch=config.dispatch, book=book))


def attempt(c: Courier, index: Index, job_id: int) -> None:
    [delivery] = index.deliveries(job_id)
    c.attempt(DeliveryTask(job_id, c.destination, delivery.attempts))


def test_a_report_on_the_same_association_commits_the_delivery(
        tmp_path: Path, pacs: tuple[ScriptedPacs, int]) -> None:
    script, port = pacs
    config = config_for(tmp_path, port)
    index = Index(config.index_path)
    job_id = sending_job(index, tmp_path / "job", "pacs")
    events: list[Event] = []
    attempt(courier(config, index, events), index, job_id)
    assert script.answers == [0x0000]
    [action] = script.actions
    assert len(action.ReferencedSOPSequence) == 3
    assert {r.ReferencedSOPClassUID for r in action.ReferencedSOPSequence} == {CT}
    [delivery] = index.deliveries(job_id)
    assert delivery.state is DeliveryState.DONE and delivery.attempts == 1
    assert index.job(job_id).state is JobState.DONE  # type: ignore[union-attr]
    assert [e for e in events if isinstance(e, CommitmentSettled)] == [
        CommitmentSettled(job_id, "pacs", "committed", "committed 3 object(s)")]


def test_failed_references_are_sent_again_and_asked_again(tmp_path: Path, pacs: tuple[ScriptedPacs, int]) -> None:
    script, port = pacs
    config = config_for(tmp_path, port)
    index = Index(config.index_path)
    job_id = sending_job(index, tmp_path / "job", "pacs")
    uids = [o.sop_instance_uid for o in index.delivery_objects(job_id)]
    script.fail = [{uids[1]}]
    c = courier(config, index, [])
    attempt(c, index, job_id)
    assert script.answers == [0x0000]  # the report was taken, and says one object failed
    [delivery] = index.deliveries(job_id)
    assert delivery.state is DeliveryState.PENDING and delivery.attempts == 1
    objects = {o.sop_instance_uid: o for o in index.delivery_objects(job_id)}
    assert objects[uids[1]].state is DeliveryState.PENDING and objects[uids[1]].committed_at is None
    assert "failure reason 274" in (objects[uids[1]].last_error or "")
    assert all(objects[u].committed_at is not None for u in (uids[0], uids[2]))
    assert index.job(job_id).state is JobState.SENDING  # type: ignore[union-attr]

    wait_until(lambda: index.deliveries(job_id)[0].next_attempt_at <= index.clock(), 5, "the backoff")
    attempt(c, index, job_id)
    assert sorted(script.stored) == sorted(uids + [uids[1]])  # only the failed object sent again
    assert [len(a.ReferencedSOPSequence) for a in script.actions] == [3, 3]  # and every object asked again
    assert index.deliveries(job_id)[0].state is DeliveryState.DONE
    assert index.job(job_id).state is JobState.DONE  # type: ignore[union-attr]
    assert [c.state for c in index.commitments(job_id)] == [CommitmentState.FAILED, CommitmentState.COMMITTED]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def waiting(index: Index, job_id: int, transaction: str, deadline: float) -> None:
    index.request_commitment(job_id, "pacs", transaction, [(CT, "5.1")], deadline)


def test_no_report_by_the_deadline_is_asked_again_and_dead_after_the_last_try(tmp_path: Path) -> None:
    clock = Clock()
    index = Index(tmp_path / "index.sqlite", clock=clock)
    config = config_for(tmp_path, 104, max_attempts=2, backoff_initial_s=5, backoff_max_s=10)
    book = CommitmentBook(index, config)
    job_id = fake_sending_job(index, ("pacs",), ("5.1",))
    waiting(index, job_id, "2.25.1", clock.now + 60)
    assert index.deliveries(job_id)[0].state is DeliveryState.STORED
    clock.now += 59
    assert book.expire_overdue() == []
    clock.now += 1
    assert book.expire_overdue() == [CommitmentSettled(job_id, "pacs", "expired",
                                                       "no storage commitment report before the deadline")]
    [delivery] = index.deliveries(job_id)
    assert delivery.state is DeliveryState.PENDING and delivery.next_attempt_at == clock.now + 5
    assert index.commitment("2.25.1").state is CommitmentState.EXPIRED  # type: ignore[union-attr]
    # a report arriving late for the expired transaction is taken (success) but changes nothing
    late = CommitmentReport("2.25.1", 1, ((CT, "5.1"),), ())
    assert book.accept(late, "PACS").status is Status.SUCCESS
    assert index.deliveries(job_id)[0].state is DeliveryState.PENDING

    waiting(index, job_id, "2.25.2", clock.now + 60)  # the second (last) try
    clock.now += 61
    [event] = book.expire_overdue()
    assert event.outcome == "expired"
    assert index.deliveries(job_id)[0].state is DeliveryState.DEAD
    assert index.job(job_id).state is JobState.DEAD_LETTER  # type: ignore[union-attr]


def test_a_restart_keeps_a_waiting_commitment_and_takes_its_report(tmp_path: Path) -> None:
    index = Index(tmp_path / "index.sqlite")
    config = config_for(tmp_path, 104)
    job_id = fake_sending_job(index, ("pacs",), ("5.1",))
    waiting(index, job_id, "2.25.7", index.clock() + 600)
    index.close()
    reopened = Index(tmp_path / "index.sqlite")  # the node restarted
    [found] = reopened.commitments(job_id)
    assert found.state is CommitmentState.WAITING and found.objects == ((CT, "5.1"),)
    book = CommitmentBook(reopened, config)
    assert book.accept(CommitmentReport("2.25.7", 1, ((CT, "5.1"),), ()), "OTHER").status \
        is Status.INVALID_ARGUMENT_VALUE  # another AE cannot settle the PACS's transaction
    answer = book.accept(CommitmentReport("2.25.7", 1, ((CT, "5.1"),), ()), "PACS")
    assert answer.status is Status.SUCCESS and answer.event is not None
    assert reopened.job(job_id).state is JobState.DONE  # type: ignore[union-attr]
    assert book.accept(CommitmentReport("2.25.7", 1, ((CT, "5.1"),), ()), "PACS") == answer.__class__(
        Status.SUCCESS)  # the same report twice: taken once


def test_an_index_from_before_storage_commitment_is_migrated(tmp_path: Path) -> None:
    index = Index(tmp_path / "index.sqlite")
    job_id = fake_sending_job(index, ("pacs",), ("5.1",))
    index.close()
    with sqlite3.connect(tmp_path / "index.sqlite") as db:  # as an index written before this change
        db.execute("DROP TABLE commitments")
        db.execute("ALTER TABLE delivery_objects DROP COLUMN committed_at")
    index = Index(tmp_path / "index.sqlite")
    [obj] = index.delivery_objects(job_id)
    assert obj.state is DeliveryState.PENDING and obj.committed_at is None
    waiting(index, job_id, "2.25.9", index.clock() + 60)
    assert index.commitment("2.25.9") is not None


def test_a_commit_destination_must_be_dimse() -> None:
    with pytest.raises(ValueError, match="Storage Commitment needs a DIMSE destination"):
        NodeConfig(destinations=[{"name": "web", "dicomweb": {"url": "http://127.0.0.1:1/dicom-web"},
                                  "commit": True}])


def test_the_wait_on_the_same_association_is_bounded(tmp_path: Path) -> None:
    """A PACS that accepts the N-ACTION and reports nothing: the try ends, the commitment waits."""
    ae = AE("PACS")
    ae.add_supported_context(STORAGE_COMMITMENT)
    actions = threading.Event()
    server = ae.start_server(("127.0.0.1", 0), block=False,
                             evt_handlers=[(evt.EVT_N_ACTION, lambda event: (actions.set(), (0x0000, None))[1])])
    try:
        config = config_for(tmp_path, server.server_address[1])
        index = Index(config.index_path)
        job_id = fake_sending_job(index, ("pacs",), ("5.1",))
        committer = committer_for(config.destinations[0], calling_ae="SEGNODE", dispatch=config.dispatch,
                                  book=CommitmentBook(index, config))
        assert committer is not None
        waiting(index, job_id, "2.25.3", index.clock() + 60)
        assert committer.request("2.25.3", [(CT, "5.1")]) == []
        assert actions.is_set()
        assert index.commitment("2.25.3").state is CommitmentState.WAITING  # type: ignore[union-attr]
    finally:
        server.shutdown()


def test_metrics_count_commitments_and_show_stored_against_committed(tmp_path: Path) -> None:
    index = Index(tmp_path / "index.sqlite")
    config = config_for(tmp_path, 104)
    book = CommitmentBook(index, config)
    job_id = fake_sending_job(index, ("pacs", "other"), ("5.1",))
    waiting(index, job_id, "2.25.11", index.clock() + 60)
    index.request_commitment(job_id, "other", "2.25.12", [(CT, "5.1")], index.clock() + 60)
    metrics = NodeMetrics(OpsDB(tmp_path / "index.sqlite"), None)
    answer = book.accept(CommitmentReport("2.25.11", 1, ((CT, "5.1"),), ()), "PACS")
    assert answer.event is not None
    metrics.on_event(answer.event)
    parsed = samples(metrics.render().decode())
    assert value(parsed, "segnode_storage_commitments_total", destination="pacs", outcome="committed") == 1
    assert value(parsed, "segnode_deliveries", state="done") == 1
    assert value(parsed, "segnode_deliveries", state="stored") == 1
