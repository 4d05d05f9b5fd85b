"""nnU-Net v2 backend: ``nnUNetPredictor`` on an imported model folder.

The model folder (``dataset.json``, ``plans.json``, ``fold_N/<checkpoint>``)
is imported with ``segnode models import`` and named by the profile
(``options.nnunet.model``, else ``model_checkpoint``, else the organ name).
Folds, checkpoint, tile step and mirroring come from ``options.nnunet``.

Inference goes through ``nnUNetPredictor.predict_single_npy_array``, so no
temporary files and no worker processes are involved.  nnU-Net never
reorients: a model expects the voxel order of its training files.  With
``orientation: native`` (default) the array is the volume's ``[k, j, i]``,
what nnU-Net's SimpleITK reader gives for the DICOM series or a NIfTI written
from it by SimpleITK; with ``orientation: ras`` it is reoriented as nibabel's
``as_closest_canonical`` stores it (what TotalSegmentator feeds its models,
and what models trained on canonical NIfTI files expect).  Spacing follows
the array, in nnU-Net's ``(z, y, x)`` order.  Each tissue takes the
voxels of its ``label`` in the model's output.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from segnode.errors import BackendError, ConfigError, DependencyMissingError, WeightsError
from segnode.models.base import RunSettings, installed_version
from segnode.models.device import MemoryModel, resolve_device, run_within_budget, torch_threads
from segnode.models.engine_gate import choose_engine
from segnode.models.engines import Engine
from segnode.models.io_nifti import from_closest_ras, to_closest_ras
from segnode.models.labels import map_labels
from segnode.models.volume import LabelMap, Volume
from segnode.models.weights import ModelFolderBackend, ModelRecord, verify_or_raise, weights_root
from segnode.profiles.schema import Backend, Profile

logger = logging.getLogger(__name__)


def _memory(plans: dict, n_labels: int) -> MemoryModel:
    spacing = plans["configurations"]["3d_fullres"]["spacing"]  # z, y, x
    return MemoryModel(
        target_spacing_mm=(float(spacing[2]), float(spacing[1]), float(spacing[0])),
        bytes_per_model_voxel=4.0 * (3 * n_labels + 4),  # logits, gaussian, counts, data
        bytes_per_input_voxel=4.0 * (2 * n_labels + 3),  # logits resampled back, argmax, input
        fixed_mb=600.0,
    )


class Predictor(Protocol):
    """What segnode calls of nnU-Net's ``nnUNetPredictor``."""

    def predict_single_npy_array(self, input_image: np.ndarray, image_properties: dict[str, Any],
                                 segmentation_previous_stage: np.ndarray | None, output_file_truncated: str | None,
                                 save_or_return_probabilities: bool) -> np.ndarray: ...


@dataclass
class NnunetModel:
    """A loaded nnU-Net predictor bound to a profile's tissues."""

    predictor: Predictor
    record: ModelRecord
    profile: Profile
    settings: RunSettings
    device: str
    memory: MemoryModel
    engine: Engine = Engine.FP32
    backend: Backend = Backend.NNUNET

    @property
    def model_version(self) -> str:
        engine = "" if self.engine is Engine.FP32 else f" {self.engine.value}"
        return f"{self.record.name} (nnunetv2 {installed_version('nnunetv2')}{engine})"

    @property
    def weights_hash(self) -> str:
        return self.record.weights_hash

    def segment(self, volume: Volume) -> LabelMap:
        return run_within_budget(self._segment, volume, self.settings, self.memory, self.backend.value)

    def _segment(self, volume: Volume) -> LabelMap:
        import torch

        ras = self.profile.options.nnunet.orientation == "ras"
        if ras:  # as nibabel's as_closest_canonical file would be read by nnU-Net's SimpleITK reader
            xyz, (sx, sy, sz) = to_closest_ras(volume.hu, volume)
            array = xyz.transpose(2, 1, 0)
        else:  # as SimpleITK reads the DICOM series (or a NIfTI written from it)
            array, (sx, sy, sz) = np.asarray(volume.hu), volume.spacing
        props = {"spacing": [float(sz), float(sy), float(sx)]}
        try:
            with torch_threads(self.settings.threads), torch.inference_mode():
                raw = self.predictor.predict_single_npy_array(
                    np.ascontiguousarray(array, dtype=np.float32)[None], props, None, None, False)
        except (RuntimeError, ValueError, MemoryError) as exc:
            raise BackendError(f"nnU-Net inference failed: {exc}", where=self.record.name) from exc
        raw = np.asarray(raw)
        if ras:
            raw = from_closest_ras(raw.transpose(2, 1, 0), volume)
        if raw.shape != volume.shape:
            raise BackendError(f"nnU-Net returned shape {raw.shape} for a volume of {volume.shape}")
        out = map_labels(raw, {value: [tissue.label] for value, tissue in enumerate(self.profile.tissues, start=1)
                               if tissue.label is not None})
        return LabelMap(array=out, labels=self.profile.label_values(), backend=self.backend.value,
                        model_version=self.model_version, weights_hash=self.weights_hash)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise WeightsError(f"unreadable {path.name} ({exc})", where=str(path)) from exc


