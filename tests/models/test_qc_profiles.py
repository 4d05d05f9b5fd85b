"""QC of every profile (models/qc.py with profiles/*.yaml ``qc:``): a pass case and a warn or
fail case per check kind, on an adult-sized synthetic trunk and head (organ volumes inside the
published normal ranges cited in the profiles) and on real TotalSegmentator labels in tests/data.

The trunk phantom lies 100 mm off the table centre (patient x of its midline: -100 mm), so a
side check against x = 0 instead of the body's midline would call the left kidney right.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from segnode.models.qc import Finding, Outcome, run_qc, worst
from segnode.models.volume import LabelMap, Volume
from segnode.profiles.loader import load_profile

from tests.models.test_hu_based import _labels_on
from tests.paths import DATA
from tests.phantoms import head_phantom, read_ct_series

PROFILES = ("liver", "spleen", "kidneys", "heart", "brain", "lungs", "bone")
#: patient x of the trunk phantom's midline (mm): the patient lies off the table centre
MIDLINE_X = -100.0
SPACING = 3.0
SHAPE = (100, 120, 200)  # k, j, i: 300 x 360 x 600 mm


@dataclass(frozen=True)
class Trunk:
    volume: Volume
    organs: dict[str, np.ndarray]


def ellipsoid(shape: tuple[int, int, int], centre: tuple[float, float, float], semi: tuple[float, float, float]) -> np.ndarray:
    """Voxels of the trunk grid (identity direction, origin at the grid centre) inside an ellipsoid (mm)."""
    k, j, i = np.ogrid[: shape[0], : shape[1], : shape[2]]
    x, y, z = ((idx - (n - 1) / 2) * SPACING for idx, n in ((i, shape[2]), (j, shape[1]), (k, shape[0])))
    return ((x - centre[0]) / semi[0]) ** 2 + ((y - centre[1]) / semi[1]) ** 2 + ((z - centre[2]) / semi[2]) ** 2 <= 1


@pytest.fixture(scope="module")
def trunk() -> Trunk:
    """Adult-sized organs (4/3 pi abc): liver 1525 mL, spleen 226 mL, kidneys 176 mL, heart 691 mL,
    lungs 2.2 L each; patient's left is +x (LPS)."""
    m = MIDLINE_X
    organs = {
        "liver": ellipsoid(SHAPE, (m - 60, -10, -20), (80, 70, 65)),
        "spleen": ellipsoid(SHAPE, (m + 95, 20, 0), (30, 40, 45)),
        "kidney_left": ellipsoid(SHAPE, (m + 65, 55, -80), (28, 30, 50)),
        "kidney_right": ellipsoid(SHAPE, (m - 65, 55, -80), (28, 30, 50)),
        "heart": ellipsoid(SHAPE, (m + 20, -30, 60), (55, 50, 60)),
        "lung_left": ellipsoid(SHAPE, (m + 85, 0, 60), (55, 80, 120)),
        "lung_right": ellipsoid(SHAPE, (m - 85, 0, 60), (55, 80, 120)),
    }
    hu = np.full(SHAPE, -1000.0, dtype=np.float32)
    hu[ellipsoid(SHAPE, (m, 0, 0), (160, 115, 1e6))] = 40.0
    origin = tuple(-(n - 1) / 2 * SPACING for n in SHAPE[::-1])
    volume = Volume(hu, (SPACING,) * 3, origin, np.eye(3))  # type: ignore[arg-type]
    return Trunk(volume, organs)


def result(profile: str, masks: dict[str, np.ndarray]) -> LabelMap:
    """A label map for ``profile`` drawn from ``masks`` (tissue name → mask)."""
    values = load_profile(profile).label_values()
    shape = next(iter(masks.values())).shape
    array = np.zeros(shape, dtype=np.uint8)
    for value, name in values.items():
        array[masks.get(name, np.zeros(shape, dtype=bool))] = value
    return LabelMap(array, values, "test")


def qc(volume: Volume, profile: str, masks: dict[str, np.ndarray]) -> dict[tuple[str, str], Finding]:
    return {(f.check, f.tissue): f for f in run_qc(volume, result(profile, masks), load_profile(profile))}


TRUNK_PROFILES = {"liver": ("liver",), "spleen": ("spleen",), "kidneys": ("kidney_left", "kidney_right"), "heart": ("heart",)}


