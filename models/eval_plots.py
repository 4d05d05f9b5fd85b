"""Pictures of an evaluation: box plots per organ and mid-slice overlays.

matplotlib is imported only here and only when a picture is drawn (Agg
backend: no display needed).  Overlays show the reference contour in green
and the predicted one in red on the CT (soft-tissue window) when the image is
given, on black otherwise, in the three planes through the centre of the
segment.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import ModuleType

import numpy as np

from segnode.errors import DependencyMissingError
from segnode.models.evaluate import Row
from segnode.models.segmentation_io import Grid

#: soft-tissue window (centre, width) in HU
WINDOW = (40.0, 400.0)
REF_COLOUR = "#00d000"
PRED_COLOUR = "#ff2020"


def _pyplot() -> ModuleType:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise DependencyMissingError("matplotlib is needed for the pictures (pip install matplotlib)") from exc
    return plt


def boxplots(rows: Sequence[Row], out_dir: Path) -> list[Path]:
    """``boxplot_dice.png`` and ``boxplot_hd95.png``: one box per organ over the cases."""
    plt = _pyplot()
    names = list(dict.fromkeys(r.segment for r in rows))
    paths = []
    for metric, label in (("dice", "Dice"), ("hd95_mm", "HD95 (mm)")):
        values = [[getattr(r, metric) for r in rows if r.segment == n] for n in names]
        finite = [[v for v in group if math.isfinite(v)] for group in values]
        fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(names) + 2), 4.0))
        ax.boxplot(finite, showmeans=True)
        ax.set_xticks(range(1, len(names) + 1), [_tick(n, g) for n, g in zip(names, values)],
                      rotation=30 if len(names) > 4 else 0, ha="right" if len(names) > 4 else "center")
        ax.set_ylabel(label)
        if metric == "dice":
            ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{label} per organ ({len({r.case for r in rows})} cases)")
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"boxplot_{metric.split('_')[0]}.png"
        out_dir.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def _tick(name: str, values: Iterable[float]) -> str:
    infinite = sum(1 for v in values if v == math.inf)
    return f"{name}\n({infinite} missed)" if infinite else name


def _centre(pred: np.ndarray, ref: np.ndarray) -> tuple[int, int, int]:
    union = pred | ref
    if not union.any():
        k, j, i = union.shape
        return k // 2, j // 2, i // 2
    k, j, i = (int(round(float(c))) for c in np.argwhere(union).mean(axis=0))
    return k, j, i


def overlay(
    path: Path, pred: np.ndarray, ref: np.ndarray, grid: Grid, *, image: np.ndarray | None = None, title: str = ""
) -> Path:
    """Axial, coronal and sagittal slices through the segment's centre with both contours."""
    plt = _pyplot()
    k, j, i = _centre(pred, ref)
    sk, sj, si = grid.array_spacing
    planes: list[tuple[str, tuple[int | slice, ...], float, float]] = [  # (label, slicer, row spacing, column spacing)
        (f"axial k={k}", (k, slice(None), slice(None)), sj, si),
        (f"coronal j={j}", (slice(None, None, -1), j, slice(None)), sk, si),
        (f"sagittal i={i}", (slice(None, None, -1), slice(None), i), sk, sj),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    low, high = WINDOW[0] - WINDOW[1] / 2, WINDOW[0] + WINDOW[1] / 2
    for ax, (label, slicer, row_mm, col_mm) in zip(axes, planes):
        background = image[slicer] if image is not None else np.zeros(ref[slicer].shape)
        ax.imshow(background, cmap="gray", vmin=low, vmax=high, aspect=row_mm / col_mm, interpolation="nearest")
        for mask, colour in ((ref[slicer], REF_COLOUR), (pred[slicer], PRED_COLOUR)):
            if mask.any():
                ax.contour(mask.astype(float), levels=[0.5], colors=colour, linewidths=1.2)
        ax.set_title(label, fontsize=9)
        ax.axis("off")
    fig.suptitle(f"{title}   reference: green, prediction: red", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
