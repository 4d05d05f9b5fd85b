"""Priors run by a remote worker: a real RabbitMQ, ``segnode serve``, one ``segnode worker``, Orthanc as the source.

Orthanc holds the patient's two earlier CTs: A (2023-01-01, part of the lungs
filled with soft tissue) and B (2022-06-01).  The node first gets A itself (a
route without priors) and a remote worker segments it: the node has its own
result on A.  Then the current CT (2024-02-05) arrives on a route with
``priors: {source: pacs, count: 2}``: the node reuses its result on A and
retrieves B.  The worker shares nothing with the node but HTTP and the broker:
it fetches A's SEG and summary through ``/remote/v1/jobs/{id}/priors/N/...`` and
B's series by WADO-RS with the job's token, segments B, and the SR that reaches
Orthanc has both priors and the change since each (dcmqi's tid1500reader,
dciodvfy clean).
"""

from __future__ import annotations

import json
import subprocess
import urllib.request
from datetime import date
from pathlib import Path

import numpy as np
import pytest
import yaml
from pydicom import dcmread
from segnode.node.writers.common import deterministic_uid
from segnode.storage.index import Index, JobState

from tests.dicomtools import dciodvfy
from tests.node.remote.test_remote_workers import accepted_results, ops_url, workers
from tests.node.writers.test_priors_e2e import THORAX, study_srs, upload
from tests.output_fixtures import dcmqi_tool
from tests.peers import free_port, node, orthanc, store_statuses, storescu, wait_until, write_node_config
from tests.rabbitmq_peer import rabbitmq, rabbitmq_available

pytestmark = [pytest.mark.peer, pytest.mark.slow,
              pytest.mark.skipif(not rabbitmq_available(), reason="Debian rabbitmq-server (make peers)")]


def write_study(folder: Path, name: str, study_date: str, *, filled: bool) -> tuple[str, str]:
    """The thorax CT as study ``name`` of ``study_date`` (new UIDs unless current); its study and series UIDs."""
    folder.mkdir()
    study, series = deterministic_uid(name, "study"), deterministic_uid(name, "series")
    for path in THORAX:
        ds = dcmread(path)
        if name != "current":
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = deterministic_uid(name, path.name)
        ds.StudyDate = study_date
        if filled:
            pixels = ds.pixel_array.copy()
            pixels[30:70, 15:55] = np.maximum(pixels[30:70, 15:55], 40)  # soft tissue where there was air
            ds.PixelData = pixels.astype(pixels.dtype).tobytes()
        ds.save_as(folder / path.name)
    first = dcmread(folder / THORAX[0].name, stop_before_pixels=True)
    return str(first.StudyInstanceUID), str(first.SeriesInstanceUID)


def routes(path: Path) -> Path:
    """A's own route (calling AE EARLIER*, no priors), and the current study's, with priors from Orthanc."""
    action = {"profile": "lungs", "backend": "hu_based", "destinations": ["pacs"], "queue": "cpu"}
    path.write_text(yaml.safe_dump({"rules": [
        {"name": "earlier", "match": {"calling_ae": {"glob": "EARLIER*"}}, "action": {**action, "outputs": ["seg"]}},
        {"name": "lungs-priors", "fallback": True, "action": {
            **action, "outputs": ["seg", "sr"], "priors": {"source": "pacs", "count": 2, "max_age_days": 1095}}}]}))
    return path


