"""Priors on remote workers, against the node's real DICOMweb listener: what a job's token grants, what a worker fetches.

The node side is the real thing in-process (index, spool, store path,
:class:`RemoteJobs` for the tokens, the DICOMweb listener on a loopback port);
the worker side is :func:`segnode.node.remote.worker.fetch_priors` over HTTP.
The job has four priors as the node found them: a series it retrieved (in its
spool), its own earlier result (a SEG and a summary in its results folder), a
"result" whose path leaves the results folder, and a retrieved series the node
no longer holds.  No broker is needed: nothing is published.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest
import requests
from segnode.node.config import NodeConfig
from segnode.node.http_in.dicomweb import DicomWebApp, RunningDicomWeb, start_dicomweb
from segnode.node.http_in.stow import read_file_meta
from segnode.node.ingest.store import StoreHandler, StoreRequest
from segnode.node.remote.jobs import RemoteJobs
from segnode.node.remote.worker import WorkerSettings, fetch_priors, with_priors
from segnode.node.status import Status
from segnode.storage.index import Index, Job, JobState
from segnode.storage.spool import Spool

from tests.node.remote.test_worker_retries import part10
from tests.node.sources.helpers import Study, write_study
from tests.peers import free_port

WADO = {"Accept": 'multipart/related; type="application/dicom"'}


@dataclass
class NodeWithJob:
    url: str
    index: Index
    remote: RemoteJobs
    job: Job
    token: str
    current: Study
    prior: Study
    other: Study
    seg: bytes
    summary: bytes
    state_dir: Path

    def get(self, path: str, token: str | None = None, **headers: str) -> requests.Response:
        auth = {"Authorization": f"Bearer {token or self.token}"}
        return requests.get(f"{self.url}{path}", headers={**auth, **headers}, timeout=30)

    def series(self, study: Study, token: str | None = None) -> requests.Response:
        return self.get(f"/dicomweb/studies/{study.study_uid}/series/{study.series_uid}", token, **WADO)


def store_folder(handler: StoreHandler, folder: Path) -> None:
    """Every Part 10 file of ``folder`` through the node's store path, as STOW-RS stores a part."""
    for path in sorted(folder.glob("*.dcm")):
        data = path.read_bytes()
        meta = read_file_meta(data)
        assert meta is not None
        request = StoreRequest(meta.sop_class_uid, meta.sop_instance_uid, meta.transfer_syntax, "MODALITY",
                               "SEGNODE", "127.0.0.1", meta.sop_class_uid)
        assert handler.store(request, memoryview(data)[meta.dataset_offset:]).status is Status.SUCCESS


def earlier_result(results_dir: Path) -> tuple[Path, Path]:
    """A result of the node's on an earlier study: a SEG file and its summary, in its results folder."""
    folder = results_dir / "job-99" / "attempt-1"
    folder.mkdir(parents=True)
    seg, summary = folder / "seg-1.dcm", folder / "summary_lungs_1.json"
    seg.write_bytes(part10(pydicom.uid.generate_uid()))
    summary.write_text(json.dumps({"segments": [{"tissue": "lung_left", "segment_number": 1, "volume_ml": 1.5,
                                                 "voxels": 3}]}))
    return seg, summary


@pytest.fixture
def node_with_job(tmp_path: Path) -> Iterator[NodeWithJob]:
    config = NodeConfig(state_dir=tmp_path / "state", broker={"url": "amqp://guest:guest@127.0.0.1:1//"},
                        dicomweb={"enabled": True, "port": free_port()})
    index, spool = Index(config.index_path), Spool(config.spool_dir)
    handler = StoreHandler(config, spool, index)
    current, prior, other, gone = (write_study(tmp_path / name, name.upper(), slices=3, seed=n)
                                   for n, name in enumerate(("current", "prior", "other", "gone")))
    for study in (current, prior, other):
        store_folder(handler, study.folder)
    seg, summary = earlier_result(config.results_dir)
    found = [{"study_uid": prior.study_uid, "series_uid": prior.series_uid, "study_date": "2023-01-01",
              "input_dir": str(spool.series_dir(prior.study_uid, prior.series_uid))},
             {"study_uid": "1.2.826.0.1.3680043.10.1", "series_uid": "1.2.826.0.1.3680043.10.2",
              "study_date": "2022-01-01", "seg_path": str(seg), "summary_path": str(summary), "model_version": "v1",
              "job_id": 99},
             {"study_uid": "1.2.826.0.1.3680043.10.3", "series_uid": "1.2.826.0.1.3680043.10.4",
              "study_date": "2021-01-01", "seg_path": "/etc/hostname", "summary_path": "/etc/hostname"},
             {"study_uid": gone.study_uid, "series_uid": gone.series_uid, "study_date": "2020-01-01",
              "input_dir": str(spool.series_dir(gone.study_uid, gone.series_uid))}]
    waiting = index.received_job(current.series_uid)
    assert waiting is not None
    index.mark_complete(waiting.job_id, rule="r", profile="lungs", backend="hu_based", destinations=(),
                        options={"priors": {"source": "pacs"}, "priors_found": found})
    job = index.claim_next()
    assert job is not None and job.job_id == waiting.job_id
    remote = RemoteJobs(SimpleNamespace(config=config, index=index, dicomweb=None))  # type: ignore[arg-type]
    app = DicomWebApp(config.dicomweb, ae_title=config.ae_title, handler=handler, index=index, spool=spool,
                      max_instance_bytes=config.limits.max_instance_bytes, remote=remote)
    running: RunningDicomWeb = start_dicomweb(app)
    try:
        yield NodeWithJob(running.url, index, remote, job, remote.token(job.job_id, job.segment_attempts), current,
                          prior, other, seg.read_bytes(), summary.read_bytes(), config.state_dir)
    finally:
        running.stop()
        remote.close()
        index.close()


