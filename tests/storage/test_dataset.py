"""Dataset store: harvest, pseudonym consistency, SEG references, validators, versions, corrections, CLI."""

from __future__ import annotations

import gzip
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from segnode.errors import ConfigError, InputError, StorageError
from segnode.node.cli.main import main
from segnode.storage.dataset import (
    CaseInput,
    DatasetStore,
    ModalityError,
    QuarantinedError,
    harvest,
)
from segnode.storage.importers import import_path
from segnode.storage.labels import seg_to_labels
from segnode.storage.manifest import LabelStatus

from tests.deid_study import make_canary_study, make_seg
from tests.dicomtools import dciodvfy

SECRET = b"dataset-test-secret-0123"


def _harvest(store: DatasetStore, files, seg, dataset="Liver", ae="CT_SCANNER_1"):
    return harvest(store, dataset=dataset, series_files=files, seg_path=seg, profile="liver", backend="hu_based",
                   model_version="0.1", weights_hash="abc123", rule="liver-ct", calling_ae=ae)


@pytest.fixture
def store(tmp_path: Path) -> DatasetStore:
    return DatasetStore.open(tmp_path / "store", SECRET)


def _study(tmp_path: Path, tag: str, patient: str | None = None, labels=("liver",)):
    files, tok = make_canary_study(tmp_path / f"s_{tag}", tag, patient_tag=patient)
    return files, make_seg(files, tmp_path / f"seg_{tag}.dcm", labels=labels), tok


def _dicom(store: DatasetStore, digest: str) -> pydicom.Dataset:
    return pydicom.dcmread(store.object_path(digest))


def test_harvest_writes_nifti_labels_dicom_and_manifest(store: DatasetStore, tmp_path: Path) -> None:
    files, seg, tok = _study(tmp_path, "h1", labels=("liver", "spleen"))
    record = _harvest(store, files, seg)
    assert record.label_status is LabelStatus.AUTO and record.labels == {1: "liver", 2: "spleen"}
    assert record.source_ae == store.pseudonyms.ae_title("CT_SCANNER_1") != "CT_SCANNER_1"
    assert record.study_date and record.study_date != tok["study_date"]
    image = nib.Nifti1Image.from_bytes(gzip.decompress(store.read_object(record.image)))
    label = nib.Nifti1Image.from_bytes(gzip.decompress(store.read_object(record.label)))
    assert image.shape == label.shape == (24, 24, 6)
    assert np.allclose(image.affine, label.affine)
    assert set(np.unique(np.asarray(label.dataobj))) == {0, 1, 2}
    assert np.asarray(image.dataobj).min() >= -1000  # Hounsfield units
    assert len(record.dicom) == 6 and record.seg
    assert store.cases("Liver")[record.case_id] == record


def test_seg_references_the_deidentified_source(store: DatasetStore, tmp_path: Path) -> None:
    files, seg, _ = _study(tmp_path, "r1")
    record = _harvest(store, files, seg)
    images = [_dicom(store, h) for h in record.dicom]
    seg_ds = _dicom(store, record.seg)
    image_uids = {str(ds.SOPInstanceUID) for ds in images}
    referenced = {str(i.ReferencedSOPInstanceUID) for s in seg_ds.ReferencedSeriesSequence
                  for i in s.ReferencedInstanceSequence}
    assert referenced == image_uids
    assert seg_ds.ReferencedSeriesSequence[0].SeriesInstanceUID == images[0].SeriesInstanceUID
    assert seg_ds.StudyInstanceUID == images[0].StudyInstanceUID == record.study_uid
    assert seg_ds.FrameOfReferenceUID == images[0].FrameOfReferenceUID
    assert seg_ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    array, names = seg_to_labels(seg_ds, record.instances)  # highdicom reads it back on the source
    assert names == {1: "liver"} and array.any()


def test_pseudonyms_consistent_for_one_patient_and_one_secret(tmp_path: Path) -> None:
    a_files, a_seg, _ = _study(tmp_path, "p1", patient="pp")
    b_files, b_seg, _ = _study(tmp_path, "p2", patient="pp")
    store = DatasetStore.open(tmp_path / "one", SECRET)
    a, b = _harvest(store, a_files, a_seg), _harvest(store, b_files, b_seg)
    assert a.patient == b.patient and a.study_uid != b.study_uid
    other = DatasetStore.open(tmp_path / "two", SECRET)
    assert _harvest(other, a_files, a_seg).study_uid == a.study_uid  # same secret: same pseudonyms
    third = DatasetStore.open(tmp_path / "three", b"a-different-secret-0123")
    c = _harvest(third, a_files, a_seg)
    assert c.patient != a.patient and c.study_uid != a.study_uid and c.case_id != a.case_id