def test_every_profile_has_qc_for_every_tissue() -> None:
    for name in PROFILES:
        profile = load_profile(name)
        assert profile.qc.tissues, name
        for tissue in profile.tissues:
            spec = profile.qc.tissues[tissue.name]
            if name not in ("bone",) and tissue.name != "shell":
                assert spec.volume_ml and spec.volume_fail_ml, (name, tissue.name)
                assert spec.min_largest_share is not None and spec.max_edge_fraction is not None, (name, tissue.name)
    assert load_profile("kidneys").qc.tissues["kidney_left"].side.value == "left"  # type: ignore[union-attr]
    assert load_profile("kidneys").qc.tissues["kidney_right"].side.value == "right"  # type: ignore[union-attr]


@pytest.mark.parametrize("profile", [*TRUNK_PROFILES, "lungs"])
def test_normal_sized_organs_pass_every_check(trunk, profile) -> None:
    tissues = TRUNK_PROFILES.get(profile, ("lung_left", "lung_right"))
    found = qc(trunk.volume, profile, {t: trunk.organs[t] for t in tissues})
    assert {f.outcome for f in found.values()} == {Outcome.PASS}, [f.as_dict() for f in found.values()]
    for tissue in tissues:
        checks = {c for c, t in found if t == tissue}
        assert {"empty", "volume_ml", "largest_component", "field_of_view"} <= checks


@pytest.mark.parametrize("profile", TRUNK_PROFILES)
def test_a_shrunken_organ_warns_and_a_speck_fails(trunk, profile) -> None:
    tissue = TRUNK_PROFILES[profile][0]
    organ = trunk.organs[tissue]
    centre = _centroid(organ)
    semi = {"liver": (80, 70, 65), "spleen": (30, 40, 45), "kidneys": (28, 30, 50), "heart": (55, 50, 60)}[profile]
    shrunk = ellipsoid(SHAPE, centre, tuple(0.6 * a for a in semi))  # 0.6^3: a fifth of the volume
    speck = organ & ellipsoid(SHAPE, _centroid(organ), (6, 6, 6))  # < 1 mL
    warned = qc(trunk.volume, profile, {**_others(trunk, profile), tissue: shrunk})["volume_ml", tissue]
    failed = qc(trunk.volume, profile, {**_others(trunk, profile), tissue: speck})["volume_ml", tissue]
    assert warned.outcome is Outcome.WARN, warned
    assert failed.outcome is Outcome.FAIL, failed


def test_kidneys_on_the_wrong_side_of_the_midline_fail(trunk) -> None:
    """Off-centre patient: the left kidney lies at x = -35 mm, left of the midline at -100 mm."""
    right = {"kidney_left": trunk.organs["kidney_left"], "kidney_right": trunk.organs["kidney_right"]}
    found = qc(trunk.volume, "kidneys", right)
    assert found["side", "kidney_left"].outcome is Outcome.PASS
    assert found["side", "kidney_left"].figure == pytest.approx(65, abs=3)  # mm left of the midline
    assert "-100" in found["side", "kidney_left"].expected
    swapped = qc(trunk.volume, "kidneys", {"kidney_left": right["kidney_right"], "kidney_right": right["kidney_left"]})
    assert swapped["side", "kidney_left"].outcome is Outcome.FAIL
    assert swapped["side", "kidney_right"].outcome is Outcome.FAIL


def test_a_missing_kidney_fails(trunk) -> None:
    found = qc(trunk.volume, "kidneys", {"kidney_left": trunk.organs["kidney_left"]})
    assert found["empty", "kidney_right"].outcome is Outcome.FAIL
    assert found["empty", "kidney_left"].outcome is Outcome.PASS
    assert worst(list(found.values())) is Outcome.FAIL


