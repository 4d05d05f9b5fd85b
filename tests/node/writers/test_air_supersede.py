"""IHE AIR on every object, versioned results, the IOCM Rejection Note, and the pre-send check.

Writers run on a small synthetic chest series; every object is read back with
pydicom and validated with ``dciodvfy``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.sr.codedict import codes
import pytest
from segnode.errors import EncodeError
from segnode.models.series import load_series
from segnode.models.volume import LabelMap, Volume
from segnode.node.writers import seg as seg_writer
from segnode.node.writers.common import Algorithm, algorithm_item, versioned_series
from segnode.node.writers.kinds import encode_outputs
from segnode.node.writers.record import EncodedObject
from segnode.node.writers.rejection import RejectedObject
from segnode.profiles import load_profile

from tests.dicomtools import dciodvfy
from tests.phantoms import thorax_phantom, write_ct_series

pytestmark = pytest.mark.peer  # dciodvfy

ALL = ("seg", "rtstruct", "overlay", "sr")


@pytest.fixture(scope="module")
def chest(tmp_path_factory: pytest.TempPathFactory) -> Volume:
    folder = tmp_path_factory.mktemp("chest")
    phantom = thorax_phantom(shape=(8, 48, 48), spacing=(7.0, 7.0, 5.0))
    v = phantom.volume
    write_ct_series(v.hu, folder, v.spacing, v.origin, v.direction)
    return load_series(folder)


def lungs(volume: Volume, *, model_version: str = "m1", weights: str = "aaaa") -> LabelMap:
    values = load_profile("lungs").label_values()
    array = np.zeros(volume.shape, np.uint8)
    x = volume.world_x()
    array[(volume.hu < -400) & (x > x.mean())] = 1
    array[(volume.hu < -400) & (x <= x.mean())] = 2
    return LabelMap(array, values, backend="totalsegmentator", model_version=model_version, weights_hash=weights)


def encode(volume: Volume, out: Path, labels: LabelMap, **kw: object) -> list[pydicom.Dataset]:
    objects = encode_outputs(volume, labels, load_profile("lungs"), out, ALL, **kw)  # type: ignore[arg-type]
    return [pydicom.dcmread(out / o.path) for o in objects]


def by_kind(objects: list[pydicom.Dataset]) -> dict[str, pydicom.Dataset]:
    kinds = {"SEG": "seg", "RTSTRUCT": "rtstruct", "OT": "overlay", "SR": "sr", "KO": "rejection"}
    return {kinds[str(ds.Modality)]: ds for ds in objects}


def test_every_kind_names_the_algorithm_with_a_device_uid_per_model(chest: Volume, tmp_path: Path) -> None:
    first = encode(chest, tmp_path / "a", lungs(chest))
    again = encode(chest, tmp_path / "b", lungs(chest))
    tuned = encode(chest, tmp_path / "c", lungs(chest, weights="bbbb"))  # same version, fine-tuned weights
    assert set(by_kind(first)) == set(ALL)
    device = {str(algorithm_item(ds).DeviceUID) for ds in first}  # type: ignore[union-attr]
    assert device == {str(Algorithm.of(lungs(chest)).device_uid)}  # one per model, on every kind and instance
    assert {str(algorithm_item(ds).DeviceUID) for ds in again} == device  # type: ignore[union-attr]
    assert {str(algorithm_item(ds).DeviceUID) for ds in tuned}.isdisjoint(device)  # type: ignore[union-attr]
    for ds in first:
        items = ds.ContributingEquipmentSequence
        assert not any("highdicom" in str(i.get(k, "")).lower() for i in items
                       for k in ("Manufacturer", "ManufacturerModelName"))  # highdicom's own item is gone
        item = algorithm_item(ds)
        assert item is not None
        purpose = item.PurposeOfReferenceCodeSequence[0]
        assert (purpose.CodeValue, purpose.CodingSchemeDesignator) == ("109102", "DCM")
        in_cid = codes.CID7005.ProcessingEquipment  # the attribute's context group (PS3.3 C.12.1.1.5, PS3.16)
        assert (purpose.CodeValue, purpose.CodeMeaning) == (in_cid.value, in_cid.meaning)
        assert item.Manufacturer == "segnode" and item.ManufacturerModelName == "segnode totalsegmentator"
        assert list(item.SoftwareVersions)[0] == "m1"
        assert ds.StudyInstanceUID == chest.source.study_instance_uid  # type: ignore[union-attr]
        assert ds.file_meta.ImplementationClassUID == "2.25.81889068252909961747583286213210863358"


def test_sr_device_observer_and_tracking_per_segment(chest: Volume, tmp_path: Path) -> None:
    kinds = by_kind(encode(chest, tmp_path, lungs(chest)))
    seg, sr = kinds["seg"], kinds["sr"]
    for segment in seg.SegmentSequence:
        assert segment.SegmentAlgorithmName and segment.SegmentationAlgorithmIdentificationSequence
    items = list(_walk(sr.ContentSequence))
    observer = next(i for i in items if i.ConceptNameCodeSequence[0].CodeValue == "121012")  # Device Observer UID
    assert observer.UID == algorithm_item(sr).DeviceUID  # type: ignore[union-attr]
    tracking = {i.UID for i in items if i.ConceptNameCodeSequence[0].CodeValue == "112040"}  # Tracking Unique Id
    assert tracking == {s.TrackingUID for s in seg.SegmentSequence}


def _walk(items):  # type: ignore[no-untyped-def]
    for item in items:
        yield item
        yield from _walk(item.get("ContentSequence") or [])


def test_a_newer_version_says_so_and_has_its_own_uids(chest: Volume, tmp_path: Path) -> None:
    v1 = by_kind(encode(chest, tmp_path / "v1", lungs(chest)))
    v2 = by_kind(encode(chest, tmp_path / "v2", lungs(chest), version=2))
    assert [int(v1[k].SeriesNumber) for k in ALL] == [9001, 9002, 9003, 9004]  # what segnode always wrote
    assert [int(v2[k].SeriesNumber) for k in ALL] == [9011, 9012, 9013, 9014]
    for kind in ALL:
        assert v2[kind].SeriesDescription == f"{v1[kind].SeriesDescription[:61]} v2"
        assert v2[kind].SeriesInstanceUID != v1[kind].SeriesInstanceUID
        assert v2[kind].SOPInstanceUID != v1[kind].SOPInstanceUID
    assert versioned_series("seg", "SEG lungs (x)", 2) == versioned_series("seg", "SEG lungs (x)", 2)
    with pytest.raises(EncodeError):
        versioned_series("seg", "SEG", 0)


def test_rejection_note_references_every_superseded_object_and_passes_dciodvfy(chest: Volume, tmp_path: Path) -> None:
    profile = load_profile("lungs")
    old = encode_outputs(chest, lungs(chest), profile, tmp_path / "v1", ALL)
    rejects = tuple(RejectedObject(o.sop_class_uid, o.sop_instance_uid, o.series_instance_uid) for o in old)
    new = encode_outputs(chest, lungs(chest), profile, tmp_path / "v2", ALL, version=2, rejects=rejects)
    [note] = [o for o in new if o.kind == "rejection"]
    assert new[-1] == note  # written last
    path = tmp_path / "v2" / note.path
    assert dciodvfy(path) == []
    kos = pydicom.dcmread(path)
    assert kos.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.59"
    title = kos.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning) == (
        "113001", "DCM", "Rejected for Quality Reasons")
    assert kos.StudyInstanceUID == chest.source.study_instance_uid  # type: ignore[union-attr]
    assert (int(kos.SeriesNumber), kos.SeriesDescription) == (9015, "REJECTED lungs superseded by v2")
    evidence = {(s.SeriesInstanceUID, i.ReferencedSOPInstanceUID)
                for study in kos.CurrentRequestedProcedureEvidenceSequence
                for s in study.ReferencedSeriesSequence for i in s.ReferencedSOPSequence}
    assert evidence == {(o.series_instance_uid, o.sop_instance_uid) for o in old}
    content = {i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in kos.ContentSequence
               if "ReferencedSOPSequence" in i}
    assert content == {o.sop_instance_uid for o in old}
    assert algorithm_item(kos) is not None
    assert RejectedObject.from_json(rejects[0].to_json()) == rejects[0]


def test_an_object_that_fails_the_check_fails_the_encoding_with_the_reason(
        chest: Volume, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = seg_writer.stamp_algorithm

    def broken(ds: pydicom.Dataset, algorithm: Algorithm) -> None:  # the writer "forgets" the study
        real(ds, algorithm)
        del ds.StudyInstanceUID

    monkeypatch.setattr(seg_writer, "stamp_algorithm", broken)
    with pytest.raises(EncodeError, match="StudyInstanceUID missing or empty.*not in the source's study"):
        encode_outputs(chest, lungs(chest), load_profile("lungs"), tmp_path, ("seg",))


def test_the_check_refuses_an_object_without_the_air_item(
        chest: Volume, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(seg_writer, "stamp_algorithm", lambda ds, algorithm: None)
    with pytest.raises(EncodeError, match="no IHE AIR contributing-equipment item"):
        encode_outputs(chest, lungs(chest), load_profile("lungs"), tmp_path, ("seg",))


def test_a_job_whose_object_fails_the_check_fails_with_the_reason(
        chest: Volume, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the worker's entry point: the job's outcome is the check's reason, nothing to send."""
    from segnode.node.jobs.worker import JobSpec, execute

    monkeypatch.setattr(seg_writer, "stamp_algorithm", lambda ds, algorithm: None)
    source = chest.source
    assert source is not None
    folder = Path(source.datasets[0].filename).parent
    spec = JobSpec(job_id=1, series_uid=source.series_instance_uid, input_dir=str(folder), profile="lungs",
                   out_dir=str(tmp_path / "out"), backend="hu_based", seg_type="binary", device="cpu", threads=1,
                   weights_dir=None, memory_budget_mb=None, harvest=None, rule="r", calling_ae="CT",
                   dataset_store=str(tmp_path / "store"), deid_secret_file=None, options={"outputs": ["seg"]})
    with pytest.raises(EncodeError, match="failed its pre-send check: no IHE AIR"):
        execute(spec)