def test_a_remote_worker_reports_a_reused_and_a_retrieved_prior_with_the_change(tmp_path: Path) -> None:
    current, study_a, study_b = tmp_path / "current", tmp_path / "a", tmp_path / "b"
    current_study, _ = write_study(current, "current", "20240205", filled=False)
    a_study, a_series = write_study(study_a, "prior-a", "20230101", filled=True)
    b_study, b_series = write_study(study_b, "prior-b", "20220601", filled=False)
    with rabbitmq(tmp_path / "broker") as broker:
        config = write_node_config(
            tmp_path / "node.yaml", routes=str(routes(tmp_path / "routes.yaml")),
            broker={"url": broker.url, "queues": ["cpu"], "default_queue": "cpu", "result_timeout_s": 600},
            dicomweb={"enabled": True, "port": free_port()})
        settings = yaml.safe_load(config.read_text())
        with orthanc(tmp_path / "orthanc", node_port=settings["port"]) as pacs:
            upload(pacs, study_a)
            upload(pacs, study_b)
            pacs_node = {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs.dicom_port}
            settings["destinations"] = [{"name": "pacs", **pacs_node}]
            settings["sources"] = [{"name": "pacs", "kind": "dimse", **pacs_node, "retrieve": "move"}]
            config.write_text(yaml.safe_dump(settings))
            with node(config) as running, workers(tmp_path, broker, 1):
                index = Index(running.state_dir / "index.sqlite")
                send(running.port, study_a, calling="EARLIER")
                [earlier] = wait_until(lambda: [j for j in index.jobs() if j.series_uid == a_series
                                                and j.state is JobState.DONE], 180, "A segmented by the worker")
                send(running.port, current)
                srs = wait_until(lambda: study_srs(pacs, current_study), 300, "the current study's SR in Orthanc",
                                 interval=0.5)
                [job] = [j for j in index.jobs() if j.study_uid == current_study]
                results = accepted_results(running.state_dir)
                wado = wado_requests(ops_url(running))
            sr_file = tmp_path / "sr.dcm"
            sr_file.write_bytes(pacs.get(f"/instances/{srs[0]}/file"))
    assert job.state is JobState.DONE, job.reason
    assert results == {earlier.job_id: "w0", job.job_id: "w0"}  # both run by the remote worker
    found = job.options["priors_found"]
    assert [(f["study_uid"], f["series_uid"]) for f in found] == [(a_study, a_series), (b_study, b_series)]
    assert found[0]["job_id"] == earlier.job_id and "seg_path" in found[0]  # A: the node's own result, reused
    assert "input_dir" in found[1]  # B: retrieved by the node, segmented by the worker in the job
    log = (tmp_path / "workers" / "w0" / "worker.log").read_text()  # fetched over HTTP, not read at the node's paths
    assert f"job {job.job_id}: prior 1 fetched (the node's result)" in log
    assert f"job {job.job_id}: prior 2 fetched (its series)" in log
    assert wado >= 3  # the series of A's job, of the current job, and B's: each by WADO-RS (2 without B's)
    assert not any((tmp_path / "workers" / "w0" / "state" / "jobs").glob("*"))  # the worker kept nothing
    assert dciodvfy(sr_file) == []
    changes = sr_changes(sr_file, tmp_path / "sr.json")
    assert {day for day, _ in changes} == {"2023-01-01", "2022-06-01"}  # both priors in the report
    assert any(abs(change) > 1 for (day, _), change in changes.items() if day == "2023-01-01")  # A's filled block
    evidence = {s.StudyInstanceUID for s in dcmread(sr_file).PertinentOtherEvidenceSequence}
    assert {a_study, b_study} <= evidence


def wado_requests(ops: str) -> float:
    metrics = urllib.request.urlopen(f"{ops}/metrics", timeout=10).read().decode()
    [line] = [m for m in metrics.splitlines() if m.startswith('segnode_dicomweb_requests_total{kind="wado"}')]
    return float(line.rsplit(" ", 1)[1])


def send(port: int, folder: Path, calling: str = "SCANNER") -> None:
    sent = storescu(port, [folder], calling=calling)
    assert store_statuses(sent.stdout + sent.stderr) == ["Success"] * len(THORAX)


def sr_changes(sr_file: Path, out: Path) -> dict[tuple[str, str], float]:
    """(prior's date, tissue) → the change the SR gives, checked against the two volumes it gives."""
    subprocess.run([dcmqi_tool("tid1500reader"), "--inputDICOM", str(sr_file), "--outputMetadata", str(out)],
                   check=True, capture_output=True, timeout=120)
    groups = {m["TrackingIdentifier"]: m for m in json.loads(out.read_text())["Measurements"]}
    changes = {}
    for name, prior_group in groups.items():
        if " prior " not in name:
            continue
        tissue, day = name.split(" prior ")
        interval = (date(2024, 2, 5) - date.fromisoformat(day)).days
        before = float(_items(prior_group)["118565006"]["value"])
        change = _change(groups[tissue], interval)
        assert change == pytest.approx(float(_items(groups[tissue])["118565006"]["value"]) - before, abs=0.002)
        changes[(day, tissue)] = change
    return changes


def _items(group: dict) -> dict[str, dict]:  # type: ignore[type-arg]
    return {i["quantity"]["CodeValue"]: i for i in group["measurementItems"]}


def _change(group: dict, interval: int) -> float:  # type: ignore[type-arg]
    """The group's change since the prior ``interval`` days before (its VOLCHG next to that PRIORINT)."""
    items = group["measurementItems"]
    for n, item in enumerate(items):
        if item["quantity"]["CodeValue"] == "PRIORINT" and float(item["value"]) == interval:
            return float(next(i["value"] for i in reversed(items[:n]) if i["quantity"]["CodeValue"] == "VOLCHG"))
    raise AssertionError(f"no change since the prior {interval} days before")
