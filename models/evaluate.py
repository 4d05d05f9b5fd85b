"""Compare predicted segmentations with reference ones: per case, per segment, per organ.

:func:`evaluate_case` pairs the segments of a prediction and a reference (by
name, or an explicit ``{pred: ref}`` map), moves the reference onto the
evaluation grid (the prediction's by default) and computes
:mod:`segnode.models.metrics` for each pair.  :func:`summarise` aggregates rows per
organ; :func:`write_csv` and :func:`format_table` are the outputs a reviewer
reads (pictures: :mod:`segnode.models.eval_plots`).

Voxels of the reference that fall outside the evaluation grid cannot be
compared; the case then carries a note saying so (evaluate on the reference
grid with ``on="ref"`` to count them).
"""

from __future__ import annotations

import csv
import logging
import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from pathlib import Path

import numpy as np

from segnode.errors import InputError
from segnode.models.metrics import segment_metrics
from segnode.models.segmentation_io import Grid, Segmentation, normalise_name

logger = logging.getLogger(__name__)

CSV_COLUMNS = ("case", "segment", "pred_segment", "ref_segment", "dice", "hd95_mm",
               "pred_ml", "ref_ml", "volume_diff_ml", "volume_diff_pct")


class EvalGrid(str, Enum):
    """Which grid metrics are computed on."""

    PRED = "pred"
    REF = "ref"


@dataclass(frozen=True)
class Row:
    """The metrics of one segment of one case (one CSV line)."""

    case: str
    segment: str
    pred_segment: str
    ref_segment: str
    dice: float
    hd95_mm: float
    pred_ml: float
    ref_ml: float
    volume_diff_ml: float
    volume_diff_pct: float


PairHook = Callable[[Row, np.ndarray, np.ndarray, Grid], None]


@dataclass(frozen=True)
class CaseResult:
    """All rows of one case, the grid they were computed on and what could not be compared."""

    case: str
    rows: tuple[Row, ...]
    grid: Grid
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class OrganSummary:
    """One organ over the cases (non-finite values left out of mean/median, counted apart)."""

    segment: str
    n: int
    dice_mean: float
    dice_sd: float
    dice_median: float
    hd95_median_mm: float
    hd95_infinite: int
    volume_diff_pct_mean: float


@dataclass(frozen=True)
class SegmentPair:
    pred: str
    ref: str

    @property
    def name(self) -> str:
        return self.ref


@dataclass
class Pairing:
    pairs: list[SegmentPair] = field(default_factory=list)
    pred_only: list[str] = field(default_factory=list)
    ref_only: list[str] = field(default_factory=list)


def parse_map(items: Iterable[str]) -> dict[str, str]:
    """``["liver=Liver", ...]`` (``--map pred=ref``) → ``{pred: ref}`` of normalised names."""
    out: dict[str, str] = {}
    for item in items:
        pred, sep, ref = item.partition("=")
        if not sep or not pred.strip() or not ref.strip():
            raise InputError(f"--map wants PRED=REF segment names, got {item!r}")
        out[normalise_name(pred)] = normalise_name(ref)
    return out


def pair_segments(pred: Sequence[str], ref: Sequence[str], mapping: Mapping[str, str] | None = None) -> Pairing:
    """Pair segment names: the explicit map first, then equal names; one-to-one segments pair anyway."""
    mapping = dict(mapping or {})
    for name, target in mapping.items():
        if name not in pred:
            raise InputError(f"--map names {name!r}, not a predicted segment (has: {', '.join(pred)})")
        if target not in ref:
            raise InputError(f"--map names {target!r}, not a reference segment (has: {', '.join(ref)})")
    result = Pairing()
    used_ref = set(mapping.values())
    for name in pred:
        if name in mapping:
            result.pairs.append(SegmentPair(name, mapping[name]))
        elif name in ref and name not in used_ref:
            result.pairs.append(SegmentPair(name, name))
            used_ref.add(name)
        else:
            result.pred_only.append(name)
    result.ref_only = [name for name in ref if name not in used_ref]
    if not result.pairs and len(pred) == 1 and len(ref) == 1:
        result = Pairing([SegmentPair(pred[0], ref[0])])
        logger.info("pairing the only segments %r and %r", pred[0], ref[0])
    return result