def check_model_folder(folder: Path, profile: Profile) -> tuple[dict, dict]:
    """Check folds, checkpoint and labels of an nnU-Net model folder; return (dataset, plans)."""
    options = profile.options.nnunet
    dataset = _read_json(folder / "dataset.json")
    plans = _read_json(folder / "plans.json")
    if "3d_fullres" not in plans.get("configurations", {}):
        raise WeightsError("plans.json has no 3d_fullres configuration", where=str(folder))
    for fold in options.folds:
        checkpoint = folder / f"fold_{fold}" / options.checkpoint
        if not checkpoint.is_file():
            raise WeightsError(f"fold {fold} has no {options.checkpoint}", where=str(folder))
    values = {int(v) for v in dataset.get("labels", {}).values() if isinstance(v, int)}
    missing = [f"{t.name}={t.label}" for t in profile.tissues if t.label not in values]
    if missing:
        raise ConfigError(f"profile {profile.organ}: labels {missing} are not in the model's dataset.json "
                          f"labels {sorted(values)}", where=str(folder / "dataset.json"))
    return dataset, plans


class NnunetBackend(ModelFolderBackend):
    name = Backend.NNUNET
    libraries = ("torch", "nnunetv2")

    def cache_key(self, profile: Profile, settings: RunSettings) -> str:
        return f"{super().cache_key(profile, settings)}|engine={settings.engine}"

    def load(self, profile: Profile, settings: RunSettings) -> NnunetModel:
        if not self.is_available():
            raise DependencyMissingError("the nnunet backend needs torch and nnunetv2 (pip install 'segnode[dl]')")
        record = self.record(profile, settings)
        verify_or_raise(record)
        dataset, plans = check_model_folder(record.path, profile)
        device = resolve_device(settings.device)
        options = profile.options.nnunet
        engine = choose_engine(settings.engine, weights_root(settings.weights_dir), device)
        predictor = build_predictor(record.path, PredictorOptions(
            folds=tuple(options.folds), checkpoint=options.checkpoint, tile_step_size=options.tile_step_size,
            use_mirroring=options.use_mirroring), device, engine, settings.threads)
        n_labels = len(dataset.get("labels", {}))
        logger.info("nnunet model %s loaded on %s (folds %s, engine %s)", record.name, device, list(options.folds),
                    engine.value)
        return NnunetModel(predictor=predictor, record=record, profile=profile, settings=settings,
                           device=device, memory=_memory(plans, n_labels), engine=engine)


@dataclass(frozen=True)
class PredictorOptions:
    folds: tuple[int | str, ...]
    checkpoint: str = "checkpoint_final.pth"
    tile_step_size: float = 0.5
    use_mirroring: bool = False


def build_predictor(folder: Path, options: PredictorOptions, device: str, engine: Engine,
                    threads: int | None) -> Predictor:
    """nnU-Net's predictor for the trained model ``folder``, its network run by ``engine``.

    The engine's network goes in through the predictor's public
    ``manual_initialization`` with everything else the predictor loaded itself.
    """
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    with contextlib.redirect_stdout(io.StringIO()):  # it prints a notice for every CPU predictor
        predictor = nnUNetPredictor(
            tile_step_size=options.tile_step_size, use_gaussian=True, use_mirroring=options.use_mirroring,
            perform_everything_on_device=device != "cpu", device=torch.device(device), verbose=False,
            verbose_preprocessing=False, allow_tqdm=False,
        )
    try:
        with torch_threads(threads):
            predictor.initialize_from_trained_model_folder(
                str(folder), use_folds=options.folds, checkpoint_name=options.checkpoint)
    except (RuntimeError, KeyError, ValueError, OSError, EOFError) as exc:
        raise WeightsError(f"nnU-Net could not load the model ({type(exc).__name__}: {exc})",
                           where=str(folder)) from exc
    if engine is not Engine.FP32:
        from segnode.models.engine_net import wrap

        predictor.manual_initialization(
            wrap(predictor.network, engine), predictor.plans_manager, predictor.configuration_manager,
            predictor.list_of_parameters, predictor.dataset_json, predictor.trainer_name,
            predictor.allowed_mirroring_axes)
    return predictor


BACKEND = NnunetBackend()
