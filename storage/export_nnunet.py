"""Export a frozen dataset version in the nnU-Net v2 raw layout.

``DatasetNNN_Name/imagesTr/{case}_0000.nii.gz``, ``labelsTr/{case}.nii.gz``,
the held-out cases in ``imagesTs``/``labelsTs``, and ``dataset.json`` with the
channel names and the labels renumbered 0..N.  The train/test split is by
patient pseudonym: all cases of a patient fall on the same side.  The split
is a pure function of the version's patients and the seed, so exporting the
same version twice gives the same split.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segnode.errors import ConfigError, InputError, StorageError
from segnode.storage import nifti
from segnode.storage.dataset import DatasetStore, check_dataset_name
from segnode.storage.manifest import CaseRecord, write_json_atomic

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportResult:
    folder: Path
    train: tuple[str, ...]
    test: tuple[str, ...]


def parse_ref(ref: str) -> tuple[str, int]:
    """``"Liver@3"`` → ``("Liver", 3)``."""
    name, sep, version = ref.partition("@")
    if not sep or not version.isdigit():
        raise ConfigError(f"{ref!r} is not NAME@VERSION (export needs a frozen version)")
    return check_dataset_name(name), int(version)


def split_patients(cases: list[CaseRecord], test_fraction: float, seed: str) -> tuple[set[str], set[str]]:
    """Patients for training and for testing (at least one of each when there are two or more)."""
    if not 0 <= test_fraction < 1:
        raise ConfigError(f"test fraction {test_fraction} must be in [0, 1)")
    patients = sorted({c.patient for c in cases}, key=lambda p: hashlib.sha256(f"{seed}|{p}".encode()).hexdigest())
    n_test = math.ceil(len(patients) * test_fraction) if test_fraction > 0 and len(patients) > 1 else 0
    n_test = min(n_test, len(patients) - 1)
    return set(patients[n_test:]), set(patients[:n_test])


def export_nnunet(
    store: DatasetStore,
    ref: str,
    out: Path,
    *,
    dataset_id: int = 501,
    test_fraction: float = 0.2,
    seed: str = "segnode",
) -> ExportResult:
    """Write version ``ref`` (``NAME@VERSION``) under ``out`` as ``DatasetNNN_NAME``."""
    if not 1 <= dataset_id <= 999:
        raise ConfigError(f"nnU-Net dataset ID {dataset_id} must be 1..999")
    name, version = parse_ref(ref)
    cases = store.version(name, version)
    table = store.version_labels(name, version)
    folder = Path(out) / f"Dataset{dataset_id:03d}_{name}"
    if folder.exists() and any(folder.iterdir()):
        raise StorageError("export folder exists and is not empty", where=str(folder))
    renumber = {value: i for i, value in enumerate(sorted(table), start=1)}
    train_patients, _ = split_patients(cases, test_fraction, seed)
    train: list[str] = []
    test: list[str] = []
    for case in sorted(cases, key=lambda c: c.case_id):
        side = "Tr" if case.patient in train_patients else "Ts"
        _write_case(store, case, folder, side, renumber)
        (train if side == "Tr" else test).append(case.case_id)
    write_json_atomic(folder / "dataset.json", _dataset_json(name, version, table, renumber, len(train)))
    logger.info("exported %s@%d to %s: %d training, %d test cases", name, version, folder, len(train), len(test))
    return ExportResult(folder, tuple(train), tuple(test))


def _write_case(store: DatasetStore, case: CaseRecord, folder: Path, side: str, renumber: dict[int, int]) -> None:
    image = store.read_object(case.image)
    grid = nifti.read_nifti(store.read_object(case.label), case.case_id)
    labels = np.zeros(grid.array.shape, dtype=np.uint8)
    for value in (int(v) for v in np.unique(grid.array) if v):
        if value not in renumber:
            raise InputError(f"label value {value} is not in the version's label table", where=case.case_id)
        labels[grid.array == value] = renumber[value]
    for sub, file_name, data in (
        (f"images{side}", f"{case.case_id}_0000.nii.gz", image),
        (f"labels{side}", f"{case.case_id}.nii.gz", nifti.nifti_bytes(labels, grid.affine_lps, np.uint8)),
    ):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        (folder / sub / file_name).write_bytes(data)


def _dataset_json(name: str, version: int, table: dict[int, str], renumber: dict[int, int], n_train: int) -> dict:
    labels = {"background": 0} | {table[value]: new for value, new in renumber.items()}
    return {
        "name": name,
        "description": f"segnode dataset {name} version {version} (de-identified, DICOM PS3.15 E.1)",
        "channel_names": {"0": "CT"},
        "labels": labels,
        "numTraining": n_train,
        "file_ending": ".nii.gz",
    }
