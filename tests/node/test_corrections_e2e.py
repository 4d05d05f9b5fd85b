"""A corrected SEG stored back to the node becomes the sent result and a training label (docs/review.md).

``segnode serve`` as its own process with a route that holds every lungs result
for review and harvests it; DCMTK ``storescu`` sends the real thorax CTA;
Orthanc is the PACS (``rejection_notes: true``).  The test edits the model's
SEG as a viewer's export would (a slab of the left lung erased, voxels added to
the right lung, a new series and instance) and stores it by STOW-RS:

* refused first, nothing changed: off the source grid, a segment the profile
  does not know, a series no job has (0x0110, the file kept);
* the held job: Orthanc receives the corrected SEG and RTSTRUCT, never the
  model's, and no rejection note (nothing was sent); the correction is the
  review's approval, audited with who and the Dice and volume change;
* the dataset store holds the case with the corrected label, status ``corrected``, and a
  frozen version of it trains the committed tiny nnU-Net (transfer learning, CPU);
* already sent: ``segnode jobs correct`` on the correction job (as a 3D Slicer
  user would) supersedes it: Orthanc gets a rejection note naming exactly the
  sent SEG and RTSTRUCT, and the newer SEG.

Every object Orthanc holds at the end passes ``dciodvfy``.
"""

from __future__ import annotations

import http.client
import json
import secrets
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import yaml
from pydicom import Dataset, dcmread
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from segnode.models.series import load_series
from segnode.models.volume import Volume
from segnode.node.correction_seg import labels_on_grid
from segnode.node.http_in.multipart import encode_parts
from segnode.profiles import load_profile
from segnode.storage import nifti
from segnode.storage.dataset import DatasetStore
from segnode.storage.index import Index, Job, JobState
from segnode.storage.manifest import LabelStatus

from tests.dicomtools import dciodvfy
from tests.paths import DATA
from tests.peers import free_port, node, orthanc, store_statuses, storescu, wait_until, write_node_config

THORAX = DATA / "thorax_cta"
LUNGS = load_profile("lungs")
FINAL = {JobState.DONE, JobState.FAILED, JobState.DEAD_LETTER}
pytestmark = [pytest.mark.peer, pytest.mark.slow]


def _config(tmp_path: Path, pacs_port: int, pacs_ae: str) -> tuple[Path, str, int]:
    token = secrets.token_urlsafe(24)
    (tmp_path / "ohif.token").write_text(token + "\n")
    (tmp_path / "ohif.token").chmod(0o600)
    secret = tmp_path / "secret.key"
    secret.write_bytes(bytes(range(32)))
    routes = tmp_path / "routes.yaml"
    routes.write_text(yaml.safe_dump({"rules": [{"name": "review-lungs", "fallback": True, "action": {
        "profile": "lungs", "backend": "hu_based", "destinations": ["pacs"], "review": "always",
        "outputs": ["seg", "rtstruct"], "harvest": "corrected_lungs"}}]}))
    port = free_port()
    config = write_node_config(
        tmp_path / "node.yaml", routes=str(routes), storage_classes=["SegmentationStorage"],
        dataset_store=str(tmp_path / "store"), deid_secret_file=str(secret),
        destinations=[{"name": "pacs", "ae_title": pacs_ae, "host": "127.0.0.1", "port": pacs_port,
                       "rejection_notes": True}],
        dicomweb={"enabled": True, "port": port,
                  "clients": [{"name": "ohif", "token_file": str(tmp_path / "ohif.token"), "ae_title": "OHIF"}]})
    return config, token, port


def _stow(port: int, token: str, seg: Dataset) -> tuple[int, dict]:
    out = BytesIO()
    seg.save_as(out, enforce_file_format=True)
    boundary = "b-" + secrets.token_hex(8)
    body = b"".join(encode_parts([({"Content-Type": "application/dicom"}, out.getvalue())], boundary))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", "/dicomweb/studies", body=body, headers={
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Authorization": f"Bearer {token}"})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, json.loads(data) if data else {}


def _failure(answer: dict) -> int:
    return int(answer["00081198"]["Value"][0]["00081197"]["Value"][0])


