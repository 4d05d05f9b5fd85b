"""HU bone's marrow fill (models/hu_bone.py) on a phantom with known anatomy: cancellous bone
below the bone threshold inside a vertebral body whose cortex opens towards the spinal canal,
fatty marrow inside a rib, the canal itself and a contrast-filled bowel loop beside the spine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from segnode.models.base import RunSettings
from segnode.models.hu_based import BACKEND
from segnode.models.hu_bone import distance_along
from segnode.models.metrics import dice
from segnode.models.volume import Volume
from segnode.profiles.loader import load_profile

SHAPE = (12, 200, 220)  # k, j, i
SPACING = (1.0, 1.0, 2.0)  # x, y, z mm


@dataclass(frozen=True)
class Spine:
    volume: Volume
    parts: dict[str, np.ndarray]


def disc(x: np.ndarray, y: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    return (x - cx) ** 2 + (y - cy) ** 2 <= r**2


@pytest.fixture(scope="module")
def spine() -> Spine:
    """LPS, x to the patient's left, y posterior; every slice alike, noise seeded."""
    j, i = np.mgrid[: SHAPE[1], : SHAPE[2]]
    x, y = (i - SHAPE[2] / 2) * SPACING[0], (j - SHAPE[1] / 2) * SPACING[1]
    body = ((x / 100) ** 2 + (y / 80) ** 2) <= 1
    vertebra = disc(x, y, 0, 10, 18)
    cortex = vertebra & ~disc(x, y, 0, 10, 16) & ~((np.abs(x) < 5) & (y > 10))  # posterior wall open (foramen)
    canal = disc(x, y, 0, 40, 9)
    arch = disc(x, y, 0, 40, 14) & ~canal & ~vertebra
    rib = ((x + 70) / 6) ** 2 + (y / 9) ** 2 <= 1
    rib_marrow = ((x + 70) / 4) ** 2 + (y / 7) ** 2 <= 1
    humerus = disc(x, y, 75, 20, 12)
    humerus_marrow = disc(x, y, 75, 20, 7)
    bowel = disc(x, y, 40, -40, 12)  # oral contrast
    hu = np.full(SHAPE[1:], -1000.0, dtype=np.float32)
    hu[body] = 40.0
    hu[vertebra] = 130.0  # cancellous bone, below the 200 HU threshold
    hu[cortex] = 800.0
    hu[canal] = 15.0
    hu[arch] = 700.0
    hu[rib] = 700.0
    hu[rib_marrow] = -60.0  # fatty marrow
    hu[humerus] = 900.0
    hu[humerus_marrow] = -50.0
    hu[bowel] = 300.0
    rng = np.random.default_rng(7)
    stack = hu[None] + rng.normal(0.0, 10.0, SHAPE).astype(np.float32)
    origin = (-SHAPE[2] / 2 * SPACING[0], -SHAPE[1] / 2 * SPACING[1], 0.0)
    volume = Volume(stack, SPACING, origin, np.eye(3))
    parts = {
        "bone": vertebra | arch | rib | humerus,
        "cancellous": vertebra & ~cortex,
        "rib_marrow": rib_marrow,
        "humerus_marrow": humerus_marrow,
        "canal": canal,
        "bowel": bowel,
    }
    return Spine(volume, {name: np.broadcast_to(mask, SHAPE) for name, mask in parts.items()})


@pytest.fixture(scope="module")
def bone(spine) -> np.ndarray:
    return BACKEND.load(load_profile("bone"), RunSettings()).segment(spine.volume).mask("bone")


def covered(bone: np.ndarray, part: np.ndarray) -> float:
    return float((bone & part).sum() / part.sum())


def test_cancellous_bone_inside_an_open_cortex_is_filled(spine, bone) -> None:
    assert covered(bone, spine.parts["cancellous"]) >= 0.95  # threshold alone: 0


def test_fatty_marrow_of_a_rib_is_filled(spine, bone) -> None:
    """An 8 x 14 mm cavity on the 2 mm working grid: its rim shares blocks with the cortex."""
    assert covered(bone, spine.parts["rib_marrow"]) >= 0.8  # measured 0.87; threshold alone: 0


def test_yellow_marrow_of_a_long_bone_is_filled(spine, bone) -> None:
    """A 14 mm fatty medullary cavity (154 mm²): too large for a small hole, filled as fat."""
    assert covered(bone, spine.parts["humerus_marrow"]) >= 0.9


def test_spinal_canal_and_contrast_bowel_stay_out(spine, bone) -> None:
    """The canal keeps at most a partial-volume rim where its wall shares 2 mm blocks with the arch."""
    assert covered(bone, spine.parts["canal"]) <= 0.1  # measured 0.07
    assert covered(bone, spine.parts["bowel"]) <= 0.02  # measured 0


def test_whole_bones_agree_with_the_phantom(spine, bone) -> None:
    assert dice(bone, spine.parts["bone"]) >= 0.97  # measured 0.99


def test_segmentation_is_deterministic(spine, bone) -> None:
    again = BACKEND.load(load_profile("bone"), RunSettings()).segment(spine.volume).mask("bone")
    assert np.array_equal(bone, again)


def test_distance_along_an_axis() -> None:
    row = np.zeros((1, 1, 10), dtype=bool)
    row[0, 0, [2, 7]] = True
    assert distance_along(row, 2, True)[0, 0].tolist()[2:] == [0, 1, 2, 3, 4, 0, 1, 2]
    assert distance_along(row, 2, False)[0, 0].tolist()[:8] == [2, 1, 0, 4, 3, 2, 1, 0]
    assert distance_along(row, 2, True)[0, 0, 0] > 10_000 and distance_along(row, 2, False)[0, 0, 9] > 10_000