def test_store_refuses_wrong_or_inside_secret(tmp_path: Path) -> None:
    DatasetStore.open(tmp_path / "s", SECRET)
    with pytest.raises(ConfigError, match="not the one the store was created with"):
        DatasetStore.open(tmp_path / "s", b"another-secret-entirely")
    with pytest.raises(ConfigError, match="outside the dataset store"):
        DatasetStore.open(tmp_path / "s", SECRET, secret_path=tmp_path / "s" / "key")
    assert SECRET not in b"".join(p.read_bytes() for p in (tmp_path / "s").rglob("*") if p.is_file())


def test_burned_in_series_is_quarantined_not_harvested(store: DatasetStore, tmp_path: Path) -> None:
    files, seg, _ = _study(tmp_path, "q1")
    ds = pydicom.dcmread(files[0])
    ds.BurnedInAnnotation = "YES"
    ds.save_as(files[0])
    with pytest.raises(QuarantinedError):
        _harvest(store, files, seg)
    assert store.cases("Liver") == {} and store.quarantined()[0]["reason"] == "BurnedInAnnotation is not NO"
    assert not (store.root / "objects").exists()


@pytest.mark.peer
def test_validators_pass_on_deidentified_thorax_study_and_seg(store: DatasetStore, tmp_path: Path,
                                                             data_dir: Path) -> None:
    files = sorted((data_dir / "thorax_cta").glob("*.dcm"))
    aorta = np.asarray(nib.load(data_dir / "thorax_cta_labels" / "aorta.nii.gz").dataobj)

    def mask(shape):  # NIfTI (i, j, k) LPS as written by the converter → (k, j, i), slices sorted by z
        return (aorta.transpose(2, 1, 0) > 0)[: shape[0]]

    seg = make_seg(files, tmp_path / "thorax_seg.dcm", mask_fn=mask, labels=("aorta",))
    record = _harvest(store, files, seg, dataset="Thorax")
    out = tmp_path / "deid_study"
    out.mkdir()
    for i, digest in enumerate(record.dicom[:3]):  # three slices: dciodvfy is slow-ish
        shutil.copy(store.object_path(digest), out / f"img{i}.dcm")
    shutil.copy(store.object_path(record.seg), out / "seg.dcm")
    # the converted source has one error of its own (empty Laterality, type 2C): none may be added
    source_errors = set(dciodvfy(files[0]))
    assert source_errors <= {e for e in source_errors if "Laterality" in e}
    for path in sorted(out.glob("img*.dcm")):
        assert set(dciodvfy(path)) <= source_errors, path.name
    assert dciodvfy(out / "seg.dcm") == []
    every = tmp_path / "all"
    every.mkdir()
    for i, digest in enumerate((*record.dicom, record.seg)):
        shutil.copy(store.object_path(digest), every / f"{i:04d}.dcm")
    result = subprocess.run(["dcentvfy", *map(str, sorted(every.iterdir()))], capture_output=True, text=True,
                            timeout=300)
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]
    assert errors == []


def test_freeze_correct_and_versions_stay_immutable(store: DatasetStore, tmp_path: Path) -> None:
    files, seg, _ = _study(tmp_path, "v1")
    record = _harvest(store, files, seg)
    assert store.freeze("Liver") == 1
    with pytest.raises(InputError, match="not changed"):
        store.freeze("Liver")
    # a curator's NIfTI on the image grid
    image = nib.Nifti1Image.from_bytes(gzip.decompress(store.read_object(record.image)))
    corrected = np.zeros(image.shape, dtype=np.uint8)
    corrected[2:9, 3:12, 1:5] = 1
    path = tmp_path / "fixed.nii.gz"
    nib.save(nib.Nifti1Image(corrected, image.affine), path)
    updated = store.correct(record.case_id, path)
    assert updated.label_status is LabelStatus.CORRECTED and updated.previous_labels == (record.label,)
    assert store.freeze("Liver") == 2
    v1, v2 = store.version("Liver", 1)[0], store.version("Liver", 2)[0]
    assert v1.label == record.label and v1.label_status is LabelStatus.AUTO
    assert v2.label == updated.label != v1.label
    assert store.verify("Liver", 1) == len(v1.hashes())
    # a re-harvest of the same series keeps the curated labels
    assert _harvest(store, files, seg).label == updated.label
    # tampering with a frozen version is detected
    version_file = store.root / "datasets" / "Liver" / "versions" / "1.json"
    version_file.chmod(0o644)
    version_file.write_text(version_file.read_text().replace('"auto"', '"reviewed"'))
    with pytest.raises(StorageError, match="modified after freezing"):
        store.version("Liver", 1)


