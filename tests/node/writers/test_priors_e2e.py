"""Priors through a real ``segnode serve``: a patient with a prior study in Orthanc → an SR with the change.

Orthanc holds the patient's earlier CT (400 days before, with part of the
lungs filled with soft tissue, so their volume differs); the current CT is
sent to the node, whose route has ``priors: {source: pacs}``.  The node finds
the prior by C-FIND, picks its series, has no result of its own for it, so
retrieves it (C-MOVE to itself) and segments it in the job, and sends Orthanc
an SR whose groups give each segment's prior volume, the interval and the
change — read back by dcmqi's tid1500reader, dciodvfy clean.
"""

from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from pydicom import dcmread
from segnode.node.writers.common import deterministic_uid
from segnode.storage.index import Index, JobState

from tests.dicomtools import dciodvfy
from tests.output_fixtures import dcmqi_tool
from tests.paths import DATA
from tests.peers import OrthancPeer, node, orthanc, store_statuses, storescu, wait_until, write_node_config

pytestmark = [pytest.mark.peer, pytest.mark.slow]
THORAX = sorted((DATA / "thorax_cta").glob("*.dcm"))
SR3D = "1.2.840.10008.5.1.4.1.1.88.34"


def write_studies(tmp: Path) -> tuple[Path, Path, str]:
    """The current study (StudyDate 2024-02-05) and the prior (2023-01-01, new UIDs, a lung block filled)."""
    current, prior = tmp / "current", tmp / "prior"
    current.mkdir()
    prior.mkdir()
    study, series = deterministic_uid("prior-study"), deterministic_uid("prior-series")
    for path in THORAX:
        ds = dcmread(path)
        ds.StudyDate = "20240205"
        ds.save_as(current / path.name)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = deterministic_uid("prior", path.name)
        ds.StudyDate = "20230101"
        pixels = ds.pixel_array.copy()
        pixels[30:70, 15:55] = np.maximum(pixels[30:70, 15:55], 40)  # soft tissue where there was air
        ds.PixelData = pixels.astype(pixels.dtype).tobytes()
        ds.save_as(prior / path.name)
    return current, prior, str(study)


def upload(pacs: OrthancPeer, folder: Path) -> None:
    for path in sorted(folder.glob("*.dcm")):
        request = urllib.request.Request(f"http://127.0.0.1:{pacs.http_port}/instances", data=path.read_bytes(),
                                         method="POST")
        with urllib.request.urlopen(request, timeout=30):
            pass


def study_srs(pacs: OrthancPeer, study_uid: str) -> list[str]:
    """Orthanc IDs of the SR instances in ``study_uid``."""
    out = []
    for series in pacs.get("/series?expand"):
        if series["MainDicomTags"].get("Modality") == "SR" and pacs.get(
                f"/studies/{series['ParentStudy']}")["MainDicomTags"]["StudyInstanceUID"] == study_uid:
            out += series["Instances"]
    return out


def test_a_prior_study_in_orthanc_gives_an_sr_with_the_prior_volume_and_the_change(tmp_path: Path) -> None:
    current, prior, prior_study = write_studies(tmp_path)
    current_study = str(dcmread(current / THORAX[0].name, stop_before_pixels=True).StudyInstanceUID)
    routes = tmp_path / "routes.yaml"
    rule = {"profile": "lungs", "backend": "hu_based", "destinations": ["pacs"], "outputs": ["seg", "sr"],
            "priors": {"source": "pacs", "count": 1, "max_age_days": 1095}}
    routes.write_text(yaml.safe_dump({"rules": [{"name": "lungs-priors", "fallback": True, "action": rule}]}))
    config = write_node_config(tmp_path / "node.yaml", routes=str(routes))
    node_port = yaml.safe_load(config.read_text())["port"]
    with orthanc(tmp_path / "orthanc", node_port=node_port) as pacs:
        upload(pacs, prior)
        settings = yaml.safe_load(config.read_text())
        settings["destinations"] = [{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1",
                                     "port": pacs.dicom_port}]
        settings["sources"] = [{"name": "pacs", "kind": "dimse", "ae_title": "ORTHANC", "host": "127.0.0.1",
                                "port": pacs.dicom_port, "retrieve": "move"}]
        config.write_text(yaml.safe_dump(settings))
        with node(config) as running:
            sent = storescu(running.port, [current])
            assert store_statuses(sent.stdout + sent.stderr) == ["Success"] * len(THORAX)
            index = Index(running.state_dir / "index.sqlite")
            srs = wait_until(lambda: study_srs(pacs, current_study), 300, "the current study's SR in Orthanc",
                             interval=0.5)
            [job] = [j for j in index.jobs() if j.study_uid == current_study]
            assert job.state is JobState.DONE, job.reason
            found = json.loads((Path(job.result_dir or "") / "job.json").read_text())["options"]["priors_found"]
            retrieved = [j for j in index.jobs() if j.study_uid == prior_study]  # the prior, stored by the C-MOVE
        sr_file = tmp_path / "sr.dcm"
        sr_file.write_bytes(pacs.get(f"/instances/{srs[0]}/file"))
    assert [f["study_uid"] for f in found] == [prior_study] and "input_dir" in found[0]  # retrieved, segmented
    assert retrieved and retrieved[0].series_uid == found[0]["series_uid"]
    # measured inside the current job only: the prior's own job is skipped, never routed nor sent on its own
    assert [(j.state, j.reason) for j in retrieved] == [(JobState.SKIPPED, f"retrieved as a prior of job {job.job_id}")]
    assert dciodvfy(sr_file) == []
    out = tmp_path / "sr.json"
    subprocess.run([dcmqi_tool("tid1500reader"), "--inputDICOM", str(sr_file), "--outputMetadata", str(out)],
                   check=True, capture_output=True, timeout=120)
    groups = {m["TrackingIdentifier"]: m for m in json.loads(out.read_text())["Measurements"]}
    priors = {name.split(" prior ")[0]: g for name, g in groups.items() if " prior 2023-01-01" in name}
    assert priors, sorted(groups)
    changed = 0
    for tissue, prior_group in priors.items():
        before = float(_items(prior_group)["118565006"]["value"])
        now = _items(groups[tissue])
        change = float(now["VOLCHG"]["value"])
        assert change == pytest.approx(float(now["118565006"]["value"]) - before, abs=0.002)
        assert float(now["VOLCHGPCT"]["value"]) == pytest.approx(100 * change / before, abs=0.06)
        assert float(now["PRIORINT"]["value"]) == 400
        changed += abs(change) > 1
    assert changed >= 1  # the filled block made a lung smaller on the prior
    ds = dcmread(sr_file)
    assert prior_study in {s.StudyInstanceUID for s in ds.PertinentOtherEvidenceSequence}


def _items(group: dict) -> dict[str, dict]:  # type: ignore[type-arg]
    return {i["quantity"]["CodeValue"]: i for i in group["measurementItems"]}
