"""Quality checks of a segmentation result, driven by the profile's ``qc:`` section.

Pure functions of the volume, the label map and the profile: no I/O.  Each check
gives a :class:`Finding` with an outcome (pass / warn / fail), the measured figure
and what was expected, so a reviewer sees why a job was held.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any

import numpy as np
from scipy import ndimage

from segnode.models.measurements import label_volumes_ml, mask_volume_ml
from segnode.models.volume import LabelMap, Volume
from segnode.profiles.schema import Profile, Side, TissueQC


class Outcome(str, Enum):
    PASS = "pass"
    WARN = "warn"
    FAIL = "fail"


_RANK = {Outcome.PASS: 0, Outcome.WARN: 1, Outcome.FAIL: 2}


@dataclass(frozen=True)
class Finding:
    check: str
    tissue: str
    outcome: Outcome
    figure: float | None
    expected: str

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "outcome": self.outcome.value}


def worst(findings: list[Finding] | list[dict[str, Any]]) -> Outcome:
    """The overall outcome: the worst of all findings (pass when there are none)."""
    outcomes = [Outcome(f["outcome"] if isinstance(f, dict) else f.outcome) for f in findings]
    return max(outcomes, key=_RANK.__getitem__, default=Outcome.PASS)


def run_qc(volume: Volume, labels: LabelMap, profile: Profile, other: LabelMap | None = None) -> list[Finding]:
    """All checks of ``profile.qc`` on ``labels``; ``other``: a second backend's result to agree with."""
    findings: list[Finding] = []
    for value, name in sorted(labels.labels.items()):
        spec = profile.qc.tissues.get(name, TissueQC())
        findings += check_tissue(volume, labels.array == value, name, spec)
    if other is not None and profile.qc.min_agreement_dice is not None:
        findings += check_agreement(labels, other, profile.qc.min_agreement_dice)
    return findings


def check_tissue(volume: Volume, mask: np.ndarray, name: str, spec: TissueQC) -> list[Finding]:
    voxels = int(mask.sum())
    if not voxels:
        outcome = Outcome.PASS if spec.allow_empty else Outcome.FAIL
        return [Finding("empty", name, outcome, 0.0, "allowed" if spec.allow_empty else "not empty")]
    found = [Finding("empty", name, Outcome.PASS, float(voxels), "not empty")]
    if spec.volume_ml or spec.volume_fail_ml:
        found.append(check_volume(mask_volume_ml(volume, mask), name, spec))
    if spec.side is not None:
        found.append(check_side(volume, mask, name, spec.side))
    if spec.max_components is not None or spec.min_largest_share is not None:
        found += check_components(volume, mask, name, spec)
    if spec.max_edge_fraction is not None:
        found.append(check_edges(mask, name, spec.max_edge_fraction))
    return found


def check_volume(ml: float, name: str, spec: TissueQC) -> Finding:
    outcome = Outcome.PASS
    if spec.volume_ml and not spec.volume_ml[0] <= ml <= spec.volume_ml[1]:
        outcome = Outcome.WARN
    if spec.volume_fail_ml and not spec.volume_fail_ml[0] <= ml <= spec.volume_fail_ml[1]:
        outcome = Outcome.FAIL
    parts = [f"{_span(spec.volume_ml)} mL"] if spec.volume_ml else []
    parts += [f"fail outside {_span(spec.volume_fail_ml)} mL"] if spec.volume_fail_ml else []
    return Finding("volume_ml", name, outcome, round(ml, 1), "; ".join(parts))


#: Above this HU a voxel is part of the patient (for the midline), as in hu_regions.BODY_HU.
BODY_HU = -500.0
#: The midline is measured on at most this many of the organ's slices, every other row and column.
MIDLINE_SLICES = 16

_FACES = ("first slice", "last slice", "first row", "last row", "first column", "last column")


