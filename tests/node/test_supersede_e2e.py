"""A late instance supersedes a result the PACS holds: versioned series, and an IOCM Rejection Note in Orthanc.

``segnode serve`` as its own process, DCMTK ``storescu`` as the modality,
Orthanc as the PACS (a destination with ``rejection_notes: true``), ``dciodvfy``
on the note Orthanc stored.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from pydicom import dcmread
from segnode.storage.index import DeliveryState, Index, Job, JobState

from tests.paths import DATA
from tests.peers import (
    node,
    orthanc,
    store_statuses,
    storescu,
    wait_until,
    write_node_config,
)

THORAX = DATA / "thorax_cta"
FINAL = {JobState.DONE, JobState.FAILED, JobState.DEAD_LETTER}
pytestmark = [pytest.mark.peer, pytest.mark.slow]


def _config(tmp_path: Path, port: int, ae: str) -> Path:
    routes = tmp_path / "routes.yaml"
    routes.write_text(yaml.safe_dump({"rules": [{"name": "everything", "fallback": True, "action": {
        "profile": "lungs", "destinations": ["pacs"], "outputs": ["seg", "rtstruct", "sr"]}}]}))
    pacs = {"name": "pacs", "ae_title": ae, "host": "127.0.0.1", "port": port, "rejection_notes": True}
    return write_node_config(tmp_path / "node.yaml", destinations=[pacs], routes=str(routes))


def _final_job(index: Index, *, not_id: int | None = None) -> Job:
    def check() -> Job | None:
        return next((j for j in index.jobs() if j.job_id != not_id and j.state in FINAL), None)

    return wait_until(check, 300, "a job to finish", interval=0.2)


def _instances(pacs, modality: str) -> list[tuple[dict, bytes]]:  # type: ignore[no-untyped-def]
    out = []
    for series in pacs.series_by_modality(modality):
        out += [(series, pacs.get(f"/instances/{i}/file")) for i in series["Instances"]]
    return out


def test_a_late_instance_supersedes_and_the_rejection_note_reaches_orthanc(tmp_path: Path) -> None:
    files = sorted(THORAX.glob("*.dcm"))
    early = tmp_path / "early"
    early.mkdir()
    for f in files[:-1]:
        shutil.copy(f, early / f.name)
    with orthanc(tmp_path / "orthanc") as pacs:
        with node(_config(tmp_path, pacs.dicom_port, pacs.ae_title)) as n:
            index = Index(n.state_dir / "index.sqlite")
            assert store_statuses(storescu(n.port, [early]).stderr) == ["Success"] * 163
            old = _final_job(index)
            assert old.state is JobState.DONE, old.reason
            assert store_statuses(storescu(n.port, [files[-1]]).stderr) == ["Success"]  # the late instance
            new = _final_job(index, not_id=old.job_id)
            assert new.state is JobState.DONE, new.reason
            assert new.options["supersedes"] == [old.job_id]
            assert index.job(old.job_id).state is JobState.SUPERSEDED  # type: ignore[union-attr]
            objects = index.delivery_objects(new.job_id, "pacs")
            assert [o.kind for o in objects if o.state is DeliveryState.DONE].count("rejection") == 1
        old_uids = {o["sop_instance_uid"] for o in old.outputs}
        assert {o["kind"] for o in old.outputs} == {"seg", "rtstruct", "sr"}
        segs = sorted((int(s["MainDicomTags"]["SeriesNumber"]), s["MainDicomTags"]["SeriesDescription"])
                      for s in pacs.series_by_modality("SEG"))
        assert segs == [(9001, "SEG lungs (hu_based)"), (9011, "SEG lungs (hu_based) v2")]
        [(ko_series, ko_bytes)] = _instances(pacs, "KO")
    note = tmp_path / "note.dcm"
    note.write_bytes(ko_bytes)
    kos = dcmread(note)
    assert kos.ConceptNameCodeSequence[0].CodeValue == "113001"  # Rejected for Quality Reasons
    assert kos.StudyInstanceUID == dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    assert int(kos.SeriesNumber) == 9015 and kos.SeriesDescription.endswith(" v2")
    rejected = {i.ReferencedSOPInstanceUID for study in kos.CurrentRequestedProcedureEvidenceSequence
                for s in study.ReferencedSeriesSequence for i in s.ReferencedSOPSequence}
    assert rejected == old_uids  # every superseded object (SEG, RTSTRUCT, SR), none of the new ones
    check = subprocess.run(["dciodvfy", str(note)], capture_output=True, text=True, timeout=120)
    errors = [line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")]
    assert errors == [], errors
