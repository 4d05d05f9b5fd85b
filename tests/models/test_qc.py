"""QC checks (models/qc.py) on the real cases in tests/data and on deliberately broken results."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError
from segnode.models.base import RunSettings
from segnode.models.hu_based import BACKEND
from segnode.models.qc import Outcome, run_qc, worst
from segnode.models.series import load_series
from segnode.models.volume import LabelMap
from segnode.profiles.loader import load_profile
from segnode.profiles.schema import ProfileQC, TissueQC

from tests.paths import DATA
from tests.phantoms import read_ct_series


@pytest.fixture(scope="module")
def cta():
    return load_series(DATA / "thorax_cta")


@pytest.fixture(scope="module")
def cta_lungs(cta):
    return BACKEND.load(load_profile("lungs"), RunSettings()).segment(cta)


def by_check(findings) -> dict[tuple[str, str], object]:
    return {(f.check, f.tissue): f for f in findings}


def test_real_cta_lungs_pass_every_check(cta, cta_lungs) -> None:
    findings = by_check(run_qc(cta, cta_lungs, load_profile("lungs")))
    assert {f.outcome for f in findings.values()} == {Outcome.PASS}
    assert findings["volume_ml", "lung_left"].figure == pytest.approx(1484.4, abs=30)  # measured 1484.4 mL
    assert findings["side", "lung_left"].figure > 0 > findings["side", "lung_right"].figure  # 67.3 / -45.8 mm
    assert findings["components", "lung_right"].figure == 1


@pytest.mark.parametrize("case", ["thorax_cta", "upper_abdomen"])
def test_real_bone_passes(case) -> None:
    volume = load_series(DATA / case) if case == "thorax_cta" else read_ct_series(DATA / case)
    profile = load_profile("bone")
    findings = run_qc(volume, BACKEND.load(profile, RunSettings()).segment(volume), profile)
    assert worst(findings) is Outcome.PASS, [f.as_dict() for f in findings]  # 686.3 / 173.7 mL


def test_lungs_of_an_abdominal_scan_fail_volume_and_warn_cut(cta) -> None:
    """upper_abdomen holds only the lung bases (13 and 17 mL), cut by the top slice."""
    volume = read_ct_series(DATA / "upper_abdomen")
    profile = load_profile("lungs")
    findings = by_check(run_qc(volume, BACKEND.load(profile, RunSettings()).segment(volume), profile))
    assert findings["volume_ml", "lung_left"].outcome is Outcome.FAIL
    assert findings["field_of_view", "lung_left"].outcome is Outcome.WARN  # 0.144 of voxels on a face


def test_swapped_left_and_right_fail_the_side_check(cta, cta_lungs) -> None:
    swapped = LabelMap(np.choose(cta_lungs.array, [0, 2, 1]).astype(np.uint8), cta_lungs.labels, "broken")
    findings = by_check(run_qc(cta, swapped, load_profile("lungs")))
    assert findings["side", "lung_left"].outcome is Outcome.FAIL
    assert findings["side", "lung_right"].outcome is Outcome.FAIL
    assert worst(list(findings.values())) is Outcome.FAIL


def test_an_empty_organ_fails(cta, cta_lungs) -> None:
    emptied = LabelMap(np.where(cta_lungs.array == 1, 0, cta_lungs.array).astype(np.uint8), cta_lungs.labels, "broken")
    findings = by_check(run_qc(cta, emptied, load_profile("lungs")))
    assert findings["empty", "lung_left"].outcome is Outcome.FAIL
    assert findings["empty", "lung_right"].outcome is Outcome.PASS


def test_a_halved_volume_leaves_its_range(cta, cta_lungs) -> None:
    halved = cta_lungs.array.copy()
    left = np.argwhere(halved == 1)
    drop = left[: len(left) // 2]  # the cranial half (lowest slice index first)
    halved[tuple(drop.T)] = 0
    findings = by_check(run_qc(cta, LabelMap(halved, cta_lungs.labels, "broken"), load_profile("lungs")))
    assert findings["volume_ml", "lung_left"].outcome is Outcome.WARN  # 742 mL, expected 1000-4500
    assert findings["volume_ml", "lung_right"].outcome is Outcome.PASS
    # and a tenth is implausible: fail
    tenth = halved.copy()
    tenth[tuple(left[: 9 * len(left) // 10].T)] = 0
    findings = by_check(run_qc(cta, LabelMap(tenth, cta_lungs.labels, "broken"), load_profile("lungs")))
    assert findings["volume_ml", "lung_left"].outcome is Outcome.FAIL


def test_agreement_between_backends(cta, cta_lungs) -> None:
    profile = load_profile("lungs")
    same = by_check(run_qc(cta, cta_lungs, profile, other=cta_lungs))
    assert same["agreement_dice", "lung_left"].figure == 1.0
    swapped = LabelMap(np.choose(cta_lungs.array, [0, 2, 1]).astype(np.uint8), cta_lungs.labels, "other")
    found = by_check(run_qc(cta, cta_lungs, profile, other=swapped))
    assert found["agreement_dice", "lung_left"].outcome is Outcome.WARN
    assert found["agreement_dice", "lung_left"].figure == 0.0


def test_too_many_components_warn(cta, cta_lungs) -> None:
    """The left lung cut into three slabs by two removed bands of slices."""
    broken = cta_lungs.array.copy()
    ks = np.unique(np.nonzero(broken == 1)[0])
    for k in (ks[len(ks) // 3], ks[2 * len(ks) // 3]):
        band = broken[k - 2 : k + 2]
        band[band == 1] = 0
    found = by_check(run_qc(cta, LabelMap(broken, cta_lungs.labels, "broken"), load_profile("lungs")))
    assert found["components", "lung_left"].outcome is Outcome.WARN
    assert found["components", "lung_left"].figure == 3
    assert found["components", "lung_right"].outcome is Outcome.PASS


def test_qc_section_is_validated() -> None:
    with pytest.raises(ValidationError, match="inside volume_fail_ml"):
        TissueQC(volume_ml=[100, 500], volume_fail_ml=[200, 400])
    with pytest.raises(ValidationError, match="low < high"):
        TissueQC(volume_ml=[500, 100])
    with pytest.raises(ValidationError, match="extra"):
        TissueQC(volume=[1, 2])
    profile = load_profile("lungs")
    with pytest.raises(ValidationError, match="does not have"):
        profile.model_validate({**profile.model_dump(), "qc": ProfileQC(tissues={"liver": TissueQC()}).model_dump()})


def test_cross_check_backend_runs_and_its_disagreement_warns(cta, cta_lungs) -> None:
    """``qc.cross_check``: a second backend runs on every result; swapped lungs there → agreement warns."""
    from segnode.errors import BackendError
    from segnode.node.jobs.pipeline import quality_checks

    base = load_profile("lungs")
    profile = base.model_validate({**base.model_dump(), "qc": {**base.qc.model_dump(), "cross_check": "hu_based"}})
    primary = LabelMap(cta_lungs.array, cta_lungs.labels, "totalsegmentator")  # as if the model made it
    swapped = LabelMap(np.choose(cta_lungs.array, [0, 2, 1]).astype(np.uint8), cta_lungs.labels, "hu_based")
    calls: list[str] = []

    class Source:
        def __init__(self, result):
            self.result = result

        def get(self, backend, profile, settings):
            calls.append(backend)
            return self

        def segment(self, volume):
            if isinstance(self.result, Exception):
                raise self.result
            return self.result

    agree = by_check(quality_checks(cta, primary, profile, RunSettings(), Source(cta_lungs)))
    assert calls == ["hu_based"] and agree["agreement_dice", "lung_left"].outcome is Outcome.PASS
    disagree = by_check(quality_checks(cta, primary, profile, RunSettings(), Source(swapped)))
    assert disagree["agreement_dice", "lung_right"].outcome is Outcome.WARN
    assert disagree["agreement_dice", "lung_right"].figure == 0.0
    failed = by_check(quality_checks(cta, primary, profile, RunSettings(), Source(BackendError("no weights"))))
    assert failed["agreement_dice", "*"].outcome is Outcome.WARN and "no weights" in failed["agreement_dice", "*"].expected
    calls.clear()  # the cross-check backend made the result itself: nothing to compare, not run again
    quality_checks(cta, swapped, profile, RunSettings(), Source(cta_lungs))
    assert calls == []
    with pytest.raises(ValidationError, match="needs qc.min_agreement_dice"):
        ProfileQC(cross_check="hu_based")
