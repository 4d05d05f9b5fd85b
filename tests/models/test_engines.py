"""Inference engines and their parity gate, on the committed tiny models (labels compared, never timings)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from segnode.models.base import LoadedModel, RunSettings
from segnode.models.cache import cache_key
from segnode.models.engine_gate import Check, GateResult, _torch_version, choose_engine, read_results, record_result
from segnode.models.engines import Engine, device_kind
from segnode.models.labels import map_labels
from segnode.models.nnunet import BACKEND as NNUNET
from segnode.models.parity import Loader, _loader, _profile, labels_check, sandbox, tiny_checks
from segnode.models.volume import LabelMap, Volume
from segnode.models.weights import import_weights
from segnode.profiles.schema import Backend, Profile

from tests.dl_fixtures import COMMITTED

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gate_work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("gate")
    sandbox(COMMITTED, work)
    return work


def _passed(engine: Engine, kind: str, torch_version: str | None = None, value: float = 1.0) -> GateResult:
    return GateResult(engine, kind, torch_version or _torch_version(), (Check("labels", value, 0.999),))


# --------------------------------------------------------------------------- choice of engine


def test_fp32_always_and_auto_only_after_a_passed_gate(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    kind = device_kind("cpu")
    assert choose_engine("fp32", tmp_path, "cpu") is Engine.FP32
    assert choose_engine("auto", tmp_path, "cpu") is Engine.FP32  # nothing recorded
    with caplog.at_level(logging.WARNING, logger="segnode.models.engine_gate"):
        assert choose_engine("bf16", tmp_path, "cpu") is Engine.FP32
    assert "has not passed the parity gate" in caplog.text
    record_result(tmp_path, _passed(Engine.BF16, kind, value=0.5))  # failed
    assert choose_engine("bf16", tmp_path, "cpu") is Engine.FP32 and choose_engine("auto", tmp_path, "cpu") is Engine.FP32
    record_result(tmp_path, _passed(Engine.BF16, kind, torch_version="1.0.0"))  # passed, other torch
    assert choose_engine("auto", tmp_path, "cpu") is Engine.FP32
    record_result(tmp_path, _passed(Engine.BF16, kind))
    assert choose_engine("bf16", tmp_path, "cpu") is Engine.BF16 and choose_engine("auto", tmp_path, "cpu") is Engine.BF16
    record_result(tmp_path, _passed(Engine.BF16, "cpu-some-other-kind"))
    assert read_results(tmp_path, kind)[Engine.BF16].passed  # kinds kept apart


def test_labels_check_figures() -> None:
    a = np.zeros((4, 10, 10), dtype=np.uint8)
    a[1:3, 2:8, 2:8] = 1
    a[0, 0, :5] = 2
    b = a.copy()
    assert labels_check("same", [(a, b)]) == Check("same", 1.0, 0.999, "all labels identical")
    b[0, 0, 0] = 0
    check = labels_check("one voxel", [(a, a), (a, b)])
    assert not check.passed and check.value == pytest.approx(2 * 4 / 9, abs=1e-6) and check.detail == "case 1 label 2"
    assert not labels_check("empty", [(np.zeros_like(a), np.zeros_like(a))]).passed  # no evidence, no pass


def test_map_labels_is_the_per_tissue_loop() -> None:
    rng = np.random.default_rng(5)
    raw = rng.integers(0, 120, size=(6, 7, 8))
    mapping = {1: [5], 2: [1, 7], 3: [118], 4: [7]}
    loop = np.zeros(raw.shape, dtype=np.uint8)
    for value, ids in mapping.items():
        loop[np.isin(raw, ids)] = value
    assert np.array_equal(map_labels(raw, mapping), loop)


# --------------------------------------------------------------------------- the gate on the tiny models


class _Broken:
    """A deliberately broken engine: the real model, but its labels shifted by one voxel."""

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self.backend, self.model_version, self.weights_hash = model.backend, model.model_version, model.weights_hash

    def segment(self, volume: Volume) -> LabelMap:
        labels = self.model.segment(volume)
        return LabelMap(np.roll(labels.array, 1, axis=2), labels.labels, labels.backend)


def _broken_loader(backend: Backend) -> Loader:
    real = _loader(backend)

    def load(profile: Profile, settings: RunSettings) -> LoadedModel:
        model = real(profile, settings)
        return model if settings.engine == Engine.FP32.value else _Broken(model)

    return load


def test_a_broken_engine_fails_the_gate_and_is_refused(gate_work: Path, tmp_path: Path) -> None:
    checks = tiny_checks(Engine.BF16, "cpu", COMMITTED, gate_work, backends=(Backend.NNUNET,), loader=_broken_loader)
    assert len(checks) == 1 and not checks[0].passed and checks[0].value < 0.9
    result = GateResult(Engine.BF16, device_kind("cpu"), _torch_version(), tuple(checks))
    weights = tmp_path / "weights"
    shutil.copytree(gate_work / "weights", weights)
    record_result(weights, result)
    model = NNUNET.load(_profile(gate_work, Backend.NNUNET), RunSettings(device="cpu", weights_dir=weights,
                                                                          engine="bf16"))
    assert model.engine is Engine.FP32  # refused: the node runs fp32


def test_fp32_candidate_passes_with_identical_labels(gate_work: Path) -> None:
    """The gate's own plumbing on every backend: fp32 against itself (TotalSegmentator: in process vs its API)."""
    checks = tiny_checks(Engine.FP32, "cpu", COMMITTED, gate_work)
    assert [c.passed for c in checks] == [True, True, True], checks
    assert all(c.value == 1.0 for c in checks), checks


# --------------------------------------------------------------------------- cache key


def test_cache_key_changes_with_weights_hash_and_engine(gate_work: Path, tmp_path: Path) -> None:
    profile = _profile(gate_work, Backend.NNUNET)
    root = tmp_path / "weights"
    import_weights(COMMITTED / "nnunet_model", root, backend=Backend.NNUNET, name="tiny_abdomen")
    settings = RunSettings(device="cpu", weights_dir=root)
    before = cache_key(NNUNET, profile, settings)
    assert cache_key(NNUNET, profile, RunSettings(device="cpu", weights_dir=root, engine="fp32")) != before
    changed = tmp_path / "changed"
    shutil.copytree(COMMITTED / "nnunet_model", changed)
    (changed / "fold_0" / "progress.txt").write_text("another file: other weights\n")
    import_weights(changed, root, backend=Backend.NNUNET, name="tiny_abdomen", force=True)
    assert cache_key(NNUNET, profile, settings) != before


# --------------------------------------------------------------------------- CLI


def test_models_verify_engine_prints_the_figures_and_records_them(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from segnode.node.cli.main import main

    rc = main(["models", "verify", "--engine", "bf16", "--device", "cpu", "--no-real-size",
               "--weights-dir", str(tmp_path), "--tiny", str(COMMITTED)])
    out = capsys.readouterr().out
    for backend in ("nnunet", "totalsegmentator", "monai"):
        assert f"{backend} tiny model: min Dice per label vs fp32" in out
    result = read_results(tmp_path, device_kind("cpu"))[Engine.BF16]
    assert rc == (0 if result.passed else 4) and len(result.checks) == 3
    assert ("passed the parity gate" if result.passed else "FAILED the parity gate") in out
    assert choose_engine("auto", tmp_path, "cpu") is (Engine.BF16 if result.passed else Engine.FP32)
