"""A synthetic abdominal CT for the parity gate (the same phantom the tiny models were trained on).

The tests' fixture script (``tests/dl_fixtures.py``) trains the committed tiny
models on these cases; the gate needs the same kind of input without the test
tree, so the generator lives here too (a test checks both give the same case).
"""

from __future__ import annotations

import numpy as np

from segnode.models.volume import Volume

#: TotalSegmentator ``total`` class numbers of the organs
TS_LABELS = {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "gallbladder": 4, "liver": 5}
SHAPE = (32, 48, 48)  # k, j, i
SPACING = (4.0, 4.0, 4.0)  # x, y, z mm


def synthetic_case(seed: int, shape: tuple[int, int, int] = SHAPE,
                   spacing: tuple[float, float, float] = SPACING) -> tuple[Volume, np.ndarray]:
    """A synthetic abdominal CT (LPS, identity direction) and its truth labels (TotalSegmentator numbering)."""
    rng = np.random.default_rng(seed)
    nk, nj, ni = shape
    sx, sy, sz = spacing
    z, y, x = np.meshgrid(
        (np.arange(nk) - nk / 2) * sz, (np.arange(nj) - nj / 2) * sy, (np.arange(ni) - ni / 2) * sx,
        indexing="ij",
    )

    def jitter() -> float:
        return float(rng.uniform(-5, 5))

    def scale() -> float:
        return float(rng.uniform(0.9, 1.1))

    def ellipsoid(cx: float, cy: float, cz: float, ax: float, ay: float, az: float) -> np.ndarray:
        s = scale()
        return (((x - cx - jitter()) / (ax * s)) ** 2 + ((y - cy - jitter()) / (ay * s)) ** 2
                + ((z - cz - jitter()) / (az * s)) ** 2) <= 1.0

    hu = np.full(shape, -1000.0)
    labels = np.zeros(shape, dtype=np.uint8)
    body = (x / (85 * scale())) ** 2 + (y / (65 * scale())) ** 2 <= 1.0
    inner = (x / 75) ** 2 + (y / 55) ** 2 <= 1.0
    hu[body] = -90.0  # subcutaneous fat
    hu[body & inner] = 35.0  # soft tissue
    spine = ((x / 12) ** 2 + ((y - 42) / 12) ** 2 <= 1.0) & body
    hu[spine] = 450.0
    organs = [
        ("liver", ellipsoid(-38, -5, 12, 40, 38, 34), 62.0),
        ("spleen", ellipsoid(55, 18, 18, 17, 22, 24), 48.0),
        ("kidney_right", ellipsoid(-38, 32, -12, 14, 15, 24), 135.0),
        ("kidney_left", ellipsoid(38, 32, -8, 14, 15, 24), 175.0),
        ("gallbladder", ellipsoid(-22, -30, -14, 10, 10, 13), 8.0),
    ]
    for name, mask, value in organs:
        mask &= inner
        hu[mask] = value
        labels[mask] = TS_LABELS[name]
    hu += rng.normal(0.0, 12.0, shape)
    volume = Volume(
        hu=np.clip(np.rint(hu), -1024, 3071).astype(np.int16),
        spacing=spacing,
        origin=(-(ni / 2) * sx, -(nj / 2) * sy, -(nk / 2) * sz),
        direction=np.eye(3),
    )
    return volume, labels