def test_correct_with_a_seg_on_the_original_uids(store: DatasetStore, tmp_path: Path) -> None:
    files, seg, _ = _study(tmp_path, "c1")
    record = _harvest(store, files, seg)
    fixed = make_seg(files, tmp_path / "fixed_seg.dcm", mask_fn=lambda s: np.pad(np.ones((s[0], 4, 4)), (
        (0, 0), (0, s[1] - 4), (0, s[2] - 4))), labels=("liver",))
    updated = store.correct(record.case_id, fixed)
    label = nib.Nifti1Image.from_bytes(gzip.decompress(store.read_object(updated.label)))
    assert int(np.asarray(label.dataobj).sum()) == 6 * 16


def test_wrong_grid_correction_is_refused(store: DatasetStore, tmp_path: Path) -> None:
    files, seg, _ = _study(tmp_path, "w1")
    record = _harvest(store, files, seg)
    path = tmp_path / "bad.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((5, 5, 5), np.uint8), np.eye(4)), path)
    with pytest.raises(InputError, match="do not lie on the image grid"):
        store.correct(record.case_id, path)
    assert store.cases("Liver")[record.case_id] == record


def test_cli_list_show_freeze_and_secret_errors(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("SEGNODE_DEID_SECRET_FILE", raising=False)
    secret = tmp_path / "secret.key"
    secret.write_bytes(SECRET)
    store = DatasetStore.open(tmp_path / "store", SECRET)
    files, seg, _ = _study(tmp_path, "cli")
    record = _harvest(store, files, seg)
    base = ["dataset", "--store", str(tmp_path / "store")]
    assert main([*base, "list"]) == 0
    assert "Liver\t1 cases" in capsys.readouterr().out
    assert main([*base, "show", "Liver"]) == 0
    assert record.case_id in capsys.readouterr().out
    assert main([*base, "freeze", "Liver"]) == 0
    assert "Liver@1" in capsys.readouterr().out
    assert main([*base, "correct", record.case_id, str(seg)]) == 2  # no secret: refused
    assert "no de-identification secret" in capsys.readouterr().err
    assert main([*base, "--secret-file", str(secret), "correct", record.case_id, str(seg)]) == 0


def _label_sum(store: DatasetStore, record) -> int:
    return int(np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(store.read_object(record.label))).dataobj).sum())


def test_correct_with_the_stores_own_deidentified_seg(store: DatasetStore, tmp_path: Path) -> None:
    files, seg, _ = _study(tmp_path, "d1")
    record = _harvest(store, files, seg)
    own = tmp_path / "own.dcm"
    own.write_bytes(store.read_object(record.seg))
    assert pydicom.dcmread(own).PatientIdentityRemoved == "YES"
    updated = store.correct(record.case_id, own)
    assert updated.label_status is LabelStatus.CORRECTED and _label_sum(store, updated) == _label_sum(store, record) > 0


def test_a_seg_deidentified_elsewhere_is_refused_not_stored_empty(store: DatasetStore, tmp_path: Path,
                                                                 capsys, monkeypatch) -> None:
    monkeypatch.delenv("SEGNODE_DEID_SECRET_FILE", raising=False)
    files, seg, _ = _study(tmp_path, "d2")
    record = _harvest(store, files, seg)
    other = DatasetStore.open(tmp_path / "other", b"another-secret-0123456789")
    foreign = tmp_path / "foreign.dcm"
    foreign.write_bytes(other.read_object(_harvest(other, files, seg).seg))  # YES, but other UIDs
    with pytest.raises(InputError, match="not all of them .* among this case's slices"):
        store.correct(record.case_id, foreign)
    assert store.cases("Liver")[record.case_id] == record
    secret = tmp_path / "secret.key"
    secret.write_bytes(SECRET)
    args = ["dataset", "--store", str(store.root), "--secret-file", str(secret), "correct", record.case_id]
    assert main([*args, str(foreign)]) == 3
    captured = capsys.readouterr()
    assert "labels corrected" not in captured.out and "another key" in captured.err