def _edited(job: Job, erase: slice, add: bool) -> Dataset:
    """The job's SEG as a viewer would store it back: frames edited, a new series and instance."""
    seg = dcmread(job.file(job.seg_path or ""))
    frames = seg.pixel_array.copy()
    numbers = [int(f.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
               for f in seg.PerFrameFunctionalGroupsSequence]
    left = [i for i, n in enumerate(numbers) if n == 1]
    right = [i for i, n in enumerate(numbers) if n == 2]
    for i in left[erase]:  # a slab of the left lung erased
        frames[i] = 0
    if add:
        frames[right[len(right) // 2], 10:30, 10:50] = 1  # voxels added to the right lung (outside it)
    seg.PixelData = np.packbits(frames.astype(np.uint8).ravel(), bitorder="little").tobytes()
    if len(seg.PixelData) % 2:
        seg.PixelData += b"\0"
    seg.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    seg.SeriesInstanceUID, seg.SOPInstanceUID = generate_uid(), generate_uid()
    seg.file_meta.MediaStorageSOPInstanceUID = seg.SOPInstanceUID
    seg.SeriesDescription = "OHIF segmentation"
    return seg


def _job(index: Index, check: object, what: str) -> Job:
    return wait_until(check, 300, what, interval=0.2)


def _correction_of(index: Index, job_id: int) -> Job | None:
    return next((j for j in index.jobs() if j.options.get("correction", {}).get("of_job") == job_id
                 and j.state in FINAL), None)


def _orthanc_files(pacs, modality: str, tmp: Path) -> list[Path]:  # type: ignore[no-untyped-def]
    out = []
    for series in pacs.series_by_modality(modality):
        for i in series["Instances"]:
            path = tmp / f"{modality}-{i}.dcm"
            path.write_bytes(pacs.get(f"/instances/{i}/file"))
            out.append(path)
    return out


def _refusals(port: int, token: str, held: Job, tmp_path: Path) -> None:
    """Off the grid, an unknown segment, no job: each 0x0110, the file kept, nothing else changes."""
    shifted = _edited(held, slice(0, 5), add=False)
    for frame in shifted.PerFrameFunctionalGroupsSequence:
        x, y, z = frame.PlanePositionSequence[0].ImagePositionPatient
        frame.PlanePositionSequence[0].ImagePositionPatient = [float(x) + 5.0, y, z]
    unknown = _edited(held, slice(0, 5), add=False)
    unknown.SegmentSequence[1].SegmentLabel = "spleen"
    unknown.SegmentSequence[1].SegmentedPropertyTypeCodeSequence[0].CodeValue = "78961009"
    unknown.SegmentSequence[1].SegmentedPropertyTypeCodeSequence[0].CodeMeaning = "Spleen"
    del unknown.SegmentSequence[1].SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence
    nojob = _edited(held, slice(0, 5), add=False)
    nojob.ReferencedSeriesSequence[0].SeriesInstanceUID = generate_uid()
    for seg in (shifted, unknown, nojob):
        status, answer = _stow(port, token, seg)
        assert status == 409 and _failure(answer) == 0x0110, answer
        assert (tmp_path / "state" / "results" / "corrections" / "refused" / f"{seg.SOPInstanceUID}.dcm").is_file()


def test_a_stored_correction_is_sent_audited_and_harvested(tmp_path: Path) -> None:
    cta_uid = dcmread(THORAX / "CT0001.dcm", stop_before_pixels=True).SeriesInstanceUID
    volume = load_series(THORAX)
    with orthanc(tmp_path / "orthanc") as pacs:
        config, token, port = _config(tmp_path, pacs.dicom_port, pacs.ae_title)
        with node(config) as n:
            index = Index(n.state_dir / "index.sqlite")
            assert store_statuses(storescu(n.port, [THORAX]).stderr) == ["Success"] * 164
            held = _job(index, lambda: next((j for j in index.jobs() if j.series_uid == cta_uid
                                             and j.state in FINAL | {JobState.HELD}), None), "the held job")
            assert held.state is JobState.HELD, held.reason

            jobs_before = len(index.jobs())
            _refusals(port, token, held, tmp_path)
            assert len(index.jobs()) == jobs_before and index.job(held.job_id).state is JobState.HELD  # type: ignore[union-attr]

            edited = _edited(held, slice(10, 30), add=True)
            corrected = labels_on_grid(edited, volume, LUNGS)
            status, answer = _stow(port, token, edited)
            assert status == 200, answer
            fixed = _job(index, lambda: _correction_of(index, held.job_id), "the correction job")
            assert fixed.state is JobState.DONE, fixed.reason
            original = index.job(held.job_id)
            assert original is not None and original.state is JobState.SUPERSEDED
            assert original.reason.startswith(f"corrected by ohif: job {fixed.job_id} sends the correction")
            _check_sent_correction(pacs, tmp_path / "first", held, corrected, volume)
            _check_audit(n.state_dir, fixed, held)

            # already sent: corrected again, from a file, as a 3D Slicer user would
            again = _edited(fixed, slice(40, 50), add=False)
            again_path = tmp_path / "slicer.dcm"
            again.save_as(again_path, enforce_file_format=True)
            done = n.cli("jobs", "correct", str(fixed.job_id), str(again_path), "--user", "Dr. Slicer")
            assert done.returncode == 0, done.stderr
            assert "by Dr. Slicer: lung_left Dice" in done.stdout
            last = _job(index, lambda: _correction_of(index, fixed.job_id), "the second correction")
            assert last.state is JobState.DONE, last.reason
            assert index.job(fixed.job_id).state is JobState.SUPERSEDED  # type: ignore[union-attr]
        _check_rejection_note(pacs, tmp_path / "second", fixed)
    _check_dataset(tmp_path / "store", labels_on_grid(again, volume, LUNGS), volume)
    _trains(tmp_path)


def _check_sent_correction(pacs, tmp: Path, held: Job, corrected: np.ndarray,  # type: ignore[no-untyped-def]
                           volume: Volume) -> None:
    tmp.mkdir()
    [seg_path] = _orthanc_files(pacs, "SEG", tmp)
    assert len(_orthanc_files(pacs, "RTSTRUCT", tmp)) == 1 and _orthanc_files(pacs, "KO", tmp) == []
    seg = dcmread(seg_path)
    model_uids = {o["sop_instance_uid"] for o in held.outputs}
    assert seg.SOPInstanceUID not in model_uids and seg.SeriesDescription == "SEG lungs (correction) v2"
    assert np.array_equal(labels_on_grid(seg, volume, LUNGS), corrected)  # Orthanc holds the correction
    assert dciodvfy(seg_path) == []


def _check_audit(state_dir: Path, fixed: Job, held: Job) -> None:
    records = [json.loads(line) for line in (state_dir / "audit" / "audit.jsonl").read_text().splitlines()]
    refused = [r for r in records if r["event"] == "instance.refused"]
    assert [r["status"] for r in refused] == ["0x0110"] * 3
    assert "off the source grid" in refused[0]["reason"] and "unknown to profile lungs" in refused[1]["reason"]
    assert "references no job" in refused[2]["reason"]
    [opened] = [r for r in records if r.get("job_id") == fixed.job_id and r.get("state") == "complete"]
    reason = opened["reason"]
    assert reason.startswith(f"correction of job {held.job_id} by ohif (counts as the review's approval): ")
    figures = {c["tissue"]: c for c in fixed.options["correction"]["changes"]}
    assert 0.5 < figures["lung_left"]["dice"] < 1.0 and figures["lung_left"]["corrected_ml"] < \
        figures["lung_left"]["model_ml"]
    assert figures["lung_right"]["corrected_ml"] > figures["lung_right"]["model_ml"]
    assert "lung_left Dice" in reason and " mL (-" in reason


def _check_rejection_note(pacs, tmp: Path, fixed: Job) -> None:  # type: ignore[no-untyped-def]
    tmp.mkdir()
    [note] = _orthanc_files(pacs, "KO", tmp)
    kos = dcmread(note)
    rejected = {i.ReferencedSOPInstanceUID for study in kos.CurrentRequestedProcedureEvidenceSequence
                for s in study.ReferencedSeriesSequence for i in s.ReferencedSOPSequence}
    assert rejected == {o["sop_instance_uid"] for o in fixed.outputs}  # the sent SEG and RTSTRUCT, no more
    segs = _orthanc_files(pacs, "SEG", tmp)
    assert sorted(dcmread(p).SeriesDescription for p in segs) == ["SEG lungs (correction) v2",
                                                                 "SEG lungs (correction) v3"]
    for path in (note, *segs, *_orthanc_files(pacs, "RTSTRUCT", tmp)):
        assert dciodvfy(path) == [], path


def _check_dataset(store_root: Path, corrected: np.ndarray, volume: Volume) -> None:
    store = DatasetStore.open_read_only(store_root)
    [case] = store.cases("corrected_lungs").values()
    assert case.label_status is LabelStatus.CORRECTED and len(case.previous_labels) == 2  # model, first correction
    label = nifti.read_nifti(store.read_object(case.label), "label").array
    names = {name: value for value, name in case.labels.items()}
    for value, name in LUNGS.label_values().items():
        assert int((label == names[name]).sum()) == int((corrected == value).sum()), name


def _trains(tmp: Path) -> None:
    """A frozen version with the corrected case trains the committed tiny nnU-Net (as tests/models do)."""
    import tests.dl_fixtures as fixtures
    from segnode.models.weights import find_model, import_weights
    from segnode.node.cli.main import main
    from segnode.profiles.schema import Backend

    store = ["dataset", "--store", str(tmp / "store"), "--secret-file", str(tmp / "secret.key")]
    assert main([*store, "freeze", "corrected_lungs"]) == 0
    base = fixtures.place_in_totalsegmentator_layout(fixtures.committed_models()["nnunet"], tmp / "ts")
    weights = tmp / "weights"
    import_weights(base / fixtures.TS_FOLDERS["fast"], weights, backend=Backend.TOTALSEGMENTATOR)
    assert main(["train", "--dataset", "corrected_lungs@1", "--store", str(tmp / "store"), "--base",
                 "totalsegmentator", "--epochs", "1", "--iterations", "2", "--val-iterations", "1", "--device", "cpu",
                 "--weights-dir", str(weights), "--augmentation-workers", "0", "--processes", "1", "--threads", "2",
                 "--fold", "all", "--test-fraction", "0", "--no-eval"]) == 0
    card = json.loads((find_model(weights, Backend.NNUNET, "corrected_lungs/1").path / "model_card.json").read_text())
    assert card["dataset"]["ref"] == "corrected_lungs@1" and len(card["dataset"]["train_cases"]) == 1
    assert {"lung_left", "lung_right"} <= set(card["labels"].values())
