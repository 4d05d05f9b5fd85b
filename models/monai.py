"""MONAI backend: a bundle directory or a TorchScript file, sliding-window inference.

The imported model (``segnode models import``; named by ``options.monai.model``,
else ``model_checkpoint``, else the organ) is either

* a MONAI bundle: ``configs/inference.json`` (or ``.yaml``) whose
  ``network_def`` builds the network, and ``models/model.pt``, a state dict; or
* a TorchScript file (``model.ts``/``.pt``).

Nothing is ever fetched from the MONAI model zoo.  The input is laid out as
MONAI's usual pre-processing leaves it (``LoadImage`` + ``Orientation("RAS")``):
channel first, spatial axes ``(x, y, z)`` in RAS order; HU are clipped to
``hu_window`` and scaled to [0, 1]; if ``target_spacing`` is set the image is
resampled to it (trilinear) and the labels back (nearest).  Each tissue takes
the voxels of its ``label`` in the argmax of the output.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from segnode.errors import BackendError, DependencyMissingError, WeightsError
from segnode.models.base import RunSettings, installed_version
from segnode.models.device import MemoryModel, resolve_device, run_within_budget, torch_threads
from segnode.models.engine_gate import choose_engine
from segnode.models.engines import Engine
from segnode.models.io_nifti import from_closest_ras, to_closest_ras
from segnode.models.labels import map_labels
from segnode.models.volume import LabelMap, Volume
from segnode.models.weights import TORCHSCRIPT_SUFFIXES, ModelFolderBackend, ModelRecord, verify_or_raise, weights_root
from segnode.profiles.schema import Backend, MonaiOptions, Profile

if TYPE_CHECKING:  # pragma: no cover
    import torch

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- layout


def to_network_array(volume: Volume, options: MonaiOptions) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The volume as the network sees it: ``(x, y, z)`` RAS array in [0, 1], and its spacing."""
    data, spacing = to_closest_ras(volume.hu, volume)
    low, high = options.hu_window
    data = (np.clip(data.astype(np.float32), low, high) - low) / (high - low)
    return np.ascontiguousarray(data, dtype=np.float32), spacing


def from_network_array(labels: np.ndarray, volume: Volume) -> np.ndarray:
    """Undo :func:`to_network_array`'s layout: back to ``[k, j, i]``."""
    return from_closest_ras(labels, volume)


def labels_to_network_array(labels: np.ndarray, volume: Volume) -> np.ndarray:
    """A ``[k, j, i]`` label array in the network's layout (for training)."""
    return to_closest_ras(labels, volume)[0]


# --------------------------------------------------------------------------- model


def _memory(options: MonaiOptions, n_out: int) -> MemoryModel:
    return MemoryModel(target_spacing_mm=options.target_spacing, bytes_per_model_voxel=4.0 * (2 * n_out + 4),
                       bytes_per_input_voxel=36.0, fixed_mb=400.0)


