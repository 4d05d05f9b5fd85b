"""Our SEGs read as OHIF reads them: ``@cornerstonejs/adapters`` (npm) in Node.js.

``tests/js/read_seg_cornerstone.mjs`` hands a SEG and its source slices to
``adaptersSEG.Cornerstone3D.Segmentation.createFromDICOMSegBuffer`` (what
OHIF's SEG extension calls) and prints, per source image, the voxels of each
segment in the label map Cornerstone builds.  Those must equal our label map
slice for slice: BINARY and LABELMAP SEG, on the real thorax CTA (one segment
empty) and on a 15°-tilted, unevenly spaced series.  ``make install-test``
installs the reader's pinned packages (``tests/js/package-lock.json``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from segnode.models.volume import LabelMap, Volume
from segnode.node.writers.common import SegType
from segnode.node.writers.seg import write_seg

from tests.output_fixtures import (
    DATA,
    thorax,
    thorax_labels,
    tilted_uneven,
    writer_profile,
)
from tests.paths import TESTS

pytestmark = pytest.mark.peer  # Node.js and the npm packages of tests/js

READER = TESTS / "js" / "read_seg_cornerstone.mjs"


def cornerstone_read(seg: Path, source_dir: Path) -> dict:
    node = shutil.which("node")
    assert node, "Node.js is required: make install-test"
    assert (READER.parent / "node_modules" / "@cornerstonejs" / "adapters").is_dir(), \
        "the reader's npm packages are missing: make install-test (npm ci in tests/js)"
    out = subprocess.run([node, str(READER), str(seg), str(source_dir)], capture_output=True, text=True,
                         timeout=300, cwd=READER.parent, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def expected_voxels(volume: Volume, labels: LabelMap) -> dict[str, dict[str, int]]:
    """Per source SOP Instance UID, the voxels of each segment number (as the reader prints them)."""
    assert volume.source is not None
    out = {}
    for k, ds in enumerate(volume.source.datasets):
        counts = Counter(int(v) for v in labels.array[k][labels.array[k] > 0])
        if counts:
            out[str(ds.SOPInstanceUID)] = {str(value): n for value, n in sorted(counts.items())}
    return out


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    return writer_profile(tmp_path_factory.mktemp("profile"))


@pytest.mark.parametrize("seg_type", [SegType.BINARY, SegType.LABELMAP])
def test_thorax_seg_read_by_cornerstone_equals_our_label_map(profile, tmp_path: Path, seg_type: SegType) -> None:
    volume = thorax()
    labels = thorax_labels(volume, profile)
    seg = write_seg(volume, labels, profile, tmp_path, seg_type=seg_type)
    read = cornerstone_read(seg.path, DATA / "thorax_cta")
    assert read["segments"] == {"1": "aorta", "2": "vertebrae_t12", "3": "iliac_artery_left"}
    assert read["voxels"] == expected_voxels(volume, labels)
    assert {s for counts in read["voxels"].values() for s in counts} == {"1", "2"}  # iliac artery: empty


def test_tilted_uneven_seg_read_by_cornerstone_lands_on_its_source_images(profile, tmp_path: Path) -> None:
    volume, labels = tilted_uneven(tmp_path / "src", profile)
    assert np.count_nonzero(labels.array) > 0
    seg = write_seg(volume, labels, profile, tmp_path / "seg")
    read = cornerstone_read(seg.path, tmp_path / "src")
    assert read["voxels"] == expected_voxels(volume, labels)
