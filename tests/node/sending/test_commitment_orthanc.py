"""Storage Commitment with Orthanc as the PACS: its N-EVENT-REPORT comes on a new association to the node.

The node's own pieces, wired as ``segnode serve`` wires them: the receiver
(:func:`segnode.node.dicom_in.server.start_scp`, Orthanc's modality
``SEGNODE`` points at it) and a destination queue whose courier C-STOREs a
job's objects and asks for their commitment (:class:`Senders` builds the same).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from pydicom import dcmread
from segnode.node.commitment import CommitmentBook, Reference
from segnode.node.config import NodeConfig
from segnode.node.dicom_in.server import RunningSCP, start_scp
from segnode.node.events import CommitmentSettled, Delivered, Event
from segnode.node.sending.commitment import Committer, committer_for
from segnode.node.sending.delivery import Courier, DeliveryTask
from segnode.node.sending.sender import sender_for
from segnode.storage.index import CommitmentState, DeliveryState, Index, InstanceRecord, JobState
from segnode.storage.spool import Spool

from tests.paths import DATA
from tests.peers import DCMTK_ENV, OrthancPeer, free_port, orthanc, stop_process, wait_until

pytestmark = pytest.mark.peer
OBJECTS = sorted((DATA / "thorax_cta").glob("CT000[1-3].dcm"))


def sending_job(index: Index, folder: Path, destination: str) -> int:
    """A job in ``sending`` whose three objects (CT slices standing in for results) are in ``folder``."""
    index.record_instance(InstanceRecord(
        sop_uid="1.1", series_uid="1.2.3", study_uid="1.2", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax_uid="1.2.840.10008.1.2.1", modality="CT", path="1.2/1.2.3/1.1.dcm", size_bytes=10,
        calling_ae="SCANNER", called_ae="SEGNODE", sender_host="127.0.0.1"))
    job_id = index.jobs()[0].job_id
    index.mark_complete(job_id, rule="r", profile="lungs", backend=None, destinations=(destination,))
    index.claim_next()
    folder.mkdir(parents=True)
    outputs = []
    for path in OBJECTS:
        shutil.copy(path, folder / path.name)
        ds = dcmread(path, stop_before_pixels=True)
        outputs.append({"kind": "seg", "path": path.name, "sop_class_uid": str(ds.SOPClassUID),
                        "sop_instance_uid": str(ds.SOPInstanceUID), "series_instance_uid": str(ds.SeriesInstanceUID)})
    index.mark_encoded(job_id, seg_path=outputs[0]["path"], seg_series_uid="9", seg_sop_uid="9.1",
                       backend_used="b", model_version="1", outputs=outputs, result_dir=str(folder))
    return job_id


def node_config(tmp_path: Path, pacs: OrthancPeer | None, port: int) -> NodeConfig:
    pacs_port = pacs.dicom_port if pacs is not None else port
    return NodeConfig(port=0, state_dir=tmp_path / "state", limits={"min_free_disk_mb": 1},
                      dispatch={"max_attempts": 5, "backoff_initial_s": 0.2, "backoff_max_s": 0.5, "timeout_s": 10},
                      destinations=[{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs_port,
                                     "commit": True, "commit_timeout_s": 30}])


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[RunningSCP, Index]]:
    """The node's receiver (Orthanc reports to it) and the index it shares with the courier."""
    config = node_config(tmp_path, None, 1)
    index = Index(config.index_path)
    scp = start_scp(config, Spool(config.spool_dir), index)
    yield scp, index
    scp.stop()


def courier(config: NodeConfig, index: Index, events: list[Event],
            wrap: type[StopFirst] | None = None) -> Courier:
    [dest] = config.destinations
    committer = committer_for(dest, calling_ae=config.ae_title, dispatch=config.dispatch,
                              book=CommitmentBook(index, config))
    assert committer is not None
    return Courier(dest.name, sender_for(dest, calling_ae=config.ae_title, dispatch=config.dispatch), index,
                   config.dispatch, events.append, wrap(committer) if wrap else committer)


