"""nnU-Net v2 export of a frozen version (checked by nnU-Net itself) and imports from disk."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from segnode.errors import ConfigError, InputError
from segnode.node.cli.main import main
from segnode.storage.dataset import DatasetStore, harvest
from segnode.storage.export_nnunet import export_nnunet, split_patients
from segnode.storage.importers import import_path

from tests.deid_study import make_canary_study, make_seg

SECRET = b"export-test-secret-0123"


def _harvested_store(tmp_path: Path, studies: list[tuple[str, str]]) -> DatasetStore:
    store = DatasetStore.open(tmp_path / "store", SECRET)
    for tag, patient in studies:
        files, _ = make_canary_study(tmp_path / f"s_{tag}", tag, patient_tag=patient, size=32, n_slices=8)
        seg = make_seg(files, tmp_path / f"seg_{tag}.dcm", labels=("liver", "spleen"))
        harvest(store, dataset="Abdomen", series_files=files, seg_path=seg, profile="liver", backend="hu_based",
                model_version="1", weights_hash="h", rule="r", calling_ae="AE")
    return store


def test_split_never_puts_a_patient_on_both_sides(tmp_path: Path) -> None:
    studies = [(f"t{i}", f"pat{i % 4}") for i in range(8)]  # 4 patients, 2 studies each
    store = _harvested_store(tmp_path, studies)
    store.freeze("Abdomen")
    result = export_nnunet(store, "Abdomen@1", tmp_path / "raw", test_fraction=0.25)
    cases = {c.case_id: c.patient for c in store.version("Abdomen", 1)}
    train = {cases[c] for c in result.train}
    test = {cases[c] for c in result.test}
    assert train and test and not train & test
    assert len(result.train) + len(result.test) == 8
    again = split_patients(store.version("Abdomen", 1), 0.25, "segnode")
    assert again[1] == test  # deterministic


def test_export_passes_nnunet_verify_dataset_integrity(tmp_path: Path) -> None:
    exe = shutil.which("nnUNetv2_plan_and_preprocess") or str(
        Path(os.sys.executable).parent / "nnUNetv2_plan_and_preprocess"
    )
    if not Path(exe).exists():
        pytest.fail("nnunetv2 is required: pip install -e '.[dl]'")
    store = _harvested_store(tmp_path, [("n1", "n1"), ("n2", "n2"), ("n3", "n3")])
    store.freeze("Abdomen")
    raw = tmp_path / "nnUNet_raw"
    assert main(["dataset", "--store", str(store.root), "export", "Abdomen@1", "--format", "nnunet",
                 "--out", str(raw), "--id", "777", "--test-fraction", "0.3"]) == 0
    folder = raw / "Dataset777_Abdomen"
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "liver": 1, "spleen": 2} and meta["channel_names"] == {"0": "CT"}
    assert meta["numTraining"] == len(list((folder / "labelsTr").iterdir())) == 2
    env = dict(os.environ, nnUNet_raw=str(raw), nnUNet_preprocessed=str(tmp_path / "pre"),
               nnUNet_results=str(tmp_path / "res"), OMP_NUM_THREADS="1")
    run = subprocess.run([exe, "-d", "777", "--verify_dataset_integrity", "--no_pp", "-npfp", "1"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert (tmp_path / "pre" / "Dataset777_Abdomen" / "dataset_fingerprint.json").exists()


def test_export_needs_a_frozen_version(tmp_path: Path) -> None:
    store = _harvested_store(tmp_path, [("f1", "f1")])
    with pytest.raises(ConfigError, match="NAME@VERSION"):
        export_nnunet(store, "Abdomen", tmp_path / "x")
    with pytest.raises(InputError, match="no version 1"):
        export_nnunet(store, "Abdomen@1", tmp_path / "x")


def _nifti_case(folder: Path, name: str, shape=(10, 12, 6)) -> tuple[Path, Path]:
    rng = np.random.default_rng(len(name))
    image = rng.integers(-1000, 1000, shape).astype(np.int16)
    label = np.zeros(shape, np.uint8)
    label[2:6, 3:8, 1:4] = 1
    label[7:9, 1:3, 2:5] = 2
    affine = np.diag([0.8, 0.8, 2.0, 1.0])
    img = nib.Nifti1Image(image, affine)
    img.header["descrip"] = b"Doe^Jane 1970-01-01"  # PHI in the header: must not survive
    return img, nib.Nifti1Image(label, affine)


def test_import_msd_and_nifti_pairs_strip_names_and_map_labels(tmp_path: Path) -> None:
    msd = tmp_path / "Task03_Liver"
    for sub in ("imagesTr", "labelsTr"):
        (msd / sub).mkdir(parents=True)
    for name in ("doe_jane_001", "roe_rick_002"):
        img, lab = _nifti_case(msd, name)
        nib.save(img, msd / "imagesTr" / f"{name}.nii.gz")
        nib.save(lab, msd / "labelsTr" / f"{name}.nii.gz")
    (msd / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "liver", "2": "cancer"}}))
    store = DatasetStore.open(tmp_path / "store", SECRET)
    report = import_path(store, msd, dataset="MSD", mapping={1: "liver", 2: "-"})
    assert len(report.added) == 2 and all(r.labels == {1: "liver"} for r in report.added)
    label = nib.Nifti1Image.from_bytes(__import__("gzip").decompress(store.read_object(report.added[0].label)))
    assert set(np.unique(np.asarray(label.dataobj))) == {0, 1}  # the dropped label is gone
    blob = b"".join(p.read_bytes() for p in store.root.rglob("*") if p.is_file())
    import gzip as _gz
    blob += b"".join(_gz.decompress(p.read_bytes()) for p in store.root.rglob("*") if p.is_file()
                     and p.read_bytes()[:2] == b"\x1f\x8b")
    assert b"doe_jane" not in blob and b"Doe^Jane" not in blob and b"roe_rick" not in blob
    plain = tmp_path / "pairs"
    for sub in ("images", "labels"):
        (plain / sub).mkdir(parents=True)
    img, lab = _nifti_case(plain, "x")
    nib.save(img, plain / "images" / "case1.nii.gz")
    nib.save(lab, plain / "labels" / "case1.nii.gz")
    with pytest.raises(InputError, match="need a label mapping"):
        import_path(store, plain, dataset="Pairs")
    assert main(["dataset", "--store", str(store.root), "--secret-file", str(_secret(tmp_path)), "add",
                 str(plain), "--dataset", "Pairs", "--label-map", "1=Liver,2=Spleen"]) == 0
    assert store.label_table("Pairs") == {1: "liver", 2: "spleen"}


def _secret(tmp_path: Path) -> Path:
    path = tmp_path / "secret.key"
    path.write_bytes(SECRET)
    return path


def test_import_dicom_with_seg(tmp_path: Path) -> None:
    folder = tmp_path / "curated"
    files, _ = make_canary_study(folder / "ct", "d1")
    make_seg(files, folder / "seg.dcm", labels=("Liver",))
    (folder / "README.txt").write_text("not DICOM")
    store = DatasetStore.open(tmp_path / "store", SECRET)
    report = import_path(store, folder, dataset="Dicom")
    assert len(report.added) == 1 and report.added[0].labels == {1: "liver"}
    assert report.added[0].label_status.value == "reviewed" and len(report.added[0].dicom) == 6