def test_dciodvfy_runs_on_every_file_and_names_the_one_that_fails(chest: Volume, tmp_path: Path) -> None:
    """The dciodvfy pass runs its files side by side; an error in one overlay slice of many still fails with its name."""
    from segnode.node.writers.check import check_objects, dciodvfy_path

    if dciodvfy_path() is None:
        pytest.skip("dciodvfy is not installed")
    labels = lungs(chest)
    objects = encode_outputs(chest, labels, load_profile("lungs"), tmp_path, ("overlay",))
    paths = [tmp_path / o.path for o in objects]
    assert len(paths) == chest.shape[0] > 2
    check_objects(paths, chest.source, Algorithm.of(labels))  # type: ignore[arg-type]  # all pass as written
    broken = paths[len(paths) // 2]
    ds = pydicom.dcmread(broken)
    ds.PatientSex = "Q"  # not one of PS3.3's enumerated values M, F, O: dciodvfy's error, not our checklist's
    ds.save_as(broken, enforce_file_format=True)
    with pytest.raises(EncodeError, match=f"{broken.name} failed dciodvfy: .*Patient.?s Sex"):
        check_objects(paths, chest.source, Algorithm.of(labels))  # type: ignore[arg-type]


def test_encoded_object_record_carries_the_rejection_kind(chest: Volume, tmp_path: Path) -> None:
    obj = EncodedObject(kind="rejection", profile="lungs", path="KO.dcm", sop_class_uid="1.2",
                        sop_instance_uid="1.3", series_instance_uid="1.4")
    assert EncodedObject.from_json(obj.to_json()) == obj


# -- the node's side: versions along a chain of late instances, the rejection note sent last -----------------

def _job(job_id: int, profile: str = "lungs", supersedes: tuple[int, ...] = (), outputs: tuple[str, ...] = ()):  # type: ignore[no-untyped-def]
    from segnode.storage.index import Job, JobState

    return Job(job_id=job_id, series_uid="1.2", study_uid="1.1", state=JobState.DONE, reason=None, rule="r",
               profile=profile, backend=None, destinations=("pacs",), segment_attempts=1, seg_path=None,
               seg_series_uid=None, seg_sop_uid=None, backend_used=None, model_version=None, harvest=None,
               created_at=0.0, updated_at=0.0, options={"supersedes": list(supersedes)} if supersedes else {},
               outputs=[{"kind": k, "sop_class_uid": "1.2.3", "sop_instance_uid": f"9.{job_id}.{n}",
                         "series_instance_uid": f"8.{job_id}", "profile": profile, "path": f"{k}.dcm"}
                        for n, k in enumerate(outputs)])


class _Jobs:
    """What node/supersede.py reads of the index: jobs by ID."""

    def __init__(self, *jobs) -> None:  # type: ignore[no-untyped-def]
        self.by_id = {j.job_id: j for j in jobs}

    def job(self, job_id: int):  # type: ignore[no-untyped-def]
        return self.by_id.get(job_id)


def test_result_version_follows_the_chain_per_profile() -> None:
    from segnode.node.supersede import (
        rejected_objects,
        result_version,
        supersede_options,
    )

    v1 = _job(1, outputs=("seg", "sr"))
    bone = _job(2, profile="bone", outputs=("seg",))
    v2 = _job(3, supersedes=(1, 2), outputs=("seg", "sr", "rejection"))
    v3 = _job(4, supersedes=(3,), outputs=("seg",))
    jobs = _Jobs(v1, bone, v2, v3)
    assert [result_version(jobs, j) for j in (v1, bone, v2, v3)] == [1, 1, 2, 3]  # type: ignore[arg-type]
    assert supersede_options(jobs, v1) == {}  # type: ignore[arg-type]
    assert {o["sop_instance_uid"] for o in rejected_objects(jobs, v2)} == {"9.1.0", "9.1.1"}  # type: ignore[arg-type]
    assert {o["sop_instance_uid"] for o in rejected_objects(jobs, v3)} == {"9.3.0", "9.3.1"}  # not v2's own note

    never_ran = _job(5, supersedes=(4,))  # superseded before it ran: no result, no version
    v4 = _job(6, supersedes=(5,), outputs=("seg",))
    chain = _Jobs(v1, bone, v2, v3, never_ran, v4)
    assert result_version(chain, v4) == 4  # type: ignore[arg-type]


class _Sender:
    def __init__(self, refuse: set[str] = frozenset(), retry: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        self.refuse, self.retry, self.calls = refuse, retry, []  # type: ignore[var-annotated]

    def send(self, paths):  # type: ignore[no-untyped-def]
        from segnode.node.sending.sender import SendResult

        self.calls.append([p.name for p in paths])
        return [SendResult.refused("no") if p.name in self.refuse else SendResult.retry("busy") if p.name in self.retry
                else SendResult.stored("ok") for p in paths]

    def echo(self):  # type: ignore[no-untyped-def]
        raise NotImplementedError


def _pending(*kinds: str):  # type: ignore[no-untyped-def]
    from segnode.storage.index import DeliveryObject, DeliveryState

    return [DeliveryObject(1, "pacs", f"9.{n}", k, "1.2", f"{k}.dcm", DeliveryState.PENDING, None, None)
            for n, k in enumerate(kinds)]


@pytest.mark.parametrize(("refuse", "retry", "calls", "note"), [
    (set(), set(), [["seg.dcm", "sr.dcm"], ["rejection.dcm"]], "stored"),  # after the result, in its own send
    (set(), {"seg.dcm"}, [["seg.dcm", "sr.dcm"]], "retryable"),  # waits for the result to be stored
    ({"seg.dcm"}, set(), [["seg.dcm", "sr.dcm"]], "permanent"),  # the result refused for good: so is the note
])
def test_the_rejection_note_goes_only_after_the_new_result_is_stored(
        refuse: set[str], retry: set[str], calls: list[list[str]], note: str) -> None:
    from segnode.node.config import Dispatch
    from segnode.node.sending.delivery import Courier, notes_last

    sender = _Sender(refuse, retry)
    courier = Courier("pacs", sender, None, Dispatch(), lambda event: None)  # type: ignore[arg-type]
    objects = _pending("rejection", "seg", "sr")  # the index lists them by kind: the note first
    pending = notes_last(objects)
    assert [o.kind for o in pending] == ["seg", "sr", "rejection"]
    sent = courier._send_in_order(_job(1), objects, pending)  # type: ignore[arg-type]
    assert sender.calls == calls
    assert sent[-1].category.value == note
