"""A model's output values mapped to a profile's segment numbers in one pass (a lookup table)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def map_labels(raw: np.ndarray, mapping: Mapping[int, Sequence[int]]) -> np.ndarray:
    """uint8 array: ``value`` where ``raw`` holds one of ``mapping[value]``, 0 elsewhere.

    Later segment numbers win where two list the same model value (as the
    per-tissue loops this replaces did).
    """
    if raw.size and int(raw.min()) < 0:
        raise ValueError("model output has negative label values")
    top = max([int(raw.max()) if raw.size else 0] + [i for ids in mapping.values() for i in ids])
    lut = np.zeros(top + 1, dtype=np.uint8)
    for value, ids in mapping.items():
        lut[list(ids)] = value
    return lut[raw]