def evaluate_case(
    pred: Segmentation,
    ref: Segmentation,
    *,
    case: str = "case",
    mapping: Mapping[str, str] | None = None,
    on: EvalGrid | str = EvalGrid.PRED,
    on_pair: PairHook | None = None,
) -> CaseResult:
    """Metrics of every paired segment of one case.

    ``on_pair(row, pred_mask, ref_mask, grid)`` is called for each pair while
    its masks are at hand (to draw an overlay).

    Raises
    ------
    InputError
        If no segment of the prediction pairs with one of the reference.
    """
    pairing = pair_segments(pred.names, ref.names, mapping)
    if not pairing.pairs:
        raise InputError(
            f"no segment names in common: prediction has {', '.join(pred.names)}; reference has "
            f"{', '.join(ref.names)} (use --map PRED=REF)", where=case)
    grid = pred.grid if EvalGrid(on) is EvalGrid.PRED else ref.grid
    notes = _grid_notes(pred, ref, grid, pairing)
    pred_on, ref_on = pred.on_grid(grid), ref.on_grid(grid)
    rows = []
    for pair in pairing.pairs:
        pred_mask, ref_mask = pred_on.mask(pair.pred), ref_on.mask(pair.ref)
        m = replace(segment_metrics(pred_mask, ref_mask, grid.array_spacing, grid.voxel_ml),
                    pred_ml=grid.volume_ml(pred_mask), ref_ml=grid.volume_ml(ref_mask))  # slice by slice
        row = Row(case, pair.name, pair.pred, pair.ref, m.dice, m.hd95_mm, m.pred_ml, m.ref_ml,
                  m.volume_diff_ml, m.volume_diff_pct)
        if on_pair is not None:
            on_pair(row, pred_mask, ref_mask, grid)
        rows.append(row)
    return CaseResult(case, tuple(rows), grid, tuple(notes))


def _grid_notes(pred: Segmentation, ref: Segmentation, grid: Grid, pairing: Pairing) -> list[str]:
    notes = []
    for side, segmentation in (("prediction", pred), ("reference", ref)):
        if not segmentation.grid.same_as(grid):
            notes.append(f"{side} resampled from {segmentation.grid.describe()} onto {grid.describe()}")
    for pair in pairing.pairs:
        for side, segmentation, name in (("prediction", pred, pair.pred), ("reference", ref, pair.ref)):
            if segmentation.extends_beyond(name, grid):
                notes.append(f"{side} {name} extends beyond the evaluation grid: only the overlap is compared")
    if pairing.pred_only:
        notes.append(f"not in the reference (not scored): {', '.join(pairing.pred_only)}")
    if pairing.ref_only:
        notes.append(f"not predicted (not scored): {', '.join(pairing.ref_only)}")
    return notes


# --------------------------------------------------------------------------- aggregation and outputs