@dataclass
class MonaiModel:
    network: torch.nn.Module
    record: ModelRecord
    profile: Profile
    settings: RunSettings
    device: str
    n_out: int
    engine: Engine = Engine.FP32
    backend: Backend = Backend.MONAI

    @property
    def model_version(self) -> str:
        engine = "" if self.engine is Engine.FP32 else f" {self.engine.value}"
        return f"{self.record.name} (monai {installed_version('monai')}{engine})"

    @property
    def weights_hash(self) -> str:
        return self.record.weights_hash

    def segment(self, volume: Volume) -> LabelMap:
        memory = _memory(self.profile.options.monai, self.n_out)
        return run_within_budget(self._segment, volume, self.settings, memory, self.backend.value)

    def _predict(self, data: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
        import torch
        import torch.nn.functional as F
        from monai.inferers import sliding_window_inference

        options = self.profile.options.monai
        image = torch.from_numpy(data)[None, None].to(self.device)
        size = data.shape
        if options.target_spacing is not None:
            size = tuple(max(1, round(n * s / t)) for n, s, t in zip(data.shape, spacing, options.target_spacing))
            image = F.interpolate(image, size=size, mode="trilinear", align_corners=False)
        logits = sliding_window_inference(image, roi_size=options.roi_size, sw_batch_size=options.sw_batch_size,
                                          predictor=self.network, overlap=options.overlap, mode="gaussian")
        if not isinstance(logits, torch.Tensor):
            raise BackendError(f"the network gives {type(logits).__name__} outputs, not one tensor", where=self.record.name)
        labels = torch.argmax(logits, dim=1, keepdim=True).to(torch.float32)
        if tuple(labels.shape[2:]) != data.shape:
            labels = F.interpolate(labels, size=data.shape, mode="nearest")
        return labels[0, 0].to("cpu").numpy().astype(np.int32)

    def _segment(self, volume: Volume) -> LabelMap:
        import torch

        data, spacing = to_network_array(volume, self.profile.options.monai)
        try:
            with torch_threads(self.settings.threads), torch.inference_mode():
                raw = from_network_array(self._predict(data, spacing), volume)
        except (RuntimeError, ValueError, MemoryError) as exc:
            raise BackendError(f"MONAI inference failed: {exc}", where=self.record.name) from exc
        out = map_labels(raw, {value: [tissue.label] for value, tissue in enumerate(self.profile.tissues, start=1)
                               if tissue.label is not None})
        return LabelMap(array=out, labels=self.profile.label_values(), backend=self.backend.value,
                        model_version=self.model_version, weights_hash=self.weights_hash)


def _torchscript_file(folder: Path) -> Path | None:
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix in TORCHSCRIPT_SUFFIXES]
    return files[0] if len(files) == 1 and not (folder / "configs").is_dir() else None


def _load_bundle(folder: Path, device: str) -> torch.nn.Module:
    import torch
    from monai.bundle import ConfigParser

    configs = sorted((folder / "configs").glob("inference.*"))
    if not configs:
        raise WeightsError("bundle has no configs/inference.json|yaml", where=str(folder))
    parser = ConfigParser()
    parser.read_config(str(configs[0]))
    key = "network_def" if "network_def" in parser else "network"
    network = parser.get_parsed_content(key, instantiate=True)
    state = torch.load(folder / "models" / "model.pt", map_location=device, weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    network.load_state_dict(state)
    return network


def load_network(record: ModelRecord, device: str) -> torch.nn.Module:
    """The network of an imported bundle or TorchScript model, in eval mode on ``device``."""
    import torch

    script = _torchscript_file(record.path)
    try:
        network = torch.jit.load(str(script), map_location=device) if script else _load_bundle(record.path, device)
    except (RuntimeError, KeyError, ValueError, OSError, TypeError, AttributeError) as exc:
        raise WeightsError(f"MONAI could not load the model ({type(exc).__name__}: {exc})",
                           where=str(record.path)) from exc
    return network.to(device).eval()


class MonaiBackend(ModelFolderBackend):
    name = Backend.MONAI
    libraries = ("torch", "monai")

    def cache_key(self, profile: Profile, settings: RunSettings) -> str:
        return f"{super().cache_key(profile, settings)}|engine={settings.engine}"

    def load(self, profile: Profile, settings: RunSettings) -> MonaiModel:
        if not self.is_available():
            raise DependencyMissingError("the monai backend needs torch and monai (pip install 'segnode[dl]')")
        record = self.record(profile, settings)
        verify_or_raise(record)
        device = resolve_device(settings.device)
        engine = choose_engine(settings.engine, weights_root(settings.weights_dir), device)
        with torch_threads(settings.threads):
            network = load_network(record, device)
        n_out = int(getattr(network, "out_channels", 0) or 0) or max(t.label or 0 for t in profile.tissues) + 1
        if engine is not Engine.FP32:
            from segnode.models.engine_net import wrap

            network = wrap(network, engine)
        logger.info("monai model %s loaded on %s (engine %s)", record.name, device, engine.value)
        return MonaiModel(network=network, record=record, profile=profile, settings=settings, device=device,
                          n_out=n_out, engine=engine)


BACKEND = MonaiBackend()
