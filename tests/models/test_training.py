"""The parts of ``segnode train`` and ``segnode models compare`` that need no training."""

from __future__ import annotations

import json
import math

import pytest
from segnode.errors import ConfigError, WeightsError
from segnode.models.compare import OrganVerdict, verdicts
from segnode.models.evaluate import OrganSummary
from segnode.models.training import (
    BaseModel,
    TrainOptions,
    _prepare_workdir,
    card_markdown,
    patient_folds,
    resolve_base,
)
from segnode.node.cli.main import main


def test_patient_folds_keep_each_patient_on_one_side():
    cases = {f"C{i:02d}": f"P{i // 2}" for i in range(14)}  # 7 patients, 2 cases each
    folds = patient_folds(cases)
    assert len(folds) == 5
    seen_val = []
    for fold in folds:
        train_patients = {cases[c] for c in fold["train"]}
        val_patients = {cases[c] for c in fold["val"]}
        assert fold["val"] and not train_patients & val_patients
        assert sorted(fold["train"] + fold["val"]) == sorted(cases)
        seen_val += fold["val"]
    assert sorted(seen_val) == sorted(cases)  # every case validated exactly once
    assert len(patient_folds({"a": "P1", "b": "P2", "c": "P3"})) == 3
    with pytest.raises(ConfigError, match="--fold all"):
        patient_folds({"a": "P1", "b": "P1"})


def test_missing_totalsegmentator_base_is_a_clear_error(tmp_path):
    options = TrainOptions(dataset="Liver@1", store=tmp_path, base=BaseModel.TOTALSEGMENTATOR)
    with pytest.raises(WeightsError, match="--base totalsegmentator needs the pre-trained weights "
                                           "'Dataset297_TotalSegmentator_total_3mm_1559subj'.*segnode models import"):
        resolve_base(options, tmp_path / "weights")
    assert resolve_base(TrainOptions(dataset="Liver@1", store=tmp_path), tmp_path) is None
    with pytest.raises(ConfigError, match="--base-model"):
        resolve_base(TrainOptions(dataset="Liver@1", store=tmp_path, base=BaseModel.NNUNET), tmp_path)


def test_options_are_validated(tmp_path):
    with pytest.raises(ConfigError, match="at least 1"):
        TrainOptions(dataset="A@1", store=tmp_path, epochs=0)
    with pytest.raises(ConfigError, match="'all'"):
        TrainOptions(dataset="A@1", store=tmp_path, fold="x")


def test_workdir_of_another_training_is_not_resumed(tmp_path):
    messages = []
    identity = {"dataset": "A@1", "rows_hash": "x", "base": "none"}
    _prepare_workdir(tmp_path / "w", identity, False, messages.append)
    _prepare_workdir(tmp_path / "w", identity, False, messages.append)
    assert messages == [f"resuming the training in {tmp_path / 'w'}"]
    with pytest.raises(ConfigError, match="dataset differ.*--fresh"):
        _prepare_workdir(tmp_path / "w", {**identity, "dataset": "A@2"}, False, messages.append)
    _prepare_workdir(tmp_path / "w", {**identity, "dataset": "A@2"}, True, messages.append)
    assert json.loads((tmp_path / "w" / "run.json").read_text())["dataset"] == "A@2"


def test_train_cli_refuses_a_missing_store(tmp_path, capsys):
    code = main(["train", "--dataset", "Liver@1", "--store", str(tmp_path / "nostore"),
                 "--weights-dir", str(tmp_path / "w")])
    assert code == 2
    assert "no dataset store here" in capsys.readouterr().err
    assert main(["train", "--dataset", "Liver", "--store", str(tmp_path)]) == 2  # not NAME@VERSION


def test_verdicts_per_organ():
    def summary(name, dice):
        return OrganSummary(name, 3, dice, 0.0, dice, 2.0, 0, 0.0)

    result = {v.segment: v.verdict for v in verdicts(
        [summary("liver", 0.90), summary("spleen", 0.80), summary("aorta", 0.7)],
        [summary("liver", 0.95), summary("spleen", 0.805), summary("kidney", 0.6)],
        ["aorta", "kidney", "liver", "spleen", "gallbladder"])}
    assert result == {"liver": "B better", "spleen": "tie", "aorta": "only A predicts it",
                      "kidney": "only B predicts it", "gallbladder": "neither predicts it"}
    assert OrganVerdict("x", 0.9, 0.5, 1, 1).verdict == "A better"


def test_card_markdown_lists_split_metrics_and_hashes():
    card = {
        "model": "Liver/1", "created": "2026-01-01T00:00:00+00:00",
        "dataset": {"ref": "Liver@1", "rows_sha256": "ab" * 32, "test_fraction": 0.2,
                    "train_cases": ["C1", "C2"], "test_cases": ["C3"]},
        "labels": {"1": "liver"}, "base_model": {"kind": "totalsegmentator", "name": "Dataset297", "weights_hash": "f"},
        "hyper_parameters": {"configuration": "3d_fullres", "fold": "0", "epochs": 2, "iterations_per_epoch": 3,
                             "initial_lr": 0.01, "patch_size": [32, 32, 32], "batch_size": 2,
                             "spacing_mm_zyx": [3, 3, 3]},
        "training": {"seconds": 12.0, "device": "cpu", "final_train_loss": 0.5, "final_ema_pseudo_dice": 0.4},
        "metrics": {"organs": [{"segment": "liver", "n": 1, "dice_mean": 0.91, "dice_sd": 0.0,
                                "hd95_median_mm": 4.2}], "seconds_per_case": 3.5, "device": "cpu",
                    "peak_rss_mb": 900.0},
        "files_sha256": {"fold_0/checkpoint_final.pth": "cd" * 32},
    }
    text = card_markdown(card)
    assert "Liver@1" in text and "2 training / 1 test cases, split by patient" in text
    assert "| liver | 1 | 0.910 | 0.000 | 4.2 |" in text
    assert "totalsegmentator Dataset297" in text and "cd" * 32 in text
    assert not math.isnan(card["metrics"]["organs"][0]["dice_mean"])
