"""The parity gate: an engine's labels against PyTorch fp32, on tiny models and a real-size network.

``run_gate(engine, device, tiny_dir, work)``:

* **tiny models** (the committed ones, ``tests/data/tiny_models``): each is
  imported into a sandbox weights folder under ``work`` and segments synthetic
  abdominal CTs (:mod:`segnode.models.phantom`) twice, with fp32 and with the
  engine; the check is the smallest Dice over every label of every case
  (>= ``DICE_MIN``).  For nnU-Net and MONAI fp32 is the backend as it always
  ran; for TotalSegmentator (``total`` fast) the reference is
  ``totalsegmentator()``'s own API and the candidate segnode's in-process run of
  its steps with the engine (:mod:`segnode.models.ts_inprocess`).
* **real-size network** (``real_size=True``): nnU-Net's default 3d_fullres
  topology (6 stages, 32-320 features, 118 outputs, as TotalSegmentator's
  ``total`` networks) with seeded random weights, one 128³ patch of a
  normalised synthetic CT: the fraction of voxels whose argmax agrees with
  fp32 (>= ``AGREEMENT_MIN``).

The sandbox records the engine as admitted so that the backends run it there
(the real weights folder's record is written only by the caller, from the result).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from segnode.models.base import LoadedModel, RunSettings
from segnode.models.engine_gate import Check, GateResult, _torch_version, record_result
from segnode.models.engines import AGREEMENT_MIN, DICE_MIN, Engine, device_kind
from segnode.models.phantom import synthetic_case
from segnode.models.volume import Volume
from segnode.profiles.schema import Backend, Profile

logger = logging.getLogger(__name__)

#: seeds of the synthetic cases the tiny models segment in the gate
GATE_SEEDS = (4101, 4102)
TS_FOLDER = "Dataset297_TotalSegmentator_total_3mm_1559subj"
TS_TRAINER = "nnUNetTrainer_4000epochs_NoMirroring"

_PROFILE = """\
organ: enginegate
description: Parity gate on the tiny models
model_type: {model_type}
fallback: []
tissues:
- {{name: liver, description: Liver, codes_from: liver, totalsegmentator: [liver], label: 5}}
- {{name: spleen, description: Spleen, codes_from: spleen, totalsegmentator: [spleen], label: 1}}
- {{name: kidney_right, description: Right kidney, codes_from: kidney_right, totalsegmentator: [kidney_right],
   label: 2}}
- {{name: kidney_left, description: Left kidney, codes_from: kidney_left, totalsegmentator: [kidney_left],
   label: 3}}
options:
  totalsegmentator: {{task: total, resolution: fast}}
  nnunet: {{model: tiny_abdomen, folds: [0], tile_step_size: 0.5, use_mirroring: false, orientation: ras}}
  monai: {{model: tiny_bundle, roi_size: [32, 32, 32], overlap: 0.25}}
