"""Several profiles, shared model runs (node/jobs/shared_run.py, models/capability.py); routes that cannot run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from segnode.errors import BackendError, ConfigError
from segnode.models.base import LoadedModel, RunSettings
from segnode.models.capability import route_problems, run_groups
from segnode.models.registry import get_backend
from segnode.models.series import load_series
from segnode.models.volume import LabelMap, Volume
from segnode.node.jobs.shared_run import (
    segment_profiles,
    shared_labels,
    split,
    union_profile,
)
from segnode.profiles import Backend, Profile, load_profile
from segnode.profiles.loader import profile_paths
from segnode.routing import RulesHolder
from segnode.routing.matcher import load_rules

from tests.paths import DATA

THORAX = DATA / "thorax_cta"


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


# -- hu_based: one run per HU method, shared --------------------------------------------------


class CountingModels:
    """A ModelSource that loads the real backends and counts each model's runs (method or organ)."""

    def __init__(self) -> None:
        self.runs: list[str] = []

    def get(self, backend: str, profile: Profile, settings: RunSettings) -> LoadedModel:
        model = get_backend(backend).load(profile, settings)
        runs, name = self.runs, profile.options.hu_based.method if profile.options.hu_based else profile.organ

        class Counted:
            def segment(self, volume: Volume) -> LabelMap:
                runs.append(name)
                return model.segment(volume)

        return Counted()  # type: ignore[return-value]


@pytest.fixture(scope="module")
def thorax() -> Volume:
    return load_series(THORAX)


def test_hu_based_profiles_run_each_method_once_per_series(tmp_path: Path, thorax: Volume) -> None:
    lungs, bone = load_profile("lungs"), load_profile("bone")
    twin = lungs.model_copy(update={"organ": "airways"})  # same method as lungs: shares its run
    profiles = [lungs, bone, twin]
    models = CountingModels()
    results = {p.organ: segment_profiles(thorax, profiles, [p], [Backend.HU_BASED], RunSettings(), models,
                                         tmp_path / "shared") for p in profiles}
    assert sorted(models.runs) == ["bone", "lungs"]  # one run per method, not per profile
    assert [reused for _, _, reused in results.values()] == [False, False, True]
    alone = {p.organ: get_backend("hu_based").load(p, RunSettings()).segment(thorax) for p in (lungs, bone)}
    for organ, (labels, attempts, _) in results.items():
        expected = alone["bone" if organ == "bone" else "lungs"]
        assert labels.labels == expected.labels and attempts == [{"backend": "hu_based", "error": ""}]
        assert np.array_equal(labels.array, expected.array)  # each profile's result is its method's own
    combined, _, reused = segment_profiles(thorax, profiles[:2], profiles[:2], [Backend.HU_BASED], RunSettings(),
                                           models, tmp_path / "shared")
    assert reused and sorted(models.runs) == ["bone", "lungs"]
    assert combined.labels == {1: "lung_left", 2: "lung_right", 3: "bone"}
    assert np.array_equal(combined.array == 3, alone["bone"].array == 1)


def test_a_fallback_that_cannot_segment_a_profile_is_skipped_with_the_reason(thorax: Volume) -> None:
    liver, lungs = load_profile("liver"), load_profile("lungs")
    with pytest.raises(BackendError, match="hu_based: cannot segment liver: the profile has no options.hu_based"):
        segment_profiles(thorax, [lungs, liver], [liver], [Backend.HU_BASED], RunSettings())


def test_route_problems_name_the_backend_and_profile() -> None:
    lungs, bone, liver = (load_profile(n) for n in ("lungs", "bone", "liver"))
    assert route_problems([lungs, bone], Backend.HU_BASED) == []
    assert route_problems([lungs, bone], None) == []  # totalsegmentator, the first profile's model_type
    [problem] = route_problems([lungs, liver], Backend.HU_BASED)
    assert problem == "backend hu_based cannot segment profile liver: the profile has no options.hu_based.method"
    assert route_problems([liver], Backend.HU_BASED)  # a single profile too
    assert [sorted(p.organ for p in g) for g in run_groups(Backend.HU_BASED, [lungs, bone])] == [["lungs"], ["bone"]]
    assert len(run_groups(Backend.TOTALSEGMENTATOR, [lungs, bone, liver])) == 1


RULES = """\
rules:
  - name: chest
    match: {tag: Modality, equals: CT}
    action: {profiles: [lungs, bone], backend: hu_based}
  - name: belly
    fallback: true
    action:
      profiles: [lungs, liver]
      backend: hu_based
"""


def test_the_rules_loader_refuses_a_route_that_cannot_run(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(RULES)
    with pytest.raises(ConfigError) as refused:
        load_rules(path, profiles=profile_paths().keys())
    assert str(refused.value) == (
        f"{path}:8: rules[1] 'belly' (profiles lungs, liver) cannot run: backend hu_based cannot segment profile "
        "liver: the profile has no options.hu_based.method")
    with pytest.raises(ConfigError, match="cannot run"):
        RulesHolder(path, profiles=tuple(profile_paths()))  # node start-up
    path.write_text(RULES.split("  - name: belly")[0])
    holder = RulesHolder(path, profiles=tuple(profile_paths()))
    path.write_text(RULES)
    assert not holder.reload()  # a rules reload keeps the previous rules
    assert [r.name for r in holder.current.rules] == ["chest"]
