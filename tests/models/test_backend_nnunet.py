"""nnU-Net v2 backend on a tiny nnU-Net trained on synthetic CT by the session fixture."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from segnode.errors import BackendError, ConfigError, WeightsError
from segnode.models.base import RunSettings
from segnode.models.cache import ModelCache
from segnode.models.io_nifti import to_closest_ras, volume_to_nifti
from segnode.models.metrics import dice
from segnode.models.nnunet import BACKEND
from segnode.models.volume import Volume
from segnode.models.weights import import_weights
from segnode.profiles import load_profile
from segnode.profiles.schema import Backend, Profile

from tests.dl_fixtures import (  # noqa: F401
    TS_LABELS,
    abdomen_profile_file,
    dl_models,
    dl_weights,
    synthetic_case,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def profile(tmp_path_factory: pytest.TempPathFactory) -> Profile:
    return load_profile(abdomen_profile_file(tmp_path_factory.mktemp("profiles")))


@pytest.fixture(scope="module")
def case() -> tuple:
    return synthetic_case(seed=3001)  # not one of the training cases


def _settings(root: Path, **kw: object) -> RunSettings:
    return RunSettings(device="cpu", threads=2, weights_dir=root, **kw)  # type: ignore[arg-type]


def test_segments_the_phantom_with_profile_labels(dl_weights: Path, profile: Profile, case: tuple) -> None:
    volume, truth = case
    model = BACKEND.load(profile, _settings(dl_weights))
    labels = model.segment(volume)
    assert labels.array.shape == volume.shape and labels.array.dtype == np.uint8
    assert labels.labels == {1: "liver", 2: "spleen", 3: "kidney_right", 4: "kidney_left"}
    assert labels.backend == "nnunet" and labels.weights_hash == model.weights_hash and "tiny_abdomen" in \
        labels.model_version
    # the tiny model really segments (it reaches about 0.95 / 0.85 / 0.99 / 0.99), kidneys on their own sides
    for value, name in labels.labels.items():
        assert dice(labels.array == value, truth == TS_LABELS[name]) > (0.5 if name == "spleen" else 0.8), name
    x = volume.world_x()
    right, left = x[labels.array == 3], x[labels.array == 4]
    assert right.size and left.size and right.mean() < 0 < left.mean()  # LPS: patient right is -x


def test_same_labels_as_nnunet_predicting_from_files(dl_weights: Path, dl_models: dict, profile: Profile,
                                                     case: tuple, tmp_path: Path) -> None:
    """segnode's in-memory path equals nnU-Net's own file-based prediction (axes, spacing, resampling)."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    volume, _ = case
    ours = BACKEND.load(profile, _settings(dl_weights)).segment(volume)
    (tmp_path / "in").mkdir()
    nib.save(nib.as_closest_canonical(volume_to_nifti(volume)), tmp_path / "in" / "case_0000.nii.gz")
    predictor = nnUNetPredictor(tile_step_size=0.5, use_mirroring=False, device=torch.device("cpu"),
                                allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(dl_models["nnunet"]), use_folds=(0,))
    predictor.predict_from_files(str(tmp_path / "in"), str(tmp_path / "out"), save_probabilities=False,
                                 overwrite=True, num_processes_preprocessing=1,
                                 num_processes_segmentation_export=1)
    theirs = np.asanyarray(nib.load(tmp_path / "out" / "case.nii.gz").dataobj)  # canonical (x, y, z)
    ours_ras, _ = to_closest_ras(ours.array, volume)
    for value, tissue in enumerate(profile.tissues, start=1):
        assert np.array_equal(ours_ras == value, theirs == tissue.label), tissue.name


def test_native_and_ras_orders_agree_on_a_canonically_stored_volume(dl_weights: Path, profile: Profile,
                                                                   case: tuple) -> None:
    volume, _ = case
    nk, nj, ni = volume.shape
    origin = np.asarray(volume.origin) + np.array([(ni - 1) * volume.spacing[0], (nj - 1) * volume.spacing[1], 0])
    stored_ras = Volume(hu=volume.hu[:, ::-1, ::-1].copy(), spacing=volume.spacing, origin=tuple(origin),
                        direction=np.diag([-1.0, -1.0, 1.0]))  # i runs to the right, j anterior: RAS order
    native = profile.model_copy(update={"options": profile.options.model_copy(
        update={"nnunet": profile.options.nnunet.model_copy(update={"orientation": "native"})})})
    a = BACKEND.load(profile, _settings(dl_weights)).segment(stored_ras).array
    b = BACKEND.load(native, _settings(dl_weights)).segment(stored_ras).array
    assert a.any() and np.array_equal(a, b)
    # and the same anatomy as the LPS-stored volume
    c = BACKEND.load(profile, _settings(dl_weights)).segment(volume).array
    assert np.array_equal(a[:, ::-1, ::-1], c)


