"""Shared inputs for the output-writer tests (RTSTRUCT, overlay, SR): real CTA with TotalSegmentator labels, a tilted phantom."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from segnode.models.series import load_series
from segnode.models.volume import LabelMap, Volume
from segnode.profiles.loader import load_profile_file
from segnode.profiles.schema import Profile

from tests.phantoms import write_tilted_uneven_series

DATA = Path(__file__).resolve().parent / "data"

#: aorta and T12 from TotalSegmentator; iliac_artery_left is empty on this crop
PROFILE_YAML = """\
organ: thoraxtest
description: Output writer test profile
model_type: totalsegmentator
tissues:
- {name: aorta, description: Aorta, codes_from: aorta, totalsegmentator: [aorta]}
- {name: vertebrae_t12, description: T12 vertebra, codes_from: vertebrae_T12, totalsegmentator: [vertebrae_T12]}
- {name: iliac_artery_left, description: Left iliac artery, codes_from: iliac_artery_left, totalsegmentator: [iliac_artery_left]}
"""

NIFTIS = {"aorta": "aorta", "vertebrae_t12": "vertebrae_T12", "iliac_artery_left": "iliac_artery_left"}


def dcmqi_tool(name: str) -> str:
    """A dcmqi executable (PyPI ``dcmqi`` puts them next to the venv's python)."""
    exe = Path(sys.executable).parent / name
    found = str(exe) if exe.exists() else shutil.which(name)
    assert found, f"dcmqi's {name} is required: pip install -e .[test]"
    return found


def writer_profile(tmp: Path) -> Profile:
    path = tmp / "thoraxtest.yaml"
    path.write_text(PROFILE_YAML)
    return load_profile_file(path)


def labels_on(path: Path, volume: Volume) -> np.ndarray:
    """A NIfTI label map resampled (nearest) onto the volume, through patient space."""
    image = nib.load(path)
    data = np.asarray(image.dataobj)
    k, j, i = np.indices(volume.shape)
    xyz = (volume.affine() @ np.stack([i.ravel(), j.ravel(), k.ravel(), np.ones(i.size)]))[:3]
    ras = np.stack([-xyz[0], -xyz[1], xyz[2], np.ones(i.size)])
    idx = np.rint(np.linalg.inv(image.affine) @ ras)[:3].astype(int)
    inside = np.all((idx >= 0) & (idx < np.array(data.shape)[:, None]), axis=0)
    out = np.zeros(i.size, dtype=data.dtype)
    out[inside] = data[idx[0, inside], idx[1, inside], idx[2, inside]]
    return out.reshape(volume.shape)


def thorax() -> Volume:
    return load_series(DATA / "thorax_cta")


def thorax_labels(volume: Volume, profile: Profile) -> LabelMap:
    array = np.zeros(volume.shape, np.uint8)
    for value, name in profile.label_values().items():
        array[labels_on(DATA / "thorax_cta_labels" / f"{NIFTIS[name]}.nii.gz", volume) > 0] = value
    return LabelMap(array, profile.label_values(), backend="totalsegmentator", model_version="test-1")


#: slice offsets (mm along the tilted axis): steps of 2, 3 and 2.5 mm
TILTED_OFFSETS = [0.0, 2.0, 5.0, 7.0, 10.0, 12.5]


def tilted_uneven(folder: Path, profile: Profile) -> tuple[Volume, LabelMap]:
    """A 15° tilted, unevenly spaced phantom, with a ring (hole), a single pixel and an empty ROI."""
    shape = (len(TILTED_OFFSETS), 40, 48)
    hu = np.full(shape, -1000.0)
    array = np.zeros(shape, np.uint8)
    rr, cc = np.mgrid[: shape[1], : shape[2]]
    ring = ((rr - 20) ** 2 + (cc - 22) ** 2 <= 12**2) & ((rr - 20) ** 2 + (cc - 22) ** 2 > 5**2)
    for k in range(shape[0]):
        array[k][ring] = 1
        array[k, 3 + k, 40] = 2  # a single pixel, moving down the slices
        array[k][(rr - 20) ** 2 + (cc - 22) ** 2 <= 2] = 1  # an island inside the hole
    hu[array > 0] = 60.0
    write_tilted_uneven_series(hu, folder, (0.7, 0.9), TILTED_OFFSETS)
    volume = load_series(folder)
    return volume, LabelMap(array, profile.label_values(), backend="totalsegmentator", model_version="test-1")