def sop_uids(folder: Path) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in folder.glob("*.dcm")}


def test_the_job_token_grants_its_series_and_its_priors_series_and_nothing_else(node_with_job: NodeWithJob) -> None:
    node = node_with_job
    assert node.series(node.current).status_code == 200
    assert node.series(node.prior).status_code == 200  # a prior's series: granted by the same token
    refused = node.series(node.other)  # on the node, but neither the job's nor one of its priors'
    assert refused.status_code == 403 and "another series" in refused.json()["error"]
    other_job = node.remote.token(node.job.job_id + 100, 1)  # a valid MAC for a job that does not exist
    assert node.series(node.prior, token=other_job).status_code == 401


def test_the_job_token_fetches_its_earlier_result_and_only_from_the_results_folder(node_with_job: NodeWithJob) -> None:
    node = node_with_job
    base = f"/remote/v1/jobs/{node.job.job_id}/priors"
    seg, summary = node.get(f"{base}/2/seg"), node.get(f"{base}/2/summary")
    assert (seg.status_code, seg.content, seg.headers["Content-Type"]) == (200, node.seg, "application/dicom")
    assert (summary.status_code, summary.content) == (200, node.summary)
    assert node.get(f"{base}/1/seg").status_code == 404  # a retrieved series, not a result: WADO-RS for it
    assert node.get(f"{base}/3/seg").status_code == 404  # a path outside the results folder is never served
    assert node.get(f"{base}/5/seg").status_code == 404
    assert node.get(f"/remote/v1/jobs/{node.job.job_id + 1}/priors/2/seg").status_code == 401  # another job's
    assert node.get(f"{base}/2/seg", token="job.1.1.forged").status_code == 401


def test_a_token_of_an_attempt_no_longer_waited_for_gets_410(node_with_job: NodeWithJob) -> None:
    node = node_with_job
    assert node.index.transition(node.job.job_id, JobState.COMPLETE, "result overdue; enqueued again")
    assert node.get(f"/remote/v1/jobs/{node.job.job_id}/priors/2/seg").status_code == 410
    assert node.series(node.prior).status_code == 410


def test_the_worker_fetches_the_priors_it_can_into_its_job_folder_and_leaves_out_the_others(
        node_with_job: NodeWithJob, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="segnode.node.remote.worker")
    node = node_with_job
    work = tmp_path / "worker" / "jobs" / "1-job-1-attempt-1"
    work.mkdir(parents=True)
    settings = WorkerSettings(state_dir=tmp_path / "worker", name="w", retry_s=5, http_timeout_s=10)
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {node.token}"
    spec = {"job_id": node.job.job_id, "options": {"priors_found": node.job.options["priors_found"], "x": 1}}
    priors = fetch_priors(session, node.url, node.job.job_id, spec, work, settings)

    retrieved, result = priors  # the node's third (a path outside its results) and fourth (gone) are left out
    assert retrieved == {"study_uid": node.prior.study_uid, "series_uid": node.prior.series_uid,
                         "study_date": "2023-01-01", "input_dir": str(work / "priors" / "1" / "input")}
    assert sop_uids(Path(retrieved["input_dir"])) == sop_uids(node.prior.folder)
    assert result == {"study_uid": "1.2.826.0.1.3680043.10.1", "series_uid": "1.2.826.0.1.3680043.10.2",
                      "study_date": "2022-01-01", "model_version": "v1", "job_id": 99,
                      "seg_path": str(work / "priors" / "2" / "seg.dcm"),
                      "summary_path": str(work / "priors" / "2" / "summary.json")}
    assert Path(result["seg_path"]).read_bytes() == node.seg
    assert Path(result["summary_path"]).read_bytes() == node.summary
    assert all(work in p.parents for p in work.rglob("*"))  # everything it wrote stays in its job folder
    assert str(node.state_dir) not in json.dumps(priors)  # the node's paths are never the worker's
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    gone = node.job.options["priors_found"][3]["series_uid"]
    assert warnings == [f"job {node.job.job_id}: prior 3 (series 1.2.826.0.1.3680043.10.4) left out of the report: "
                        "the node refused its seg",
                        f"job {node.job.job_id}: prior 4 (series {gone}) left out of the report: "
                        "the node refused its series"]
    ran = with_priors(spec, priors)
    assert ran["options"] == {"priors_found": priors, "x": 1} and with_priors({"options": {}}, []) == {"options": {}}
