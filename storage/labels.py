"""Label maps for the dataset store: SEG → label array on the source grid, and label tables.

A dataset keeps one label table (value → tissue name) so that every case's
label map uses the same numbers; labels arriving by SEG, NIfTI or an import
are translated into it by tissue name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from segnode.errors import InputError


def tissue_name(label: str) -> str:
    """Normalise a segment label to a tissue name (``"Left Kidney"`` → ``left_kidney``)."""
    name = re.sub(r"[^a-z0-9]+", "_", label.strip().lower()).strip("_")
    if not name:
        raise InputError(f"segment label {label!r} gives no tissue name")
    return name if name[0].isalpha() else "t_" + name


def seg_to_labels(seg_ds: Dataset, instance_uids: Sequence[str]) -> tuple[np.ndarray, dict[int, str]]:
    """Paint the segments of a SEG onto the source slices ``instance_uids`` (volume order).

    Returns the ``[k, j, i]`` array of segment numbers and segment number → tissue name.
    Where segments overlap, the higher segment number wins.
    """
    try:
        seg = hd.seg.Segmentation.from_dataset(seg_ds, copy=False)
        names = {int(d.SegmentNumber): tissue_name(str(d.SegmentLabel)) for d in seg.SegmentSequence}
        array = seg.get_pixels_by_source_instance(
            list(instance_uids),
            combine_segments=True,
            relabel=False,
            assert_missing_frames_are_empty=True,
            skip_overlap_checks=True,
            dtype=np.uint8,
        )
    except (ValueError, KeyError, AttributeError, IndexError, TypeError) as exc:
        raise InputError(f"SEG cannot be mapped onto its source series: {exc}", where="SEG") from exc
    return np.asarray(array, dtype=np.uint8), names


def translate(array: np.ndarray, names: Mapping[int, str], table: dict[int, str]) -> np.ndarray:
    """Renumber ``array`` (value → ``names``) into ``table`` (extended in place for new tissues)."""
    by_name = {name: value for value, name in table.items()}
    for value in sorted(names):  # new tissues get the next free values, in source order
        if names[value] not in by_name:
            by_name[names[value]] = max(table, default=0) + 1
            table[by_name[names[value]]] = names[value]
    present = {int(v) for v in np.unique(array)} - {0}
    if unnamed := sorted(present - set(names)):
        raise InputError(f"label values {unnamed} have no tissue name (give a label mapping)")
    out = np.zeros(array.shape, dtype=np.uint8)
    for value in present:
        out[array == value] = by_name[names[value]]
    return out


def parse_label_mapping(text: str) -> dict[int, str]:
    """``"1=liver,2=spleen"`` → ``{1: "liver", 2: "spleen"}`` (``0=…`` or ``N=-`` drops a value)."""
    out: dict[int, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        value, sep, name = part.partition("=")
        if not sep or not value.strip().isdigit() or not name.strip():
            raise InputError(f"label mapping entry {part!r} is not VALUE=TISSUE", where="--label-map")
        out[int(value)] = name.strip() if name.strip() == "-" else tissue_name(name)
    return out


def apply_mapping(array: np.ndarray, mapping: Mapping[int, str]) -> tuple[np.ndarray, dict[int, str]]:
    """Drop the values mapped to ``-`` and return the array with value → tissue names."""
    out = array.astype(np.uint8, copy=True)
    for value, name in mapping.items():
        if name == "-":
            out[array == value] = 0
    return out, {v: n for v, n in mapping.items() if n != "-"}
