"""Dice and HD95 against MONAI's metrics and against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from segnode.models.metrics import dice, hausdorff_percentile, segment_metrics, surface


def _ball(shape, centre, radius, spacing=(1.0, 1.0, 1.0)):
    grids = np.meshgrid(*(np.arange(n) * s for n, s in zip(shape, spacing)), indexing="ij")
    return sum((g - c) ** 2 for g, c in zip(grids, centre)) <= radius**2


def _blob(rng, shape):
    """An irregular blob: a smoothed random field thresholded."""
    from scipy.ndimage import gaussian_filter

    field = gaussian_filter(rng.normal(size=shape), sigma=3)
    return field > np.percentile(field, 80)


def _monai(pred, ref, spacing):
    import torch
    from monai.metrics import DiceMetric, HausdorffDistanceMetric

    p = torch.from_numpy(pred[None, None].astype(np.float32))
    r = torch.from_numpy(ref[None, None].astype(np.float32))
    dice_metric = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    hd_metric = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")
    return float(dice_metric(p, r)[0, 0]), float(hd_metric(p, r, spacing=list(spacing))[0, 0])


CASES = [
    ("balls isotropic", (1.0, 1.0, 1.0), 0),
    ("balls anisotropic", (2.5, 0.7, 0.9), 1),
    ("blobs isotropic", (1.0, 1.0, 1.0), 2),
    ("blobs anisotropic", (3.0, 0.8, 0.8), 3),
    ("blobs touching the border", (1.5, 1.0, 1.0), 4),
]


@pytest.mark.parametrize("name,spacing,seed", CASES, ids=[c[0] for c in CASES])
def test_dice_and_hd95_agree_with_monai(name, spacing, seed):
    rng = np.random.default_rng(seed)
    shape = (28, 40, 36)
    if name.startswith("balls"):
        ref = _ball(shape, (14 * spacing[0], 20 * spacing[1], 18 * spacing[2]), 9.0, spacing)
        pred = _ball(shape, (15 * spacing[0], 18 * spacing[1], 19 * spacing[2]), 8.0, spacing)
    else:
        ref = _blob(rng, shape)
        pred = ref ^ (_blob(rng, shape) & (rng.random(shape) < 0.3))
    if "border" in name:
        ref[:, :, 0] = True
    monai_dice, monai_hd = _monai(pred, ref, spacing)
    assert 0.0 < monai_dice < 1.0
    assert dice(pred, ref) == pytest.approx(monai_dice, abs=1e-6)
    assert hausdorff_percentile(pred, ref, spacing) == pytest.approx(monai_hd, rel=1e-5, abs=1e-5)


def test_cubes_offset_by_known_millimetres():
    """Two 10-voxel cubes, one shifted 3 voxels along an axis of 2 mm: HD95 = 6 mm."""
    shape = (30, 30, 30)
    ref = np.zeros(shape, bool)
    pred = np.zeros(shape, bool)
    ref[10:20, 10:20, 10:20] = True
    pred[10:20, 10:20, 13:23] = True
    spacing = (1.0, 1.0, 2.0)
    # overlap 10 x 10 x 7 of 1000 voxels each
    assert dice(pred, ref) == pytest.approx(2 * 700 / 2000)
    # the far faces are 3 voxels x 2 mm apart; more than 5 % of the surface lies there
    assert hausdorff_percentile(pred, ref, spacing) == pytest.approx(6.0)
    assert hausdorff_percentile(pred, ref, (2.0, 1.0, 1.0)) == pytest.approx(3.0)


def test_hd95_ignores_a_small_outlier_that_max_hausdorff_sees():
    shape = (40, 40, 40)
    ref = np.zeros(shape, bool)
    ref[5:25, 5:25, 5:25] = True
    pred = ref.copy()
    pred[35, 35, 35] = True  # one stray voxel ~17 voxels away
    assert hausdorff_percentile(pred, ref, (1.0, 1.0, 1.0), percentile=100) == pytest.approx(
        math.dist((35, 35, 35), (24, 24, 24))
    )
    assert hausdorff_percentile(pred, ref, (1.0, 1.0, 1.0)) == 0.0


def test_identical_masks():
    mask = _ball((20, 20, 20), (10, 10, 10), 6)
    assert dice(mask, mask) == 1.0
    assert hausdorff_percentile(mask, mask, (1.0, 2.0, 3.0)) == 0.0


def test_empty_masks_are_defined():
    empty = np.zeros((8, 8, 8), bool)
    full = empty.copy()
    full[2:5, 2:5, 2:5] = True
    both = segment_metrics(empty, empty, (1.0, 1.0, 1.0), 0.001)
    assert both.dice == 1.0 and math.isnan(both.hd95_mm) and math.isnan(both.volume_diff_pct)
    missed = segment_metrics(empty, full, (1.0, 1.0, 1.0), 0.001)
    assert missed.dice == 0.0 and missed.hd95_mm == math.inf
    assert missed.volume_diff_pct == pytest.approx(-100.0)
    assert missed.volume_diff_ml == pytest.approx(-0.027)
    extra = segment_metrics(full, empty, (1.0, 1.0, 1.0), 0.001)
    assert extra.dice == 0.0 and extra.hd95_mm == math.inf and math.isnan(extra.volume_diff_pct)


def test_surface_of_a_cube_is_its_shell():
    mask = np.zeros((7, 7, 7), bool)
    mask[1:6, 1:6, 1:6] = True
    assert int(surface(mask).sum()) == 5**3 - 3**3


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="resample first"):
        dice(np.zeros((2, 2, 2), bool), np.zeros((2, 2, 3), bool))
