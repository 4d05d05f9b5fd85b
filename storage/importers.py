"""Import data curators already hold: Decathlon (MSD) folders, NIfTI pairs, DICOM + SEG.

Everything goes through the same de-identification and manifest as a harvest:
DICOM is de-identified with the store's key; NIfTI is re-encoded from voxels
and affine only (no header text survives), and file names, which may carry a
patient's name, are replaced by keyed case IDs.  A label mapping
(``"1=liver,2=-"``) turns source label values into profile tissue names.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import numpy as np
import pydicom

from segnode.errors import InputError
from segnode.storage import nifti
from segnode.profiles.loader import load_profile
from segnode.storage.dataset import CaseInput, DatasetStore, ModalityError, QuarantinedError, deidentified_case
from segnode.storage.deid import read_dicom
from segnode.storage.labels import apply_mapping, tissue_name
from segnode.storage.manifest import CaseRecord, LabelStatus

logger = logging.getLogger(__name__)

_NII = (".nii.gz", ".nii")


class Layout(str, Enum):
    MSD = "msd"  #: imagesTr/ labelsTr/ dataset.json (Medical Segmentation Decathlon)
    NIFTI = "nifti"  #: images/ and labels/ with the same file names
    DICOM = "dicom"  #: a folder of DICOM series and SEG objects referencing them


@dataclass
class ImportReport:
    added: list[CaseRecord] = field(default_factory=list)
    quarantined: int = 0
    skipped: list[str] = field(default_factory=list)


def detect_layout(path: Path) -> Layout:
    if (path / "imagesTr").is_dir() and (path / "labelsTr").is_dir():
        return Layout.MSD
    if (path / "images").is_dir() and (path / "labels").is_dir():
        return Layout.NIFTI
    return Layout.DICOM


def import_path(
    store: DatasetStore,
    path: Path,
    *,
    dataset: str,
    layout: Layout | str | None = None,
    mapping: Mapping[int, str] | None = None,
    profile: str = "",
    label_status: LabelStatus | str = LabelStatus.REVIEWED,
) -> ImportReport:
    """Import every case found under ``path`` into ``dataset``."""
    path = Path(path)
    if not path.is_dir():
        raise InputError("not a folder", where=str(path))
    chosen = Layout(layout) if layout else detect_layout(path)
    status = LabelStatus(label_status)
    if profile:
        load_profile(profile)  # an unknown profile is a ConfigError naming the known ones
    if chosen is Layout.DICOM:
        return _import_dicom(store, path, dataset, mapping, profile, status)
    return _import_nifti(store, path, chosen, dataset, mapping, profile, status)


def _stem(path: Path) -> str:
    return next(path.name[: -len(s)] for s in _NII if path.name.endswith(s))


def _nifti_pairs(path: Path, layout: Layout) -> list[tuple[str, Path, Path]]:
    images, labels = ("imagesTr", "labelsTr") if layout is Layout.MSD else ("images", "labels")
    label_files = {_stem(p): p for p in (path / labels).iterdir() if p.name.endswith(_NII)}
    pairs = []
    for image in sorted(p for p in (path / images).iterdir() if p.name.endswith(_NII) and not p.name.startswith(".")):
        stem = _stem(image)
        key = stem[:-5] if layout is Layout.MSD and stem.endswith("_0000") else stem
        if key not in label_files:
            raise InputError(f"image {image.name} has no label file", where=str(path / labels))
        pairs.append((key, image, label_files[key]))
    if not pairs:
        raise InputError(f"no NIfTI images in {images}/", where=str(path))
    return pairs


def _msd_mapping(path: Path) -> dict[int, str]:
    try:
        labels = json.loads((path / "dataset.json").read_text(encoding="utf-8"))["labels"]
    except (OSError, KeyError, json.JSONDecodeError) as exc:
        raise InputError(f"dataset.json has no readable 'labels': {exc}", where=str(path)) from exc
    # MSD v1: {"0": "background", "1": "liver"}; nnU-Net v2: {"background": 0, "liver": 1}
    pairs = {int(k): v for k, v in labels.items()} if all(k.isdigit() for k in labels) else {
        int(v): k for k, v in labels.items()
    }
    return {v: tissue_name(n) for v, n in pairs.items() if v != 0}


def _import_nifti(store: DatasetStore, path: Path, layout: Layout, dataset: str, mapping: Mapping[int, str] | None,
                  profile: str, status: LabelStatus) -> ImportReport:
    names = dict(mapping) if mapping else (_msd_mapping(path) if layout is Layout.MSD else None)
    if names is None:
        raise InputError("plain NIfTI pairs need a label mapping (--label-map 1=liver,...)", where=str(path))
    report = ImportReport()
    for key, image_path, label_path in _nifti_pairs(path, layout):
        source = f"import|{path.resolve()}|{key}"
        image = nifti.read_nifti(_read(image_path), "image")
        label = nifti.read_nifti(_read(label_path), "label")
        if label.array.shape != image.array.shape or not np.allclose(label.affine_lps, image.affine_lps, atol=1e-3):
            raise InputError("label grid differs from the image grid", where=store.case_id(dataset, source))
        array, label_names = apply_mapping(label.array.astype(np.uint8), names)
        record = store.add_case(
            CaseInput(
                case_id=store.case_id(dataset, source),
                dataset=dataset,
                patient=store.pseudonyms.patient_id(source),  # one patient per file: no identity known
                image=_image_values(image.array),
                affine_lps=image.affine_lps,
                label=array,
                label_names=label_names,
                label_status=status,
                profile=profile,
                backend=f"import-{layout.value}",
            )
        )
        report.added.append(record)
    return report


def _image_values(array: np.ndarray) -> np.ndarray:
    if np.issubdtype(array.dtype, np.integer) or np.array_equal(array, np.round(array)):
        return np.clip(np.round(array), -32768, 32767).astype(np.int16)
    return array.astype(np.float32)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror}", where=str(path)) from exc


def _import_dicom(store: DatasetStore, path: Path, dataset: str, mapping: Mapping[int, str] | None, profile: str,
                  status: LabelStatus) -> ImportReport:
    series: dict[str, list[Path]] = defaultdict(list)
    segs: list[Path] = []
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        try:
            head = pydicom.dcmread(file, stop_before_pixels=True)
        except (pydicom.errors.InvalidDicomError, OSError, ValueError, EOFError):
            continue  # not DICOM (README, DICOMDIR pieces…)
        if str(head.get("Modality", "")) == "SEG":
            segs.append(file)
        elif "SeriesInstanceUID" in head:
            series[str(head.SeriesInstanceUID)].append(file)
    report = ImportReport()
    for seg_path in segs:
        seg = read_dicom(seg_path)
        refs = [str(i.SeriesInstanceUID) for i in seg.get("ReferencedSeriesSequence", []) if "SeriesInstanceUID" in i]
        files = next((series[r] for r in refs if r in series), None)
        if files is None:
            report.skipped.append(f"a SEG whose source series is not in {path.name}")
            continue
        try:
            case = deidentified_case(
                store, dataset=dataset, datasets=[read_dicom(f) for f in files], seg=seg, label_status=status
            )
        except QuarantinedError:
            report.quarantined += 1
            continue
        except ModalityError as exc:
            report.skipped.append(exc.message)
            continue
        if mapping:
            case.label, case.label_names = _remap_segments(case.label, case.label_names, mapping)
        case.profile, case.backend = profile, "import-dicom"
        report.added.append(store.add_case(case))
    if not report.added and not report.quarantined:
        why = f" ({'; '.join(report.skipped)})" if report.skipped else ""
        raise InputError(f"no CT series with a SEG referencing it were found{why}", where=str(path))
    return report


def _remap_segments(array: np.ndarray, names: dict[int, str], mapping: Mapping[int, str]) -> tuple[np.ndarray, dict[int, str]]:
    """A mapping on a SEG import renames segment numbers (``2=-`` drops segment 2)."""
    renamed = {n: mapping.get(n, names[n]) for n in names}
    return apply_mapping(array, renamed)


def summary(report: ImportReport) -> str:
    text = f"{len(report.added)} case(s) added"
    if report.quarantined:
        text += f", {report.quarantined} series quarantined (possible burned-in or embedded text)"
    if report.skipped:
        text += f", {len(report.skipped)} skipped: " + "; ".join(report.skipped)
    return text

