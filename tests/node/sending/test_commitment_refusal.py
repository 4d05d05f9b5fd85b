"""Storage Commitment: an N-ACTION refused for good ends the commitment at once; a transient failure is asked again.

The classification (node/commitment.py ``action_category``, PS3.7 Annex C /
10.1.4.1.10), the book's handling and a restart, then real peers: a PACS
scripted at the byte level (tests/node/sending/action_peer.py, no pynetdicom)
answering 0x0110 then 0x0112, fixed, and asked again after ``segnode jobs
retry``; DCMTK ``storescp`` as a destination without Storage Commitment (no
presentation context: permanent) and with the context accepted but no
N-ACTION handling (it aborts: transient).
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from segnode.node.cli.main import main
from segnode.node.commitment import CommitmentBook, CommitmentReport, action_category, status_text
from segnode.node.config import NodeConfig
from segnode.node.events import CommitmentSettled, Delivered, Event
from segnode.node.http_in.base import Request
from segnode.node.ops.api import OpsApp
from segnode.node.ops.metrics import NodeMetrics
from segnode.node.ops.status_page import render_status
from segnode.node.ops.views import OpsDB
from segnode.node.sending.commitment import committer_for
from segnode.node.sending.delivery import Courier, DeliveryTask
from segnode.node.sending.sender import sender_for
from segnode.node.status import Category, category
from segnode.storage.index import CommitmentState, DeliveryState, Index, JobState, ObjectOutcome

from tests.node.ops.test_metrics import samples, value
from tests.node.sending.action_peer import CT, ActionPeer
from tests.node.sending.test_commitment_orthanc import sending_job
from tests.node.sending.test_senders import sending_job as fake_sending_job
from tests.peers import storescp, wait_until

STORED, RETRYABLE, PERMANENT = Category.STORED, Category.RETRYABLE, Category.PERMANENT
STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"


# -- the classification -----------------------------------------------------------------------


@pytest.mark.parametrize(("code", "expected"), [
    (0x0000, STORED),
    # transient: the SCP cannot do it now
    (0x0110, RETRYABLE), (0x0213, RETRYABLE), (0xA700, RETRYABLE), (0xA7FF, RETRYABLE),
    # permanent: a verdict on what was asked
    (0x0112, PERMANENT), (0x0114, PERMANENT), (0x0115, PERMANENT), (0x0117, PERMANENT), (0x0118, PERMANENT),
    (0x0119, PERMANENT), (0x0122, PERMANENT), (0x0123, PERMANENT), (0x0124, PERMANENT), (0x0210, PERMANENT),
    (0x0211, PERMANENT), (0x0212, PERMANENT), (0xC000, PERMANENT), (0x0199, PERMANENT),
])
def test_an_n_action_status_is_stored_retryable_or_permanent(code: int, expected: Category) -> None:
    assert action_category(code) is expected


def test_a_processing_failure_differs_only_for_the_n_action() -> None:
    assert category(0x0110) is PERMANENT  # a C-STORE or STOW-RS answered 0x0110: the object is refused
    assert action_category(0x0110) is RETRYABLE


@pytest.mark.parametrize(("code", "text"), [
    (0x0112, "0x0112 (no such SOP instance)"), (0x0122, "0x0122 (SOP class not supported)"),
    (0x0119, "0x0119 (class instance conflict)"), (0x0110, "0x0110 (processing failure)"),
    (0xA7FF, "0xA7FF (refused: out of resources)"), (0x0199, "0x0199 (failure)"),
])
def test_a_status_is_named_from_the_status_table(code: int, text: str) -> None:
    assert status_text(code) == text


# -- the book -------------------------------------------------------------------------------------


def config_for(tmp_path: Path, port: int, **dispatch: float) -> NodeConfig:
    return NodeConfig(state_dir=tmp_path / "state",
                      dispatch={"max_attempts": 3, "backoff_initial_s": 0.1, "backoff_max_s": 0.1, **dispatch},
                      destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": port,
                                     "commit": True, "commit_timeout_s": 60}])


def asked(index: Index, job_id: int, transaction: str) -> None:
    """The objects stored at ``pacs`` and their commitment asked for (as the courier records it)."""
    index.request_commitment(job_id, "pacs", transaction, [(CT, "5.1")], index.clock() + 60,
                             [ObjectOutcome("5.1", DeliveryState.DONE)])


def test_a_permanent_refusal_ends_the_commitment_at_once_and_a_restart_keeps_it(tmp_path: Path) -> None:
    config = config_for(tmp_path, 104)
    index = Index(config.index_path)
    job_id = fake_sending_job(index, ("pacs",), ("5.1",))
    asked(index, job_id, "2.25.1")
    event = CommitmentBook(index, config).refused(
        "2.25.1", "N-ACTION refused with status 0x0112 (no such SOP instance)", PERMANENT)
    reason = "storage commitment refused for good: N-ACTION refused with status 0x0112 (no such SOP instance)"
    assert event == CommitmentSettled(job_id, "pacs", "refused", reason)
    index.close()

    reopened = Index(config.index_path)  # the node restarted: the outcome stays, nothing is asked again
    book = CommitmentBook(reopened, config)
    [delivery] = reopened.deliveries(job_id)
    assert delivery.state is DeliveryState.DEAD and delivery.attempts == 1 and delivery.last_error == reason
    job = reopened.job(job_id)
    assert job is not None and job.state is JobState.DEAD_LETTER and job.reason == f"pacs: {reason}"
    assert reopened.commitment("2.25.1").state is CommitmentState.REFUSED  # type: ignore[union-attr]
    [obj] = reopened.delivery_objects(job_id)
    assert obj.state is DeliveryState.DONE and obj.committed_at is None  # stored there, never committed
    assert book.expire_overdue() == []
    assert [j.job_id for j, _ in reopened.due_deliveries()] == []
    # a report arriving after all (a PACS that committed anyway) is taken but changes nothing
    late = book.accept(CommitmentReport("2.25.1", 1, ((CT, "5.1"),), ()), "PACS")
    assert late.event is None and reopened.job(job_id).state is JobState.DEAD_LETTER  # type: ignore[union-attr]


def test_a_transient_refusal_is_asked_again_under_the_policy(tmp_path: Path) -> None:
    config = config_for(tmp_path, 104, backoff_initial_s=30, backoff_max_s=30)
    index = Index(config.index_path)
    job_id = fake_sending_job(index, ("pacs",), ("5.1",))
    asked(index, job_id, "2.25.2")
    before = index.clock()
    event = CommitmentBook(index, config).refused("2.25.2", "N-ACTION refused with status 0x0110 (processing failure)",
                                                  RETRYABLE)
    assert event is not None and event.outcome == "refused"
    [delivery] = index.deliveries(job_id)
    assert delivery.state is DeliveryState.PENDING and delivery.next_attempt_at >= before + 30
    job = index.job(job_id)
    assert job is not None and job.state is JobState.SENDING and "(will retry)" in (job.reason or "")


# -- real peers -------------------------------------------------------------------------------------


def courier(config: NodeConfig, index: Index, events: list[Event]) -> Courier:
    [dest] = config.destinations
    committer = committer_for(dest, calling_ae="SEGNODE", dispatch=config.dispatch, book=CommitmentBook(index, config))
    return Courier(dest.name, sender_for(dest, calling_ae="SEGNODE", dispatch=config.dispatch), index,
                   config.dispatch, events.append, committer)


def job_view(index_path: Path, job_id: int) -> dict[str, Any]:
    """``GET /api/v1/jobs/{id}``, answered in-process by the ops API."""
    def unused(*_: object) -> Any:
        raise AssertionError("not called")

    app = OpsApp(db=OpsDB(index_path), retry=unused, metrics=lambda: b"", rules=None, readiness={},
                 validate_rules=unused, datasets=dict, status_page=lambda: "")
    response = app.job(Request(method="GET", path=f"/api/v1/jobs/{job_id}", query={}, body=b"", client="127.0.0.1",
                               params={"job_id": str(job_id)}))
    view: dict[str, Any] = json.loads(response.body)
    return view


def attempt(c: Courier, index: Index, job_id: int) -> None:
    [delivery] = index.deliveries(job_id)
    wait_until(lambda: delivery.next_attempt_at <= index.clock(), 5, "the backoff")
    c.attempt(DeliveryTask(job_id, c.destination, delivery.attempts))


def test_a_scripted_pacs_refusing_for_good_dead_letters_at_once_and_jobs_retry_asks_again(tmp_path: Path) -> None:
    """0x0110 → asked again; 0x0112 → dead now (3 tries allowed); fixed → ``segnode jobs retry`` → asked, committed."""
    with ActionPeer([(0x0110, "index busy"), (0x0112, "instance unknown here")]) as pacs:
        config = config_for(tmp_path, pacs.port)
        index = Index(config.index_path)
        job_id = sending_job(index, tmp_path / "job", "pacs")
        uids = sorted(o.sop_instance_uid for o in index.delivery_objects(job_id))
        events: list[Event] = []
        c = courier(config, index, events)

        attempt(c, index, job_id)  # stores the objects; the N-ACTION is answered 0x0110: asked again
        assert sorted(pacs.stored) == uids
        [delivery] = index.deliveries(job_id)
        assert delivery.state is DeliveryState.PENDING
        assert delivery.last_error == ("storage commitment request: N-ACTION refused with status "
                                       "0x0110 (processing failure): index busy")

        attempt(c, index, job_id)  # nothing sent again; the N-ACTION is answered 0x0112: refused for good
        assert sorted(pacs.stored) == uids
        reason = ("storage commitment refused for good: N-ACTION refused with status 0x0112 "
                  "(no such SOP instance): instance unknown here")
        [delivery] = index.deliveries(job_id)
        assert delivery.state is DeliveryState.DEAD and delivery.attempts == 2 and delivery.last_error == reason
        assert index.job(job_id).state is JobState.DEAD_LETTER  # type: ignore[union-attr]
        assert [e.outcome for e in events if isinstance(e, CommitmentSettled)] == ["refused", "refused"]
        assert [a.TransactionUID for a in pacs.actions] == [x.transaction_uid for x in index.commitments(job_id)]
        assert all(o.state is DeliveryState.DONE and o.committed_at is None for o in index.delivery_objects(job_id))
        # the job API and the status page show the delivery dead with the destination's answer
        view = job_view(config.index_path, job_id)
        assert view["state"] == "dead_letter"
        [shown] = view["deliveries"]
        assert shown["state"] == "dead" and shown["last_error"] == reason
        assert all(o["state"] == "done" and o["committed_at"] is None for o in shown["objects"])
        assert html.escape(reason) in render_status(OpsDB(config.index_path), node="SEGNODE")

        # the destination is fixed (it now answers success): the operator retries the job
        config_path = tmp_path / "node.yaml"
        config_path.write_text(yaml.safe_dump({"state_dir": str(config.state_dir), "destinations": [
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port, "commit": True}]}))
        assert main(["jobs", "retry", str(job_id), "--config", str(config_path)]) == 0
        attempt(c, index, job_id)
        assert sorted(pacs.stored) == uids  # still nothing sent again: only asked
        assert pacs.associations == 4  # the C-STOREs once, then one N-ACTION per try
        third = index.commitments(job_id)[-1]
        assert third.state is CommitmentState.WAITING and len(third.objects) == 3
        assert index.deliveries(job_id)[0].state is DeliveryState.STORED
        assert [e.message for e in events if isinstance(e, Delivered)][-1] == (
            "nothing left to send; storage commitment requested")
        answer = CommitmentBook(index, config).accept(CommitmentReport(third.transaction_uid, 1, third.objects, ()),
                                                      "PACS")
        assert answer.event is not None and answer.event.outcome == "committed"
        assert index.job(job_id).state is JobState.DONE  # type: ignore[union-attr]


def test_dcmtk_storescp_without_storage_commitment_is_refused_for_good_after_storing(tmp_path: Path) -> None:
    """DCMTK's storescp stores the objects, then accepts no Storage Commitment context: permanent at once."""
    with storescp(tmp_path / "received") as scp:
        config = config_for(tmp_path, scp.port, max_attempts=5)
        index = Index(config.index_path)
        job_id = sending_job(index, tmp_path / "job", "pacs")
        events: list[Event] = []
        attempt(courier(config, index, events), index, job_id)
        wait_until(lambda: len(scp.received()) == 3, 10, "storescp to write the objects")
    [delivery] = index.deliveries(job_id)
    assert delivery.state is DeliveryState.DEAD and delivery.attempts == 1  # one try of five: no asking again
    assert delivery.last_error == ("storage commitment refused for good: destination accepts no presentation "
                                   "context for this SOP class (Storage Commitment)")
    assert index.job(job_id).state is JobState.DEAD_LETTER  # type: ignore[union-attr]
    assert all(o.state is DeliveryState.DONE for o in index.delivery_objects(job_id))
    metrics = NodeMetrics(OpsDB(config.index_path), None)
    for event in events:
        metrics.on_event(event)
    parsed = samples(metrics.render().decode())
    assert value(parsed, "segnode_storage_commitments_total", destination="pacs", outcome="refused") == 1
    assert value(parsed, "segnode_deliveries", state="dead") == 1


def test_dcmtk_storescp_aborting_the_n_action_is_asked_again(tmp_path: Path) -> None:
    """storescp accepting the context but not the N-ACTION aborts the association: transient, asked again."""
    with storescp(tmp_path / "received", accept=[STORAGE_COMMITMENT]) as scp:
        config = config_for(tmp_path, scp.port)
        index = Index(config.index_path)
        job_id = fake_sending_job(index, ("pacs",), ("5.1",))
        asked(index, job_id, "2.25.5")
        committer = committer_for(config.destinations[0], calling_ae="SEGNODE", dispatch=config.dispatch,
                                  book=CommitmentBook(index, config))
        assert committer is not None
        [event] = committer.request("2.25.5", [(CT, "5.1")])
    assert event.message == "storage commitment request: no N-ACTION response (timeout or abort)"
    [delivery] = index.deliveries(job_id)
    assert delivery.state is DeliveryState.PENDING
    assert index.job(job_id).state is JobState.SENDING  # type: ignore[union-attr]
