"""The receiver takes Storage Commitment reports (N-EVENT-REPORT) from the destinations it asks, and only those.

A pynetdicom requestor stands in for a PACS that reports on a new
association, proposing the SCP role for the Push Model by role selection (as
Orthanc does).  Whatever is wrong in a report is answered with a named
N-EVENT-REPORT-RSP status; the association and the receiver carry on.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pynetdicom import AE, build_role
from segnode.node.commitment import STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE
from segnode.node.status import Status
from segnode.node.config import NodeConfig
from segnode.node.dicom_in.server import RunningSCP, start_scp
from segnode.storage.index import CommitmentState, DeliveryState, Index, JobState
from segnode.storage.spool import Spool

from tests.node.dicom_in.test_scp import echo
from tests.node.sending.test_senders import sending_job
from tests.raw_peer import IMPLICIT_LE, RELEASE_RQ, RawPeer, command_set, p_data

CT = "1.2.840.10008.5.1.4.1.1.2"
TRANSACTION = "2.25.4242"


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[RunningSCP, Index, int]]:
    """The receiver, with a job whose delivery to ``pacs`` (AE ORTHANC) awaits commitment ``TRANSACTION``."""
    config = NodeConfig(port=0, state_dir=tmp_path / "state", limits={"min_free_disk_mb": 1},
                        destinations=[{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": 104,
                                       "commit": True}])
    index = Index(config.index_path)
    job_id = sending_job(index, ("pacs",), ("5.1", "5.2"))
    index.request_commitment(job_id, "pacs", TRANSACTION, [(CT, "5.1"), (CT, "5.2")], index.clock() + 600)
    scp = start_scp(config, Spool(config.spool_dir), index)
    yield scp, index, job_id
    scp.stop()


def report(transaction: str | None = TRANSACTION, committed: tuple[str, ...] = ("5.1", "5.2"),
           failed: tuple[str, ...] = ()) -> Dataset:
    ds = Dataset()
    if transaction is not None:
        ds.TransactionUID = transaction
    ds.ReferencedSOPSequence = DicomSequence([_ref(uid) for uid in committed])
    if failed:
        ds.FailedSOPSequence = DicomSequence([_ref(uid, failure=0x0110) for uid in failed])
    return ds


def _ref(uid: str, failure: int | None = None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = CT
    item.ReferencedSOPInstanceUID = uid
    if failure is not None:
        item.FailureReason = failure
    return item


def send_reports(port: int, *reports: tuple[Dataset, int, str], calling: str = "ORTHANC") -> list[int | None]:
    """Each (event information, event type, SOP Instance) in one association; the statuses answered."""
    ae = AE(calling)
    ae.add_requested_context(STORAGE_COMMITMENT)
    ae.add_requested_context("1.2.840.10008.1.1")  # Verification: the association stands without the other
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title="SEGNODE",
                         ext_neg=[build_role(STORAGE_COMMITMENT, scu_role=False, scp_role=True)])
    assert assoc.is_established
    try:
        accepted = [cx for cx in assoc.accepted_contexts if cx.abstract_syntax == STORAGE_COMMITMENT]
        if not accepted:
            return [None] * len(reports)
        [context] = accepted
        assert context.as_scp and not context.as_scu  # our role answer: the PACS acts as the SCP
        statuses = []
        for ds, event_type, instance in reports:
            status, _ = assoc.send_n_event_report(ds, event_type, STORAGE_COMMITMENT, instance)
            statuses.append(int(status.Status) if "Status" in status else None)
        return statuses
    finally:
        if assoc.is_established:
            assoc.release()


def test_a_report_from_the_destination_commits_its_delivery(node: tuple[RunningSCP, Index, int]) -> None:
    scp, index, job_id = node
    assert send_reports(scp.port, (report(), 1, STORAGE_COMMITMENT_INSTANCE)) == [0x0000]
    assert index.deliveries(job_id)[0].state is DeliveryState.DONE
    assert index.job(job_id).state is JobState.DONE  # type: ignore[union-attr]
    assert index.commitment(TRANSACTION).state is CommitmentState.COMMITTED  # type: ignore[union-attr]


def test_a_report_of_failures_makes_the_failed_objects_pending(node: tuple[RunningSCP, Index, int]) -> None:
    scp, index, job_id = node
    answer = send_reports(scp.port, (report(committed=("5.1",), failed=("5.2",)), 2, STORAGE_COMMITMENT_INSTANCE))
    assert answer == [0x0000]
    objects = {o.sop_instance_uid: o for o in index.delivery_objects(job_id)}
    assert objects["5.1"].committed_at is not None
    assert objects["5.2"].state is DeliveryState.PENDING and "failure reason 272" in (objects["5.2"].last_error or "")
    assert index.deliveries(job_id)[0].state is DeliveryState.PENDING
    assert index.job(job_id).state is JobState.SENDING  # type: ignore[union-attr]


def test_bad_reports_get_a_named_status_and_change_nothing(
        node: tuple[RunningSCP, Index, int], caplog: pytest.LogCaptureFixture) -> None:
    scp, index, job_id = node
    caplog.set_level(logging.INFO)
    bad_failed = report(committed=("5.1",), failed=("5.2",))
    del bad_failed.FailedSOPSequence[0].ReferencedSOPInstanceUID
    statuses = send_reports(
        scp.port,
        (report(transaction="2.25.999"), 1, STORAGE_COMMITMENT_INSTANCE),  # a transaction we never asked for
        (report(), 3, STORAGE_COMMITMENT_INSTANCE),  # no such event type
        (report(transaction=None), 1, STORAGE_COMMITMENT_INSTANCE),  # no Transaction UID
        (report(transaction="not a uid"), 1, STORAGE_COMMITMENT_INSTANCE),
        (report(), 1, "1.2.3.4"),  # not the well-known instance
        (report(failed=("5.2",)), 1, STORAGE_COMMITMENT_INSTANCE),  # event 1 with failures
        (report(committed=("5.1",)), 2, STORAGE_COMMITMENT_INSTANCE),  # event 2 without failures
        (bad_failed, 2, STORAGE_COMMITMENT_INSTANCE),  # a failed item without its instance
    )
    assert statuses == [Status.INVALID_ARGUMENT_VALUE, Status.NO_SUCH_EVENT_TYPE,
                        Status.INVALID_ARGUMENT_VALUE, Status.INVALID_ARGUMENT_VALUE,
                        Status.NO_SUCH_SOP_INSTANCE, Status.INVALID_ARGUMENT_VALUE,
                        Status.INVALID_ARGUMENT_VALUE, Status.INVALID_ARGUMENT_VALUE]
    assert index.deliveries(job_id)[0].state is DeliveryState.STORED  # still waiting
    assert index.commitment(TRANSACTION).state is CommitmentState.WAITING  # type: ignore[union-attr]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert echo(scp.port) == 0x0000  # the receiver carries on
    assert send_reports(scp.port, (report(), 1, STORAGE_COMMITMENT_INSTANCE)) == [0x0000]


def test_only_a_commit_destination_may_report(node: tuple[RunningSCP, Index, int]) -> None:
    scp, index, job_id = node
    assert send_reports(scp.port, (report(), 1, STORAGE_COMMITMENT_INSTANCE), calling="SCANNER") == [None]
    assert index.deliveries(job_id)[0].state is DeliveryState.STORED


def test_a_report_without_event_information_or_undecodable_is_refused(node: tuple[RunningSCP, Index, int]) -> None:
    scp, index, _ = node
    book = scp.server.commitments
    ts = "1.2.840.10008.1.2"
    no_data = book.receive(STORAGE_COMMITMENT, STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE, 1, None, ts, "ORTHANC")
    assert no_data.status is Status.INVALID_ARGUMENT_VALUE
    garbage = book.receive(STORAGE_COMMITMENT, STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE, 1,
                           b"\x08\x00\x95\x11ZZ\x04\x001234", "1.2.840.10008.1.2.1", "ORTHANC")  # VR "ZZ"
    assert garbage.status is Status.PROCESSING_FAILURE
    on_ct = book.receive(CT, STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE, 1, b"", ts, "ORTHANC")
    assert on_ct.status is Status.NO_SUCH_SOP_CLASS


def test_broken_reports_on_the_wire_are_answered_and_the_association_goes_on(
        node: tuple[RunningSCP, Index, int]) -> None:
    """No role selection proposed (tolerated), a report without its dataset, one whose dataset is garbage."""
    scp, index, _ = node
    with RawPeer(scp.port) as peer:
        accepted = peer.associate([(1, STORAGE_COMMITMENT, (IMPLICIT_LE,))], calling="ORTHANC")
        assert accepted is not None and accepted.context_results() == {1: 0}
        peer.send(p_data(1, 0x03, command_set(0x0100, 7, STORAGE_COMMITMENT)))  # Command Data Set Type: none
        answer = peer.read()
        assert answer is not None and answer.status == Status.INVALID_ARGUMENT_VALUE
        assert int.from_bytes(answer.command[0x0100], "little") == 0x8100
        assert int.from_bytes(answer.command[0x0120], "little") == 7
        peer.send(p_data(1, 0x03, command_set(0x0100, 8, STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE)))
        peer.send(p_data(1, 0x02, b"\x08\x00\x95\x11\xff\xff\xff\x7f" + b"\xfe" * 30))
        answer = peer.read()
        assert answer is not None and answer.status == Status.NO_SUCH_EVENT_TYPE  # no Event Type ID
        peer.send(RELEASE_RQ)
        released = peer.read()
        assert released is not None and released.kind == 0x06
    assert index.commitment(TRANSACTION).state is CommitmentState.WAITING  # type: ignore[union-attr]