def test_a_seg_of_another_series_is_refused(store: DatasetStore, tmp_path: Path) -> None:
    files, seg, _ = _study(tmp_path, "d3")
    _, other_seg, _ = _study(tmp_path, "d4")
    record = _harvest(store, files, seg)
    with pytest.raises(InputError, match="another series"):
        store.correct(record.case_id, other_seg)


def test_a_non_ct_series_is_refused_and_skipped_on_import(store: DatasetStore, tmp_path: Path) -> None:
    files, seg, _ = _study(tmp_path, "m1")
    for path in files:
        ds = pydicom.dcmread(path)
        ds.Modality = "MR"
        ds.save_as(path)
    with pytest.raises(ModalityError, match="a MR series cannot join a dataset of CT series"):
        _harvest(store, files, seg)
    folder = tmp_path / "mixed"
    ct_files, _ = make_canary_study(folder / "ct", "m2")
    make_seg(ct_files, folder / "ct_seg.dcm")
    shutil.copytree(files[0].parent, folder / "mr")
    shutil.copy(seg, folder / "mr_seg.dcm")
    report = import_path(store, folder, dataset="Mixed")
    assert len(report.added) == 1 and report.skipped == ["a MR series cannot join a dataset of CT series"]


def test_profiles_are_checked(store: DatasetStore, tmp_path: Path) -> None:
    files, seg, _ = _study(tmp_path, "pr")
    _harvest(store, files, seg)  # profile liver
    with pytest.raises(InputError, match="holds cases of profile 'liver', not 'lungs'"):
        harvest(store, dataset="Liver", series_files=files, seg_path=seg, profile="lungs", backend="b",
                model_version="1", weights_hash="h", rule="r", calling_ae="AE")
    with pytest.raises(ConfigError, match="unknown profile 'livr'"):
        import_path(store, files[0].parent, dataset="Other", profile="livr")


def test_one_series_in_two_datasets_gets_two_case_ids(store: DatasetStore, tmp_path: Path) -> None:
    files, seg, _ = _study(tmp_path, "n1")
    near = tmp_path / "near"
    near.mkdir()
    for path in files:  # a near-copy: the same series, one attribute changed
        ds = pydicom.dcmread(path)
        ds.SeriesDescription = "re-exported"
        ds.save_as(near / path.name)
    first = _harvest(store, files, seg, dataset="Liver")
    second = _harvest(store, sorted(near.iterdir()), seg, dataset="LiverCopy")
    assert first.case_id != second.case_id and first.patient == second.patient
    assert store.find_case(first.case_id) == first and store.find_case(second.case_id) == second


def test_times_of_day_on_the_stored_seg_are_shifted(store: DatasetStore, tmp_path: Path) -> None:
    files, seg, _ = _study(tmp_path, "t1")
    record = _harvest(store, files, seg)
    original, stored = pydicom.dcmread(seg), _dicom(store, record.seg)
    for keyword in ("StudyTime", "ContentTime", "InstanceCreationTime"):
        assert stored.get(keyword) and stored.get(keyword) != original.get(keyword), keyword
    contributions = [str(i.ContributionDateTime) for i in stored.ContributingEquipmentSequence]
    assert not {c[8:14] for c in contributions} & {str(i.ContributionDateTime)[8:14]
                                                   for i in original.ContributingEquipmentSequence}
    image = _dicom(store, record.dicom[0])
    assert image.StudyTime != "101010" and image.StudyTime == stored.StudyTime  # one shift per patient


def test_a_seg_cannot_correct_a_case_without_dicom_slices(store: DatasetStore, tmp_path: Path) -> None:
    _, seg, _ = _study(tmp_path, "ns")
    record = store.add_case(CaseInput(case_id="C0123456789ABCDE", dataset="Nifti", patient="P1",
                                      image=np.zeros((6, 24, 24), np.int16), affine_lps=np.eye(4),
                                      label=np.ones((6, 24, 24), np.uint8), label_names={1: "liver"},
                                      label_status=LabelStatus.REVIEWED))
    with pytest.raises(InputError, match="no DICOM slices to map a SEG onto"):
        store.correct(record.case_id, seg)
    assert store.cases("Nifti")[record.case_id] == record