@pytest.mark.parametrize("profile", TRUNK_PROFILES)
def test_a_scattered_result_warns_on_components_and_share(trunk, profile) -> None:
    """The organ cut into two halves by a removed band of slices, and a 30 mL blob elsewhere."""
    tissue = TRUNK_PROFILES[profile][0]
    organ = trunk.organs[tissue].copy()
    ks = np.flatnonzero(organ.any(axis=(1, 2)))
    middle = ks[len(ks) // 2]
    organ[middle - 1 : middle + 2] = False
    found = qc(trunk.volume, profile, {**_others(trunk, profile), tissue: organ})
    assert found["components", tissue].outcome is (Outcome.PASS if profile == "spleen" else Outcome.WARN)
    assert found["largest_component", tissue].outcome is Outcome.WARN
    assert found["largest_component", tissue].figure < 0.6
    blob = trunk.organs[tissue] | ellipsoid(SHAPE, (MIDLINE_X, -80, 130), (20, 20, 18))
    found = qc(trunk.volume, profile, {**_others(trunk, profile), tissue: blob})
    assert found["components", tissue].figure == 2


@pytest.mark.parametrize("profile", TRUNK_PROFILES)
def test_an_organ_cut_by_the_field_of_view_warns(trunk, profile) -> None:
    """The series starts at the organ's centre: the organ touches the first slice."""
    tissue = TRUNK_PROFILES[profile][0]
    k = int(round(np.flatnonzero(trunk.organs[tissue].any(axis=(1, 2))).mean()))
    volume = Volume(trunk.volume.hu[k:], trunk.volume.spacing, _shifted(trunk.volume, k), trunk.volume.direction)
    found = qc(volume, profile, {t: m[k:] for t, m in trunk.organs.items()})
    fov = found["field_of_view", tissue]
    assert fov.outcome is Outcome.WARN and "first slice" in fov.expected, fov


def test_the_brain_of_a_whole_head_passes_and_a_four_slice_brain_does_not() -> None:
    head = head_phantom()
    found = qc(head.volume, "brain", {"brain": head.truth["brain"], "shell": head.truth["shell"]})
    assert {f.outcome for f in found.values()} == {Outcome.PASS}, [f.as_dict() for f in found.values()]
    assert 1200 < found["volume_ml", "brain"].figure < 1500  # 4/3 pi 60 x 80 x 68 mm = 1367 mL
    k = head.volume.shape[0] // 2
    cut = slice(k - 2, k + 2)
    four = Volume(head.volume.hu[cut], head.volume.spacing, _shifted(head.volume, k - 2), head.volume.direction)
    found = qc(four, "brain", {"brain": head.truth["brain"][cut], "shell": head.truth["shell"][cut]})
    assert found["volume_ml", "brain"].figure < 400
    assert found["volume_ml", "brain"].outcome is Outcome.FAIL
    assert found["field_of_view", "brain"].outcome is Outcome.WARN
    assert worst(list(found.values())) is Outcome.FAIL


def test_a_brain_with_a_detached_piece_warns() -> None:
    head = head_phantom()
    brain = head.truth["brain"].copy()
    ks = np.flatnonzero(brain.any(axis=(1, 2)))
    brain[ks[len(ks) // 3] : ks[len(ks) // 3] + 2] = False  # the top third cut off
    found = qc(head.volume, "brain", {"brain": brain, "shell": head.truth["shell"]})
    assert found["components", "brain"].outcome is Outcome.WARN
    assert found["largest_component", "brain"].outcome is Outcome.WARN


# --- real data -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def upper_abdomen() -> tuple[Volume, np.ndarray]:
    """20 slices (40 mm) of a real upper abdomen and TotalSegmentator's labels of it."""
    volume = read_ct_series(DATA / "upper_abdomen")
    return volume, _labels_on(DATA / "reference" / "example_seg_dicom.nii.gz", volume)


def test_real_liver_and_spleen_of_a_40_mm_slab_are_cut(upper_abdomen) -> None:
    """TotalSegmentator's own liver (5) and spleen (1) on a 40 mm slab: both cut by the first and
    last slice (warn) and far below a whole organ's volume."""
    volume, labels = upper_abdomen
    liver = qc(volume, "liver", {"liver": labels == 5})
    assert liver["volume_ml", "liver"].outcome is Outcome.WARN  # 699 mL of a liver
    assert liver["field_of_view", "liver"].outcome is Outcome.WARN
    assert "first slice" in liver["field_of_view", "liver"].expected and "last slice" in liver["field_of_view", "liver"].expected
    assert liver["largest_component", "liver"].outcome is Outcome.PASS
    spleen = qc(volume, "spleen", {"spleen": labels == 1})
    assert spleen["field_of_view", "spleen"].outcome is Outcome.WARN
    assert worst(list(liver.values())) is Outcome.WARN


def _centroid(mask: np.ndarray) -> tuple[float, float, float]:
    k, j, i = (axis.mean() for axis in np.nonzero(mask))
    return tuple(float((v - (n - 1) / 2) * SPACING) for v, n in ((i, SHAPE[2]), (j, SHAPE[1]), (k, SHAPE[0])))  # type: ignore[return-value]


def _others(trunk: Trunk, profile: str) -> dict[str, np.ndarray]:
    return {t: trunk.organs[t] for t in TRUNK_PROFILES[profile]}


def _shifted(volume: Volume, k: int) -> tuple[float, float, float]:
    """Origin of the volume's slice ``k`` (the first slice of a cut series)."""
    return tuple(float(v) for v in volume.affine()[:3] @ np.array([0, 0, k, 1.0]))  # type: ignore[return-value]