def attempt(c: Courier, index: Index, job_id: int) -> None:
    [delivery] = index.deliveries(job_id)
    c.attempt(DeliveryTask(job_id, c.destination, delivery.attempts))


def delivery_state(index: Index, job_id: int) -> DeliveryState:
    return index.deliveries(job_id)[0].state


def test_orthanc_commits_what_it_stored_and_the_delivery_is_committed(
        tmp_path: Path, receiver: tuple[RunningSCP, Index]) -> None:
    scp, index = receiver
    with orthanc(tmp_path / "orthanc", node_port=scp.port) as pacs:
        config = node_config(tmp_path, pacs, scp.port)
        job_id = sending_job(index, tmp_path / "job", "pacs")
        events: list[Event] = []
        attempt(courier(config, index, events), index, job_id)
        assert len(pacs.get("/instances")) == 3
        [commitment] = index.commitments(job_id)
        assert len(commitment.objects) == 3
        wait_until(lambda: delivery_state(index, job_id) is DeliveryState.DONE, 30, "Orthanc's report")
    assert index.commitment(commitment.transaction_uid).state is CommitmentState.COMMITTED  # type: ignore[union-attr]
    assert all(o.committed_at is not None for o in index.delivery_objects(job_id))
    assert index.job(job_id).state is JobState.DONE  # type: ignore[union-attr]
    assert events[0] == Delivered(job_id, "pacs", True, "stored 3 object(s); storage commitment requested")


class StopFirst:
    """Stops Orthanc before the first N-ACTION (the objects are stored; the PACS is gone before it answers)."""

    pacs: OrthancPeer

    def __init__(self, inner: Committer) -> None:
        self.inner = inner
        self.calls = 0

    @property
    def timeout_s(self) -> float:
        return self.inner.timeout_s

    def request(self, transaction_uid: str, objects: Sequence[Reference]) -> list[CommitmentSettled]:
        self.calls += 1
        if self.calls == 1:
            stop_process(self.pacs.proc)
        return self.inner.request(transaction_uid, objects)