def check_side(volume: Volume, mask: np.ndarray, name: str, side: Side) -> Finding:
    """Centroid's patient x (LPS: + is the patient's left) against the body's midline.

    The midline is the median patient x of the body (``HU > BODY_HU``) on the
    organ's slices, so a patient lying off the table centre is judged correctly.
    The figure is the centroid's distance from the midline in mm (+: left).
    """
    k, j, i = (axis.mean() for axis in np.nonzero(mask))
    x = float((volume.affine() @ np.array([i, j, k, 1.0]))[0])
    midline = body_midline_x(volume, mask)
    offset = x - midline
    ok = offset > 0 if side is Side.LEFT else offset < 0
    sign = ">" if side is Side.LEFT else "<"
    expected = f"centroid {sign} midline x {midline:.1f} mm ({side.value})"
    return Finding("side", name, Outcome.PASS if ok else Outcome.FAIL, round(offset, 1), expected)


def body_midline_x(volume: Volume, mask: np.ndarray) -> float:
    """Median patient x of the body voxels on (up to :data:`MIDLINE_SLICES` of) the organ's slices."""
    slices = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))
    slices = slices[np.linspace(0, len(slices) - 1, min(len(slices), MIDLINE_SLICES)).astype(int)]
    ks, js, is_ = np.nonzero(volume.hu[slices, ::2, ::2] > BODY_HU)
    if not len(ks):
        return 0.0
    a = volume.affine()
    xs = a[0, 0] * (2 * is_) + a[0, 1] * (2 * js) + a[0, 2] * slices[ks] + a[0, 3]
    return float(np.median(xs))


def check_components(volume: Volume, mask: np.ndarray, name: str, spec: TissueQC) -> list[Finding]:
    """Connected components (faces touching), measured slice by slice: how many of at least
    ``min_component_ml`` (``max_components``), and the largest one's share of the tissue
    (``min_largest_share``)."""
    components, n = ndimage.label(mask)
    sizes_ml = label_volumes_ml(volume, components, n + 1)[1][1:]
    found = []
    if spec.max_components is not None:
        count = int((sizes_ml >= spec.min_component_ml).sum())
        outcome = Outcome.PASS if count <= spec.max_components else Outcome.WARN
        expected = f"<= {spec.max_components} of >= {spec.min_component_ml:g} mL"
        found.append(Finding("components", name, outcome, float(count), expected))
    if spec.min_largest_share is not None:
        share = float(sizes_ml.max() / sizes_ml.sum()) if sizes_ml.sum() > 0 else 0.0
        outcome = Outcome.PASS if share >= spec.min_largest_share else Outcome.WARN
        found.append(Finding("largest_component", name, outcome, round(share, 4), f">= {spec.min_largest_share:g} of the volume"))
    return found


def check_edges(mask: np.ndarray, name: str, limit: float) -> Finding:
    """Share of the tissue's voxels on the six faces of the volume: an organ cut by the field
    of view (first or last slice, image edge).  ``limit`` 0: any voxel on a face warns."""
    faces = (mask[0], mask[-1], mask[:, 0], mask[:, -1], mask[:, :, 0], mask[:, :, -1])
    counts = [int(face.sum()) for face in faces]
    touched = [face for face, count in zip(_FACES, counts) if count]
    total = int(mask.sum())
    fraction = (total - int(mask[1:-1, 1:-1, 1:-1].sum())) / total
    outcome = Outcome.PASS if fraction <= limit else Outcome.WARN
    expected = f"<= {limit:g} of voxels on the volume's faces; touches: {', '.join(touched) or 'none'}"
    return Finding("field_of_view", name, outcome, round(fraction, 4), expected)


def check_agreement(labels: LabelMap, other: LabelMap, minimum: float) -> list[Finding]:
    found = []
    for value, name in sorted(labels.labels.items()):
        theirs = [v for v, n in other.labels.items() if n == name]
        if not theirs:
            continue
        a, b = labels.array == value, other.array == theirs[0]
        total = int(a.sum()) + int(b.sum())
        score = 2.0 * int((a & b).sum()) / total if total else 1.0
        outcome = Outcome.PASS if score >= minimum else Outcome.WARN
        found.append(Finding("agreement_dice", name, outcome, round(score, 3), f">= {minimum:g} vs {other.backend}"))
    return found


def _span(r: tuple[float, float] | None) -> str:
    return f"{r[0]:g}-{r[1]:g}" if r else ""
