"""Several profiles, one model run (node/jobs/shared_run.py): union profile, split, the shared label map."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from segnode.models.volume import LabelMap
from segnode.node.jobs.shared_run import shared_labels, split, union_profile
from segnode.profiles import load_profile


def test_union_profile_has_every_structure_and_the_union_roi() -> None:
    union = union_profile([load_profile(n) for n in ("liver", "spleen", "kidneys")])
    assert [t.name for t in union.tissues] == ["liver", "spleen", "kidney_left", "kidney_right"]
    assert set(union.options.totalsegmentator.roi_subset or ()) == {"liver", "spleen", "kidney_left", "kidney_right"}
    assert union.organ == "liver_spleen_kidneys" and union.model_type.value == "totalsegmentator"


def test_split_renumbers_per_profile_and_the_run_is_shared(tmp_path: Path) -> None:
    profiles = [load_profile(n) for n in ("liver", "kidneys")]
    union = union_profile(profiles)
    array = np.zeros((2, 3, 3), dtype=np.uint8)
    array[0, 0, 0], array[0, 1, 1], array[1, 2, 2] = 1, 2, 3  # liver, kidney_left, kidney_right
    runs: list[int] = []

    def run() -> tuple[LabelMap, list[dict[str, str]]]:
        runs.append(1)
        return LabelMap(array, union.label_values(), "totalsegmentator", "v1"), [{"backend": "x", "error": ""}]

    first, _, reused_first = shared_labels(tmp_path / "shared", array.shape, run)
    second, attempts, reused_second = shared_labels(tmp_path / "shared", array.shape, run)
    assert runs == [1] and (reused_first, reused_second) == (False, True)
    assert np.array_equal(second.array, array) and second.model_version == "v1" and attempts[0]["backend"] == "x"
    kidneys = split(second, profiles[1])
    assert kidneys.labels == {1: "kidney_left", 2: "kidney_right"}
    assert kidneys.array[0, 1, 1] == 1 and kidneys.array[1, 2, 2] == 2 and kidneys.array[0, 0, 0] == 0
    assert split(first, profiles[0]).array.sum() == 1