def test_orthanc_stopped_before_it_answers_is_not_committed_then_retried_and_committed(
        tmp_path: Path, receiver: tuple[RunningSCP, Index]) -> None:
    scp, index = receiver
    with orthanc(tmp_path / "orthanc", node_port=scp.port) as pacs:
        config = node_config(tmp_path, pacs, scp.port)
        job_id = sending_job(index, tmp_path / "job", "pacs")
        events: list[Event] = []
        StopFirst.pacs = pacs
        c = courier(config, index, events, StopFirst)
        attempt(c, index, job_id)
        [first] = index.commitments(job_id)
        assert first.state is CommitmentState.REFUSED  # no association: not committed
        [row] = index.deliveries(job_id)
        assert row.state is DeliveryState.PENDING and row.attempts == 1 and "storage commitment" in (row.last_error or "")
        assert all(o.state is DeliveryState.DONE and o.committed_at is None for o in index.delivery_objects(job_id))
        assert index.job(job_id).state is JobState.SENDING  # type: ignore[union-attr]
        assert [e for e in events if isinstance(e, CommitmentSettled)] == [
            CommitmentSettled(job_id, "pacs", "refused", first.detail or "")]

        # Orthanc comes back (same configuration, ports and storage): the retry asks again, and only asks
        pacs.proc = subprocess.Popen(["Orthanc", str(tmp_path / "orthanc" / "orthanc.json")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=DCMTK_ENV)
        wait_until(lambda: _answers(pacs), 30, "Orthanc to come back")
        wait_until(lambda: index.deliveries(job_id)[0].next_attempt_at <= index.clock(), 5, "the backoff")
        attempt(c, index, job_id)
        assert len(pacs.get("/instances")) == 3
        wait_until(lambda: delivery_state(index, job_id) is DeliveryState.DONE, 30, "Orthanc's report")
        second = index.commitments(job_id)[1]
    assert index.commitment(second.transaction_uid).state is CommitmentState.COMMITTED  # type: ignore[union-attr]
    assert index.job(job_id).state is JobState.DONE  # type: ignore[union-attr]
    assert [e.message for e in events if isinstance(e, Delivered)] == [
        "stored 3 object(s); storage commitment requested", "nothing left to send; storage commitment requested"]


def _answers(pacs: OrthancPeer) -> bool:
    try:
        return bool(pacs.get("/system"))
    except OSError:
        return False


def test_a_report_that_cannot_reach_the_node_times_out_and_the_commitment_is_asked_again(tmp_path: Path) -> None:
    """The node's receiver is down when Orthanc reports: no report by the deadline → asked again → committed."""
    config = node_config(tmp_path, None, 1)
    index = Index(config.index_path)
    scp = start_scp(config, Spool(config.spool_dir), index)
    port = scp.port
    scp.stop()  # Orthanc's report association will find no one
    with orthanc(tmp_path / "orthanc", node_port=port) as pacs:
        config = node_config(tmp_path, pacs, port).model_copy(update={"port": port})
        dest = config.destinations[0].model_copy(update={"commit_timeout_s": 1.0})
        config = config.model_copy(update={"destinations": [dest]})
        job_id = sending_job(index, tmp_path / "job", "pacs")
        events: list[Event] = []
        c = courier(config, index, events)
        attempt(c, index, job_id)
        [first] = index.commitments(job_id)
        book = CommitmentBook(index, config)
        wait_until(lambda: book.expire_overdue(), 10, "the commitment's deadline")
        assert index.commitment(first.transaction_uid).state is CommitmentState.EXPIRED  # type: ignore[union-attr]
        assert delivery_state(index, job_id) is DeliveryState.PENDING
        assert all(o.committed_at is None for o in index.delivery_objects(job_id))
        scp = start_scp(config, Spool(config.spool_dir), index)  # the receiver is back, on the same port
        try:
            wait_until(lambda: index.deliveries(job_id)[0].next_attempt_at <= index.clock(), 5, "the backoff")
            attempt(c, index, job_id)
            wait_until(lambda: delivery_state(index, job_id) is DeliveryState.DONE, 30, "Orthanc's second report")
        finally:
            scp.stop()
    assert [x.state for x in index.commitments(job_id)] == [CommitmentState.EXPIRED, CommitmentState.COMMITTED]
    assert index.job(job_id).state is JobState.DONE  # type: ignore[union-attr]


@pytest.mark.slow
def test_segnode_serve_counts_a_job_done_only_once_orthanc_commits_its_objects(tmp_path: Path) -> None:
    """The whole node: a routed series' SEG to Orthanc with ``commit: true``; the job API and metrics show it."""
    from tests.node.test_outputs_e2e import config as e2e_config
    from tests.node.test_outputs_e2e import wait_job
    from tests.peers import node, store_statuses, storescu

    node_port = free_port()
    with orthanc(tmp_path / "orthanc", node_port=node_port) as pacs:
        rule = {"profile": "lungs", "backend": "hu_based", "destinations": ["pacs"], "outputs": ["seg"]}
        cfg = e2e_config(tmp_path, rule, [{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1",
                                           "port": pacs.dicom_port, "commit": True}], port=node_port)
        with node(cfg) as running:
            sent = storescu(running.port, [DATA / "thorax_cta"])
            assert store_statuses(sent.stdout + sent.stderr) == ["Success"] * 164
            index = Index(running.state_dir / "index.sqlite")
            job = wait_job(index, {JobState.DONE, JobState.DEAD_LETTER, JobState.FAILED})
            assert job.state is JobState.DONE, job.reason
            [commitment] = index.commitments(job.job_id)
            assert commitment.state is CommitmentState.COMMITTED
            assert all(o.committed_at is not None for o in index.delivery_objects(job.job_id))
            api = running.cli("jobs", "show", str(job.job_id))
            assert api.returncode == 0, api.stderr