def test_missing_weights_name_the_import_command(tmp_path: Path, profile: Profile) -> None:
    with pytest.raises(WeightsError, match="segnode models import PATH --backend nnunet --name tiny_abdomen"):
        BACKEND.load(profile, _settings(tmp_path / "empty"))


def test_corrupted_checkpoint_refused_at_load(dl_weights: Path, profile: Profile, tmp_path: Path) -> None:
    root = tmp_path / "w"
    shutil.copytree(dl_weights / "pretrained" / "nnunet", root / "pretrained" / "nnunet")
    checkpoint = root / "pretrained" / "nnunet" / "tiny_abdomen" / "fold_0" / "checkpoint_final.pth"
    data = bytearray(checkpoint.read_bytes())
    data[len(data) // 2] ^= 0xFF
    checkpoint.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="sha256 mismatch fold_0/checkpoint_final.pth"):
        BACKEND.load(profile, _settings(root))


def test_missing_fold_and_unknown_label(dl_weights: Path, profile: Profile) -> None:
    options = profile.options.model_copy(update={"nnunet": profile.options.nnunet.model_copy(update={"folds": (1,)})})
    with pytest.raises(WeightsError, match="fold 1 has no checkpoint_final.pth"):
        BACKEND.load(profile.model_copy(update={"options": options}), _settings(dl_weights))
    tissues = (profile.tissues[0].model_copy(update={"label": 9}), *profile.tissues[1:])
    with pytest.raises(ConfigError, match=r"labels \['liver=9'\] are not in the model"):
        BACKEND.load(profile.model_copy(update={"tissues": tissues}), _settings(dl_weights))


def test_cuda_requested_without_gpu_is_a_clear_error(dl_weights: Path, profile: Profile) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(BackendError, match="no CUDA GPU"):
        BACKEND.load(profile, RunSettings(device="cuda", weights_dir=dl_weights))


def test_cache_keeps_the_model_warm_keyed_by_weights_hash(dl_weights: Path, dl_models: dict, profile: Profile,
                                                          case: tuple, tmp_path: Path) -> None:
    root = tmp_path / "w"
    shutil.copytree(dl_weights / "pretrained" / "nnunet", root / "pretrained" / "nnunet")
    cache = ModelCache(max_models=2)
    settings = _settings(root)
    first = cache.get(Backend.NNUNET, profile, settings)
    assert cache.get("nnunet", profile, settings) is first
    assert (cache.stats.hits, cache.stats.misses) == (1, 1)
    first.segment(case[0])  # a warm model segments again without reloading
    assert cache.get("nnunet", profile, settings) is first and cache.stats.misses == 1

    # re-imported, identical files: the same hash, so still warm
    import_weights(dl_models["nnunet"], root, backend=Backend.NNUNET, name="tiny_abdomen", force=True)
    assert cache.get("nnunet", profile, settings) is first
    # other options or settings: another key, another load; the bound evicts the least recently used
    other = profile.model_copy(update={"options": profile.options.model_copy(
        update={"nnunet": profile.options.nnunet.model_copy(update={"tile_step_size": 1.0})})})
    second = cache.get("nnunet", other, settings)
    assert second is not first and cache.stats.misses == 2 and len(cache) == 2
    third = cache.get("nnunet", profile, replace(settings, memory_budget_mb=10_000))
    assert third is not first and len(cache) == 2 and cache.stats.evictions == 1


def test_reduced_mode_processes_slabs_within_the_budget(dl_weights: Path, profile: Profile, case: tuple) -> None:
    volume, _ = case
    tall = replace(volume, hu=np.concatenate([volume.hu] * 3), source=None)
    whole = BACKEND.load(profile, _settings(dl_weights)).segment(tall)
    assert whole.notes == ()
    # the tiny test volume is far from any real budget: force slabs with a budget just above the fixed cost
    model = BACKEND.load(profile, _settings(dl_weights, memory_budget_mb=625))
    assert model.memory.estimate_mb(volume.shape, volume.spacing) < 625 < model.memory.estimate_mb(
        tall.shape, tall.spacing)
    assert model.segment(volume).notes == ()  # within the budget: whole volume
    labels = model.segment(tall)
    assert labels.array.shape == tall.shape
    assert any("reduced mode: segmented in 3 slabs" in note for note in labels.notes)
    # each slab sees 16 slices of context on each side: close to the whole-volume result
    assert dice(labels.array == 1, whole.array == 1) > 0.75


def test_oversize_volume_refused_when_asked(dl_weights: Path, profile: Profile, case: tuple) -> None:
    settings = _settings(dl_weights, memory_budget_mb=601, extra={"oversize": "refuse"})
    with pytest.raises(BackendError, match=r"needs about \d+ MB, above the memory budget of 601 MB"):
        BACKEND.load(profile, settings).segment(case[0])
