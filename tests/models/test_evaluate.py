"""``segnode evaluate`` on real label maps and SEGs: grids, resampling, pairing, outputs."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from segnode.errors import InputError
from segnode.models.evaluate import (
    evaluate_case,
    pair_segments,
    parse_map,
    read_csv,
    summarise,
    write_csv,
)
from segnode.models.metrics import dice, hausdorff_percentile
from segnode.models.segmentation_io import LPS_TO_RAS, Grid, read_segmentation
from segnode.models.series import load_series
from segnode.node.cli.main import main

from tests.paths import DATA

LABELS = DATA / "thorax_cta_labels"
LIVER = DATA / "liver_3slice"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _save(array: np.ndarray, grid: Grid, path: Path) -> Path:
    nib.save(nib.Nifti1Image(np.ascontiguousarray(array.transpose(2, 1, 0)).astype(np.uint8),
                             LPS_TO_RAS @ grid.affine), path)
    return path


def _coarse_grid(grid: Grid, factor: float) -> Grid:
    """The same field of view with ``factor`` times the spacing, origin moved off the voxel centres."""
    affine = grid.affine.copy()
    affine[:3, :3] *= factor
    affine[:3, 3] += affine[:3, :3] @ np.array([0.3, 0.3, 0.3])
    shape = tuple(int(n // factor) for n in grid.shape)
    return Grid(shape, affine)  # type: ignore[arg-type]


def _nearest_by_hand(mask: np.ndarray, source: Grid, target: Grid) -> np.ndarray:
    """Nearest-neighbour resampling written out with numpy (independent of SimpleITK)."""
    k, j, i = np.meshgrid(*(np.arange(n) for n in target.shape), indexing="ij")
    ijk = np.stack([i.ravel(), j.ravel(), k.ravel(), np.ones(i.size)])
    src = np.rint((np.linalg.inv(source.affine) @ target.affine @ ijk)[:3]).astype(int)
    inside = np.all((src >= 0) & (src < np.array(source.shape[::-1])[:, None]), axis=0)
    out = np.zeros(i.size, bool)
    out[inside] = mask[src[2, inside], src[1, inside], src[0, inside]]
    return out.reshape(target.shape)


def test_reference_on_a_larger_grid_is_placed_in_patient_space(tmp_path):
    """TotalSegmentator's heart (233x167x191 grid) against a copy on the CT's grid: identical."""
    heart = read_segmentation(LABELS / "heart.nii.gz")
    ct_grid = read_segmentation(LABELS / "aorta.nii.gz").grid
    assert not heart.grid.same_as(ct_grid)
    # the CT grid is the heart grid shifted by whole voxels (72, 13, 0): crop by hand
    cropped = heart.mask("heart")[0:164, 13:139, 72:192]
    pred = read_segmentation(_save(cropped, ct_grid, tmp_path / "heart.nii.gz"))
    result = evaluate_case(pred, heart)
    (row,) = result.rows
    assert row.dice == 1.0 and row.hd95_mm == 0.0
    assert row.ref_ml == pytest.approx(198176 * 1.5**3 / 1000)
    assert any("reference resampled" in note for note in result.notes)


def test_coarser_prediction_matches_an_independent_resampling(tmp_path):
    """A 2.25 mm copy of the heart vs the 1.5 mm original, checked against numpy + MONAI."""
    import torch
    from monai.metrics import HausdorffDistanceMetric

    heart = read_segmentation(LABELS / "heart.nii.gz")
    coarse = _coarse_grid(heart.grid, 1.5)
    by_hand = _nearest_by_hand(heart.mask("heart"), heart.grid, coarse)
    # the prediction: the coarse copy, eroded a little so the scores are not perfect
    from scipy.ndimage import binary_erosion

    pred_mask = binary_erosion(by_hand, iterations=1)
    pred = read_segmentation(_save(pred_mask, coarse, tmp_path / "pred_heart.nii.gz"))
    (row,) = evaluate_case(pred, heart).rows
    assert row.segment == "heart"
    assert row.dice == pytest.approx(dice(pred_mask, by_hand), abs=1e-9)
    assert 0.8 < row.dice < 1.0
    hd = HausdorffDistanceMetric(include_background=True, percentile=95)(
        torch.from_numpy(pred_mask[None, None].astype(np.float32)),
        torch.from_numpy(by_hand[None, None].astype(np.float32)), spacing=list(coarse.array_spacing))
    assert row.hd95_mm == pytest.approx(float(hd[0, 0]), rel=1e-5)
    assert row.hd95_mm == pytest.approx(hausdorff_percentile(pred_mask, by_hand, coarse.array_spacing))


def test_grid_choice_ref_computes_on_the_reference_grid(tmp_path):
    heart = read_segmentation(LABELS / "heart.nii.gz")
    coarse = _coarse_grid(heart.grid, 2.0)
    pred = read_segmentation(_save(_nearest_by_hand(heart.mask("heart"), heart.grid, coarse), coarse,
                                   tmp_path / "heart.nii.gz"))
    on_pred = evaluate_case(pred, heart, on="pred")
    on_ref = evaluate_case(pred, heart, on="ref")
    assert on_pred.grid.same_as(coarse) and on_ref.grid.same_as(heart.grid)
    assert on_pred.rows[0].dice == 1.0  # the prediction is the reference sampled on its grid
    assert 0.85 < on_ref.rows[0].dice < 1.0  # the 3 mm blocks do not follow the 1.5 mm outline


def test_segment_outside_the_evaluation_grid_is_noted(tmp_path):
    aorta = read_segmentation(LABELS / "aorta.nii.gz")
    grid = aorta.grid
    half = Grid((grid.shape[0] // 2, grid.shape[1], grid.shape[2]), grid.affine)  # lower half of the slices
    pred_mask = aorta.mask("aorta")[: half.shape[0]]
    pred = read_segmentation(_save(pred_mask, half, tmp_path / "aorta.nii.gz"))
    result = evaluate_case(pred, aorta)
    assert result.rows[0].dice == 1.0
    assert any("reference aorta extends beyond the evaluation grid" in n for n in result.notes)


def test_empty_segments_both_sides():
    folder = read_segmentation(LABELS)  # TotalSegmentator's one-mask-per-structure layout
    assert set(folder.names) == {"aorta", "heart", "iliac_artery_left", "vertebrae_t12"}
    result = evaluate_case(folder, folder)
    by_name = {row.segment: row for row in result.rows}
    empty = by_name["iliac_artery_left"]
    assert empty.dice == 1.0 and math.isnan(empty.hd95_mm) and empty.ref_ml == 0.0
    assert by_name["vertebrae_t12"].dice == 1.0


def test_missing_organ_scores_zero_and_infinite_hd(tmp_path):
    aorta = read_segmentation(LABELS / "aorta.nii.gz")
    empty = read_segmentation(_save(np.zeros(aorta.grid.shape, bool), aorta.grid, tmp_path / "aorta.nii.gz"))
    (row,) = evaluate_case(empty, aorta).rows
    assert row.dice == 0.0 and row.hd95_mm == math.inf and row.volume_diff_pct == pytest.approx(-100.0)


def _liver_seg_on_source_as_nifti(tmp_path) -> tuple[Path, np.ndarray, Grid]:
    source = load_series(LIVER)
    seg = read_segmentation(LIVER / "liver_seg_dcmqi.dcm", source=source)
    mask = seg.mask("liver")
    return _save(mask, seg.grid, tmp_path / "liver.nii.gz"), mask, seg.grid


def test_dcmqi_seg_against_itself_through_nifti(tmp_path):
    nifti, mask, grid = _liver_seg_on_source_as_nifti(tmp_path)
    assert mask.sum() == 107098
    ref = read_segmentation(nifti)
    # placed by the source images, and by highdicom's volume from the frame positions alone
    for pred in (read_segmentation(LIVER / "liver_seg_dcmqi.dcm", source=load_series(LIVER)),
                 read_segmentation(LIVER / "liver_seg_dcmqi.dcm")):
        (row,) = evaluate_case(pred, ref).rows
        assert (row.segment, row.dice, row.hd95_mm) == ("liver", 1.0, 0.0)
        assert row.pred_ml == pytest.approx(row.ref_ml)


def test_seg_against_a_dilated_nifti(tmp_path):
    from scipy.ndimage import binary_dilation

    _, mask, grid = _liver_seg_on_source_as_nifti(tmp_path)
    dilated = binary_dilation(mask, structure=np.ones((1, 3, 3), bool), iterations=2)
    ref = read_segmentation(_save(dilated, grid, tmp_path / "liver_big.nii.gz"))
    (row,) = evaluate_case(read_segmentation(LIVER / "liver_seg_dcmqi.dcm"), ref, mapping={"liver": "liver_big"}).rows
    assert row.dice == pytest.approx(dice(mask, dilated))
    assert row.hd95_mm == pytest.approx(hausdorff_percentile(mask, dilated, grid.array_spacing))
    assert row.volume_diff_ml < 0


def test_pairing_rules():
    pairing = pair_segments(["liver", "spleen", "extra"], ["spleen", "liver", "kidney"])
    assert [(p.pred, p.ref) for p in pairing.pairs] == [("liver", "liver"), ("spleen", "spleen")]
    assert pairing.pred_only == ["extra"] and pairing.ref_only == ["kidney"]
    one = pair_segments(["label_1"], ["heart"])  # one segment each: paired anyway
    assert [(p.pred, p.ref) for p in one.pairs] == [("label_1", "heart")]
    mapped = pair_segments(["a", "b"], ["x", "b"], parse_map(["A=X"]))
    assert [(p.pred, p.ref) for p in mapped.pairs] == [("a", "x"), ("b", "b")]
    with pytest.raises(InputError, match="not a predicted segment"):
        pair_segments(["a"], ["b"], {"z": "b"})
    with pytest.raises(InputError, match="PRED=REF"):
        parse_map(["liver"])


def test_no_common_segments_is_an_input_error():
    aorta = read_segmentation(LABELS / "aorta.nii.gz")
    with pytest.raises(InputError, match="no segment names in common"):
        evaluate_case(read_segmentation(LABELS), _two_label(aorta))


def _two_label(aorta):
    from segnode.models.segmentation_io import labelmap_segmentation

    array = aorta.mask("aorta").astype(np.uint8)
    return labelmap_segmentation(array, {1: "foo", 2: "bar"}, aorta.grid, "two labels")


def test_csv_round_trip_and_summary(tmp_path):
    folder = read_segmentation(LABELS)
    rows = list(evaluate_case(folder, folder, case="a").rows) + list(evaluate_case(folder, folder, case="b").rows)
    back = read_csv(write_csv(rows, tmp_path / "m.csv"))
    assert [r.segment for r in back] == [r.segment for r in rows]
    assert math.isnan(next(r for r in back if r.segment == "iliac_artery_left").hd95_mm)
    summary = {s.segment: s for s in summarise(back)}
    assert summary["aorta"].n == 2 and summary["aorta"].dice_mean == 1.0
    assert math.isnan(summary["iliac_artery_left"].hd95_median_mm)


# --------------------------------------------------------------------------- CLI


def test_cli_one_case_writes_table_csv_and_pictures(tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(["evaluate", "--pred", str(LABELS / "aorta.nii.gz"), "--ref", str(LABELS),
                 "--source", str(DATA / "thorax_cta"), "-o", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "aorta" in text and "1.0000" in text and "not predicted (not scored): heart" in text
    with (out / "metrics.csv").open() as handle:
        (record,) = list(csv.DictReader(handle))
    assert record["segment"] == "aorta" and float(record["dice"]) == 1.0
    for picture in (out / "boxplot_dice.png", out / "boxplot_hd95.png", out / "overlays" / "aorta_aorta.png"):
        data = picture.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000


def test_cli_folders_pair_cases_by_name_with_dataset_json_labels(tmp_path, capsys):
    aorta = read_segmentation(LABELS / "aorta.nii.gz")
    grid = aorta.grid
    labels = aorta.mask("aorta").astype(np.uint8) + 2 * read_segmentation(LABELS / "vertebrae_T12.nii.gz").mask(
        "vertebrae_t12")
    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "labelsTs"
    for folder in (pred_dir, ref_dir):
        folder.mkdir()
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "aorta": 1, "vertebrae_T12": 2}}))
    _save(labels, grid, ref_dir / "case_001.nii.gz")
    _save(labels, grid, ref_dir / "case_002.nii.gz")
    _save(np.where(labels == 2, 0, labels), grid, pred_dir / "case_001.nii.gz")  # vertebra missed
    _save(labels, grid, pred_dir / "case_002.nii.gz")
    code = main(["evaluate", "--pred-dir", str(pred_dir), "--ref-dir", str(ref_dir),
                 "--pred-labels", str(tmp_path / "dataset.json"), "-o", str(tmp_path / "out"), "--no-pictures"])
    assert code == 0
    text = capsys.readouterr().out
    assert "vertebrae_t12" in text and "inf" in text
    rows = read_csv(tmp_path / "out" / "metrics.csv")
    assert [(r.case, r.segment, r.dice) for r in rows] == [
        ("case_001", "aorta", 1.0), ("case_001", "vertebrae_t12", 0.0),
        ("case_002", "aorta", 1.0), ("case_002", "vertebrae_t12", 1.0)]
    assert not list((tmp_path / "out").glob("*.png"))


def test_cli_bad_input_exits_3_naming_the_file(tmp_path, capsys):
    bogus = tmp_path / "not_a_seg.dcm"
    bogus.write_bytes(b"nothing here")
    code = main(["evaluate", "--pred", str(bogus), "--ref", str(LABELS / "aorta.nii.gz")])
    assert code == 3
    assert str(bogus) in capsys.readouterr().err
    assert main(["evaluate", "--pred", str(LABELS / "aorta.nii.gz")]) == 2
