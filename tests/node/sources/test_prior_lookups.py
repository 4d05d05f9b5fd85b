"""A source PACS that never answers holds up only the jobs whose priors it was asked for (node/sources/prior_lookups.py).

Before, the priors were looked up as the job spec was made: with remote
workers in the loop that publishes every job, with local ones in a worker's
slot, so a silent source PACS held up jobs that had nothing to do with it.
The silent source here is a TCP listener that accepts and never answers
(released by the test, so nothing depends on timing); the other is a closed
port.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from segnode.node.config import NodeConfig
from segnode.node.sources.prior_lookups import PriorLookups
from segnode.storage.index import Index, InstanceRecord
from segnode.storage.spool import Spool


class Silent:
    """Accepts associations and never answers them, until released (then closes them)."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self.connected = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.accepted.append(conn)
            self.connected.set()

    def release(self) -> None:
        self.listener.close()
        for conn in self.accepted:
            conn.close()


@pytest.fixture
def silent() -> Iterator[Silent]:
    peer = Silent()
    try:
        yield peer
    finally:
        peer.release()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def complete_job(index: Index, spool: Spool, n: int, priors_from: str | None) -> int:
    """A routed CT series of patient ``n`` (one instance in the spool), asking for priors from ``priors_from``."""
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    ds = Dataset()
    ds.PatientID, ds.StudyDate, ds.Modality = f"PAT-{n}", "20240205", "CT"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, sop
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = f"{study}/{series}/{sop}.dcm"
    (spool.root / path).parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(spool.root / path, enforce_file_format=True)
    index.record_instance(InstanceRecord(
        sop_uid=sop, series_uid=series, study_uid=study, sop_class_uid=ds.SOPClassUID,
        transfer_syntax_uid=ExplicitVRLittleEndian, modality="CT", path=path, size_bytes=10, calling_ae="SCANNER",
        called_ae="SEGNODE", sender_host="127.0.0.1"))
    [job] = [j for j in index.jobs() if j.series_uid == series]
    options = {"priors": {"source": priors_from}} if priors_from else {}
    assert index.mark_complete(job.job_id, rule="r", profile="lungs", backend=None, destinations=(), options=options)
    return job.job_id


def wait_for(what: Callable[[], bool], seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not what():
        assert time.monotonic() < deadline, "not within the deadline"
        time.sleep(0.05)


def options(index: Index, job_id: int) -> dict[str, object]:
    job = index.job(job_id)
    assert job is not None
    return job.options


def test_a_silent_source_holds_up_only_its_own_jobs(tmp_path: Path, silent: Silent) -> None:
    config = NodeConfig(state_dir=tmp_path / "state", sources=[
        {"name": "silent", "kind": "dimse", "ae_title": "SILENT", "host": "127.0.0.1", "port": silent.port,
         "connect_timeout_s": 30, "query_timeout_s": 300},
        {"name": "down", "kind": "dimse", "ae_title": "DOWN", "host": "127.0.0.1", "port": closed_port(),
         "connect_timeout_s": 5}])
    index, spool = Index(config.index_path), Spool(config.spool_dir)
    waits = complete_job(index, spool, 1, "silent")  # the oldest
    down = complete_job(index, spool, 2, "down")
    plain = complete_job(index, spool, 3, None)
    assert [j.job_id for j in index.awaiting_priors()] == [waits, down]

    first = index.claim_next()  # the two older jobs wait for their priors; the one without is claimed
    assert first is not None and first.job_id == plain
    assert index.claim_next() is None

    found: list[int] = []
    lookups = PriorLookups(config, index, spool, None, lambda: found.append(1))
    try:
        lookups.start()
        lookups.start()  # a job being looked up is not handed out twice
        assert silent.connected.wait(30)
        wait_for(lambda: "priors_found" in options(index, down))
        assert options(index, down)["priors_found"] == []
        assert str(options(index, down)["priors_note"]).startswith("priors from down: ")  # says why, never fails
        second = index.claim_next()  # the other source's job went on while the silent source said nothing
        assert second is not None and second.job_id == down
        assert index.claim_next() is None and "priors_found" not in options(index, waits)
        assert lookups.pending() == 1

        silent.release()  # the source drops the association: its job goes on without priors, saying why
        wait_for(lambda: lookups.pending() == 0)
        assert str(options(index, waits)["priors_note"]).startswith("priors from silent: ")
        third = index.claim_next()
        assert third is not None and third.job_id == waits
        assert len(found) == 2 and index.awaiting_priors() == []
    finally:
        lookups.close()


def test_a_lookup_recorded_is_kept_across_a_retry_and_not_asked_again(tmp_path: Path) -> None:
    config = NodeConfig(state_dir=tmp_path / "state", sources=[
        {"name": "down", "kind": "dimse", "ae_title": "DOWN", "host": "127.0.0.1", "port": closed_port()}])
    index, spool = Index(config.index_path), Spool(config.spool_dir)
    job_id = complete_job(index, spool, 1, "down")
    assert index.record_priors(job_id, {"priors_found": [{"study_uid": "1.2", "series_uid": "1.2.3"}]})
    assert index.awaiting_priors() == []
    job = index.claim_next()
    assert job is not None and job.options["priors_found"] == [{"study_uid": "1.2", "series_uid": "1.2.3"}]
    assert not index.record_priors(job_id, {"priors_found": []})  # segmenting: no longer complete, not changed
