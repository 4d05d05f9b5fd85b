"""``segnode reprocess --model BACKEND/VERSION``: the job runs that fine-tuned version of the profile's model."""

from __future__ import annotations

import pytest
from segnode.errors import InputError
from segnode.models.monai import MonaiBackend
from segnode.models.nnunet import NnunetBackend
from segnode.node.jobs.pipeline import with_model_version
from segnode.profiles import load_profile


def test_the_version_names_the_profiles_model_for_the_backend() -> None:
    liver = load_profile("liver")
    assert NnunetBackend().model_name(liver) == "liver"  # the organ, when the profile names no model
    versioned = with_model_version(liver, "nnunet", "3")
    assert NnunetBackend().model_name(versioned) == "liver/3"  # what find_model resolves to finetuned/liver/3
    assert MonaiBackend().model_name(versioned) == "liver"  # the other backends' models are untouched
    assert versioned.options.totalsegmentator == liver.options.totalsegmentator
    again = with_model_version(versioned, "nnunet", "4")  # a version replaces a version, never nests
    assert NnunetBackend().model_name(again) == "liver/4"
    assert NnunetBackend().model_name(liver) == "liver"  # the loaded profile itself is unchanged


@pytest.mark.parametrize("backend", ["hu_based", "totalsegmentator", None])
def test_a_backend_without_versioned_models_is_a_clear_error(backend: str | None) -> None:
    with pytest.raises(InputError, match="has no versioned models"):
        with_model_version(load_profile("liver"), backend, "3")


def test_reprocess_refuses_a_version_where_there_are_none() -> None:
    from segnode.node.sources.reprocess import Model

    assert Model.parse("nnunet/3") == Model("nnunet", "3")
    with pytest.raises(InputError, match="totalsegmentator has no fine-tuned versions"):
        Model.parse("totalsegmentator/2")