"""


def dice_per_label(reference: np.ndarray, candidate: np.ndarray) -> dict[int, float]:
    """Dice of every non-zero label present in either array."""
    out: dict[int, float] = {}
    for label in sorted(set(np.unique(reference).tolist()) | set(np.unique(candidate).tolist()) - {0}):
        a, b = reference == label, candidate == label
        out[int(label)] = 2.0 * float(np.logical_and(a, b).sum()) / float(a.sum() + b.sum())
    return out


def labels_check(name: str, pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> Check:
    """The smallest Dice over every label of every (reference, candidate) pair."""
    worst, where = 1.0, "all labels identical"
    for n, (ref, cand) in enumerate(pairs):
        for label, value in dice_per_label(ref, cand).items():
            if value < worst:
                worst, where = value, f"case {n} label {label}"
    if not any(np.any(ref) for ref, _ in pairs):
        return Check(name, 0.0, DICE_MIN, "the reference labelled nothing: no evidence")
    return Check(name, round(worst, 6), DICE_MIN, where)


# --------------------------------------------------------------------------- tiny models


def _place_ts(model: Path, dest: Path) -> Path:
    """The tiny nnU-Net under TotalSegmentator's folder name for ``total`` fast (297)."""
    import torch

    target = dest / TS_FOLDER / f"{TS_TRAINER}__nnUNetPlans__3d_fullres"
    (target / "fold_0").mkdir(parents=True, exist_ok=True)
    for name in ("dataset.json", "plans.json"):
        shutil.copy2(model / name, target / name)
    checkpoint = torch.load(model / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    checkpoint["trainer_name"] = TS_TRAINER
    torch.save(checkpoint, target / "fold_0" / "checkpoint_final.pth")
    return dest / TS_FOLDER


def sandbox(tiny_dir: Path, work: Path) -> Path:
    """A weights folder under ``work`` with the tiny models imported (reused when complete)."""
    from segnode.models.weights import import_weights

    root = work / "weights"
    if (root / ".complete").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    import_weights(tiny_dir / "nnunet_model", root, backend=Backend.NNUNET, name="tiny_abdomen")
    import_weights(_place_ts(tiny_dir / "nnunet_model", work / "ts"), root, backend=Backend.TOTALSEGMENTATOR)
    import_weights(tiny_dir / "monai_bundle", root, backend=Backend.MONAI, name="tiny_bundle")
    (root / ".complete").touch()
    return root


def _profile(work: Path, backend: Backend) -> Profile:
    from segnode.profiles import load_profile

    path = work / f"enginegate_{backend.value}.yaml"
    path.write_text(_PROFILE.format(model_type=backend.value), encoding="utf-8")
    return load_profile(path)


Loader = Callable[[Profile, RunSettings], LoadedModel]


def _loader(backend: Backend) -> Loader:
    from segnode.models.registry import get_backend

    return get_backend(backend).load


def tiny_checks(engine: Engine, device: str, tiny_dir: Path, work: Path,
                backends: Sequence[Backend] = (Backend.NNUNET, Backend.TOTALSEGMENTATOR, Backend.MONAI),
                loader: Callable[[Backend], Loader] = _loader) -> list[Check]:
    """One labels check per backend: fp32 against ``engine`` on the gate's synthetic cases."""
    root = sandbox(tiny_dir, work)
    kind = device_kind(device)
    record_result(root, GateResult(engine, kind, _torch_version(), (Check("sandbox: admitted for the gate", 1, 1),)))
    volumes: list[Volume] = [synthetic_case(seed)[0] for seed in GATE_SEEDS]
    checks = []
    from segnode.models.totalsegmentator import RUNNER_KEY

    for backend in backends:
        profile = _profile(work, backend)
        load = loader(backend)
        extra = {RUNNER_KEY: "api"} if backend is Backend.TOTALSEGMENTATOR else {}
        reference = load(profile, RunSettings(device=device, weights_dir=root, engine=Engine.FP32.value, extra=extra))
        candidate = load(profile, RunSettings(device=device, weights_dir=root, engine=engine.value))
        pairs = [(reference.segment(v).array, candidate.segment(v).array) for v in volumes]
        checks.append(labels_check(f"{backend.value} tiny model: min Dice per label vs fp32", pairs))
        logger.info("gate %s %s: %s", engine.value, backend.value, checks[-1])
    return checks


# --------------------------------------------------------------------------- real-size network


def real_size_network(outputs: int = 118, seed: int = 0) -> object:
    """nnU-Net's default 3d_fullres network of TotalSegmentator's size, seeded random weights."""
    import torch
    from dynamic_network_architectures.architectures.unet import PlainConvUNet  # type: ignore[import-untyped]

    torch.manual_seed(seed)
    return PlainConvUNet(1, 6, [32, 64, 128, 256, 320, 320], torch.nn.Conv3d, 3, [1, 2, 2, 2, 2, 2], 2, outputs,
                         [2] * 5, True, torch.nn.InstanceNorm3d, {"eps": 1e-5, "affine": True}, None, None,
                         torch.nn.LeakyReLU, {"inplace": True}).eval()


def real_size_check(engine: Engine, device: str, patch: int = 128, outputs: int = 118) -> Check:
    """Argmax agreement of ``engine`` with fp32 on one patch of a normalised synthetic CT."""
    import torch

    from segnode.models.engine_net import wrap

    network = real_size_network(outputs)
    assert isinstance(network, torch.nn.Module)
    volume, _ = synthetic_case(4201, shape=(patch, patch, patch), spacing=(3.0, 3.0, 3.0))
    hu = np.clip(volume.hu.astype(np.float32), -1000.0, 1500.0)
    x = torch.from_numpy((hu - 100.0) / 300.0)[None, None].to(device)  # CTNormalization-like
    with torch.inference_mode():
        reference = network.to(device)(x).argmax(1)
        candidate = wrap(network, engine)(x).argmax(1)
    agreement = float((reference == candidate).float().mean())
    return Check(f"real-size network ({outputs} outputs, {patch}³ patch): argmax agreement vs fp32",
                 round(agreement, 6), AGREEMENT_MIN, f"{int((reference != candidate).sum())} voxels differ")


def run_gate(engine: Engine, device: str, tiny_dir: Path, work: Path, real_size: bool = True) -> GateResult:
    """Every check of the gate for ``engine`` on ``device`` (nothing recorded outside ``work``)."""
    if engine in (Engine.AUTO, Engine.FP32):
        raise ValueError(f"the gate checks a candidate engine, not {engine.value}")
    checks = tiny_checks(engine, device, tiny_dir, work)
    if real_size:
        checks.append(real_size_check(engine, device))
    return GateResult(engine, device_kind(device), _torch_version(), tuple(checks))