def _finite(values: Iterable[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else math.nan


def summarise(rows: Iterable[Row]) -> list[OrganSummary]:
    """One summary per segment name, in first-seen order."""
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(row.segment, []).append(row)
    out = []
    for name, group in groups.items():
        dices = [r.dice for r in group]
        hds = _finite(r.hd95_mm for r in group)
        out.append(OrganSummary(
            segment=name,
            n=len(group),
            dice_mean=_mean(dices),
            dice_sd=statistics.stdev(dices) if len(dices) > 1 else 0.0,
            dice_median=statistics.median(dices),
            hd95_median_mm=statistics.median(hds) if hds else math.nan,
            hd95_infinite=sum(1 for r in group if r.hd95_mm == math.inf),
            volume_diff_pct_mean=_mean(_finite(r.volume_diff_pct for r in group)),
        ))
    return out


def _fmt(value: float, digits: int) -> str:
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf"
    return f"{value:.{digits}f}"


def write_csv(rows: Iterable[Row], path: Path) -> Path:
    """One line per case and segment; ``nan``/``inf`` written as such."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            record = asdict(row)
            for key in ("dice", "hd95_mm", "pred_ml", "ref_ml", "volume_diff_ml", "volume_diff_pct"):
                record[key] = _fmt(record[key], 4 if key == "dice" else 3)
            writer.writerow(record)
    return path


def read_csv(path: Path) -> list[Row]:
    """Rows back from :func:`write_csv` (for reports and comparisons)."""
    try:
        with Path(path).open(newline="", encoding="utf-8") as handle:
            return [_row(record) for record in csv.DictReader(handle)]
    except (OSError, ValueError, TypeError) as exc:
        raise InputError(f"not a metrics CSV: {exc}", where=str(path)) from exc


def _row(record: Mapping[str, str]) -> Row:
    """One line of :func:`write_csv` (``ValueError`` when a column is missing, unknown or not a number)."""
    if set(record) != set(CSV_COLUMNS):
        raise ValueError(f"columns {sorted(set(record) ^ set(CSV_COLUMNS))} missing or unknown")
    return Row(case=record["case"], segment=record["segment"], pred_segment=record["pred_segment"],
               ref_segment=record["ref_segment"], dice=float(record["dice"]), hd95_mm=float(record["hd95_mm"]),
               pred_ml=float(record["pred_ml"]), ref_ml=float(record["ref_ml"]),
               volume_diff_ml=float(record["volume_diff_ml"]), volume_diff_pct=float(record["volume_diff_pct"]))


def format_table(results: Sequence[CaseResult]) -> str:
    """The per-case rows, then the per-organ summary, as fixed-width text."""
    lines = [f"{'case':24} {'segment':22} {'Dice':>7} {'HD95 mm':>9} {'pred mL':>10} {'ref mL':>10} {'dV %':>8}"]
    for result in results:
        for r in result.rows:
            lines.append(f"{r.case[:24]:24} {r.segment[:22]:22} {_fmt(r.dice, 4):>7} {_fmt(r.hd95_mm, 2):>9} "
                         f"{r.pred_ml:10.1f} {r.ref_ml:10.1f} {_fmt(r.volume_diff_pct, 1):>8}")
        lines.extend(f"  note: {note}" for note in result.notes)
    summary = summarise(r for result in results for r in result.rows)
    if len(results) > 1:
        lines.append("")
        lines.append(f"{'organ':22} {'n':>4} {'Dice mean':>10} {'± sd':>7} {'HD95 median':>12} {'HD95 inf':>9}")
        for s in summary:
            lines.append(f"{s.segment[:22]:22} {s.n:4d} {_fmt(s.dice_mean, 4):>10} {_fmt(s.dice_sd, 4):>7} "
                         f"{_fmt(s.hd95_median_mm, 2):>12} {s.hd95_infinite:9d}")
    return "\n".join(lines)



# --------------------------------------------------------------------------- many cases


@dataclass(frozen=True)
class CaseInput:
    """One case to evaluate; ``image`` (the CT) only feeds the overlay pictures."""

    case: str
    pred: Segmentation
    ref: Segmentation
    image: np.ndarray | None = None
    image_grid: Grid | None = None


@dataclass(frozen=True)
class Evaluation:
    """The results of many cases and the files written for them."""

    results: tuple[CaseResult, ...]
    files: tuple[Path, ...] = ()

    @property
    def rows(self) -> list[Row]:
        return [row for result in self.results for row in result.rows]


def evaluate_cases(
    cases: Iterable[CaseInput],
    *,
    out_dir: Path | None = None,
    mapping: Mapping[str, str] | None = None,
    on: EvalGrid | str = EvalGrid.PRED,
    pictures: bool = True,
) -> Evaluation:
    """Evaluate every case; with ``out_dir``, write ``metrics.csv``, box plots and overlays there."""
    results: list[CaseResult] = []
    files: list[Path] = []
    for item in cases:
        hook = _overlay_hook(item, out_dir / "overlays", files) if out_dir is not None and pictures else None
        result = evaluate_case(item.pred, item.ref, case=item.case, mapping=mapping, on=on, on_pair=hook)
        for note in result.notes:
            logger.info("%s: %s", item.case, note)
        results.append(result)
    evaluation = Evaluation(tuple(results))
    if out_dir is not None:
        files.append(write_csv(evaluation.rows, out_dir / "metrics.csv"))
        if pictures:
            from segnode.models.eval_plots import boxplots

            files.extend(boxplots(evaluation.rows, out_dir))
    return Evaluation(evaluation.results, tuple(files))


def _overlay_hook(item: CaseInput, folder: Path, files: list[Path]) -> PairHook:
    from segnode.models.eval_plots import overlay
    from segnode.models.segmentation_io import resample_labels

    def draw(row: Row, pred: np.ndarray, ref: np.ndarray, grid: Grid) -> None:
        image = item.image
        if image is not None and item.image_grid is not None and not item.image_grid.same_as(grid):
            image = resample_labels(image, item.image_grid, grid)
        title = f"{row.case} {row.segment}: Dice {_fmt(row.dice, 3)}, HD95 {_fmt(row.hd95_mm, 1)} mm"
        files.append(overlay(folder / f"{_safe(row.case)}_{_safe(row.segment)}.png", pred, ref, grid,
                             image=image, title=title))

    return draw


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:80]
