"""End to end on the CPU: dataset store → frozen version → fine-tuned tiny nnU-Net → evaluated →
registered → ``segnode run --model nnunet`` → a SEG that passes ``dciodvfy``.

The base model is the committed tiny nnU-Net of :mod:`tests.dl_fixtures`, installed as TotalSegmentator weights so
that ``--base totalsegmentator`` takes the real transfer-learning path.  The dataset holds
synthetic abdominal phantoms and the real thorax CTA with TotalSegmentator's aorta.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from segnode.errors import WeightsNotInstalledError
from segnode.models.io_nifti import ras_affine, volume_to_nifti
from segnode.models.segmentation_io import Grid, read_segmentation
from segnode.models.series import load_series
from segnode.models.weights import Kind, find_model, import_weights, sha256_file, verify
from segnode.node.cli.main import main
from segnode.profiles.schema import Backend

from tests.dicomtools import dciodvfy
from tests.paths import DATA

SECRET = b"training-e2e-secret-0123"

pytestmark = pytest.mark.slow


def _tiny_base(tmp: Path) -> Path:
    """The committed tiny nnU-Net, laid out as TotalSegmentator's ``total`` fast weights."""
    import tests.dl_fixtures as fixtures

    model = fixtures.committed_models()["nnunet"]
    return fixtures.place_in_totalsegmentator_layout(model, tmp / "ts_weights") / fixtures.TS_FOLDERS["fast"]


def _dataset(tmp: Path) -> tuple[Path, Path]:
    """Synthetic phantoms (MSD layout) plus the real thorax CTA with its aorta (NIfTI pair)."""
    from tests.dl_fixtures import TS_LABELS, synthetic_case

    msd = tmp / "phantoms"
    for sub in ("imagesTr", "labelsTr"):
        (msd / sub).mkdir(parents=True)
    for i in range(5):
        volume, labels = synthetic_case(seed=4000 + i)
        nib.save(volume_to_nifti(volume), msd / "imagesTr" / f"phantom{i}_0000.nii.gz")
        nib.save(nib.Nifti1Image(np.ascontiguousarray(labels.transpose(2, 1, 0)), ras_affine(volume)),
                 msd / "labelsTr" / f"phantom{i}.nii.gz")
    (msd / "dataset.json").write_text(json.dumps({"labels": {"background": 0, **TS_LABELS}}))
    real = tmp / "real"
    for sub in ("images", "labels"):
        (real / sub).mkdir(parents=True)
    ct = load_series(DATA / "thorax_cta")
    aorta = read_segmentation(DATA / "thorax_cta_labels" / "aorta.nii.gz").on_grid(Grid.of_volume(ct)).mask("aorta")
    nib.save(volume_to_nifti(ct), real / "images" / "thorax.nii.gz")
    nib.save(nib.Nifti1Image(np.ascontiguousarray(aorta.transpose(2, 1, 0)).astype(np.uint8), ras_affine(ct)),
             real / "labels" / "thorax.nii.gz")
    return msd, real


def _weights_and_frozen_dataset(tmp: Path, name: str, with_real_case: bool) -> Path:
    """The tiny base installed as TotalSegmentator weights, and dataset ``name``@1 frozen in ``tmp/store``."""
    weights = tmp / "weights"
    import_weights(_tiny_base(tmp), weights, backend=Backend.TOTALSEGMENTATOR)
    msd, real = _dataset(tmp)
    secret = tmp / "secret.key"
    secret.write_bytes(SECRET)
    store = ["dataset", "--store", str(tmp / "store"), "--secret-file", str(secret)]
    assert main([*store, "add", str(msd), "--dataset", name]) == 0
    if with_real_case:
        assert main([*store, "add", str(real), "--dataset", name, "--label-map", "1=aorta"]) == 0
    assert main([*store, "freeze", name]) == 0
    return weights


def test_store_to_finetuned_model_to_seg(tmp_path, capsys):
    weights = _weights_and_frozen_dataset(tmp_path, "Abdomen", with_real_case=True)
    capsys.readouterr()

    train = ["train", "--dataset", "Abdomen@1", "--store", str(tmp_path / "store"), "--base", "totalsegmentator",
             "--epochs", "2", "--iterations", "3", "--val-iterations", "1", "--device", "cpu",
             "--weights-dir", str(weights), "--augmentation-workers", "0", "--processes", "1",
             "--test-fraction", "0.34", "--threads", "2"]
    assert main(train) == 0
    out = capsys.readouterr()
    assert "starting from the base model's weights" in out.err and "epoch 2/2" in out.err
    assert "model: Abdomen/1" in out.out

    record = find_model(weights, Backend.NNUNET, "Abdomen/1")
    assert record.path == weights / "finetuned" / "Abdomen" / "1"
    assert record.kind is Kind.FINETUNED and verify(record) == []
    card = json.loads((record.path / "model_card.json").read_text())
    assert card["dataset"]["ref"] == "Abdomen@1" and card["dataset"]["split"] == "patient-level"
    assert len(card["dataset"]["test_cases"]) >= 1 and not set(card["dataset"]["test_cases"]) & set(
        card["dataset"]["train_cases"])
    assert card["base_model"]["kind"] == "totalsegmentator"
    assert card["hyper_parameters"]["epochs"] == 2 and card["training"]["epochs_done"] == 2
    assert card["files_sha256"]["fold_0/checkpoint_final.pth"] == sha256_file(
        record.path / "fold_0" / "checkpoint_final.pth")
    organs = {o["segment"] for o in card["metrics"]["organs"]}
    assert organs and organs <= {"spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "aorta"}
    assert card["metrics"]["seconds_per_case"] > 0
    assert (record.path / "model_card.md").read_text().startswith("# Model card: Abdomen/1")
    evaluation = weights / ".training" / "Abdomen" / "1" / "evaluation"
    assert (evaluation / "metrics.csv").exists() and (evaluation / "boxplot_dice.png").exists()

    # running the same command again resumes: every stage is found done, nothing retrained
    assert main([*train, "--force", "--no-eval"]) == 0
    assert "training already finished" in capsys.readouterr().err
    record = find_model(weights, Backend.NNUNET, "Abdomen/1")  # registered again (--force): a new card

    # a profile points at the fine-tuned model; segnode run writes a valid SEG with it
    liver_value = int(next(k for k, v in card["labels"].items() if v == "liver"))
    profile = tmp_path / "profiles" / "liver.yaml"  # a profile file is named after its organ
    profile.parent.mkdir()
    profile.write_text(
        "organ: liver\ndescription: Liver (fine-tuned)\nmodel_type: nnunet\nfallback: []\n"
        f"tissues:\n- name: liver\n  description: Liver\n  codes_from: liver\n  label: {liver_value}\n"
        "options:\n  nnunet:\n    model: Abdomen\n    folds: [0]\n    use_mirroring: false\n")
    assert main(["run", str(DATA / "thorax_cta"), "-o", str(tmp_path / "run"), "--organ", str(profile),
                 "--model", "nnunet", "--no-fallback", "--device", "cpu", "--weights-dir", str(weights)]) == 0
    (seg,) = (tmp_path / "run").glob("SEG_*.dcm")
    assert dciodvfy(seg) == []
    summary = json.loads(next((tmp_path / "run").glob("summary_*.json")).read_text())
    assert summary["backend"] == "nnunet" and summary["weights_sha256"] == record.weights_hash

    # the pre-trained base against the fine-tuned model on the same test split, with the report
    capsys.readouterr()
    base_name = "Dataset297_TotalSegmentator_total_3mm_1559subj"
    assert main(["models", "--weights-dir", str(weights), "compare", base_name, "Abdomen/1", "--dataset",
                 "Abdomen@1", "--split", "test", "--store", str(tmp_path / "store"), "--device", "cpu",
                 "-o", str(tmp_path / "cmp"), "--no-pictures"]) == 0
    table = capsys.readouterr().out
    assert "seconds per scan" in table and "organs available" in table and "aorta" in table
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "| minutes per scan |" in report and "| organs available | 5 | 6 |" in report
    assert "only B predicts it" in report  # the base model has no aorta
    assert (tmp_path / "cmp" / "B" / "metrics.csv").exists()

    # one model on the dataset's test split, through segnode evaluate: same figures as compare's B side
    assert main(["evaluate", "--dataset", "Abdomen@1", "--model", "Abdomen/1", "--weights-dir", str(weights),
                 "--store", str(tmp_path / "store"), "--device", "cpu", "-o", str(tmp_path / "eval"),
                 "--no-pictures"]) == 0
    assert "Abdomen/1 on Abdomen@1 (test split" in capsys.readouterr().out
    assert (tmp_path / "eval" / "metrics.csv").read_text() == (tmp_path / "cmp" / "B" / "metrics.csv").read_text()


def test_a_training_killed_mid_run_resumes_from_its_last_epoch(tmp_path, capsys):
    """``kill -9`` of ``segnode train`` (and its nnU-Net process) after the first epoch; the same
    command then continues at epoch 2 from the atomic per-epoch checkpoint, not from the start."""
    import os
    import signal
    import subprocess

    from tests.peers import SEGNODE

    weights = _weights_and_frozen_dataset(tmp_path, "Phantoms", with_real_case=False)
    train = ["train", "--dataset", "Phantoms@1", "--store", str(tmp_path / "store"), "--base", "totalsegmentator",
             "--epochs", "3", "--iterations", "2", "--val-iterations", "1", "--device", "cpu", "--no-eval",
             "--weights-dir", str(weights), "--augmentation-workers", "0", "--processes", "1", "--threads", "2"]
    proc = subprocess.Popen([*SEGNODE, *train], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    seen = []
    try:
        for line in proc.stderr:  # type: ignore[union-attr]
            seen.append(line)
            if "epoch 1/3" in line:
                os.killpg(proc.pid, signal.SIGKILL)  # the CLI and the nnU-Net process under it
                break
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()  # type: ignore[union-attr]
    assert any("epoch 1/3" in line for line in seen), "".join(seen[-20:])
    assert proc.returncode == -signal.SIGKILL
    with pytest.raises(WeightsNotInstalledError):
        find_model(weights, Backend.NNUNET, "Phantoms/1")  # nothing registered by the killed run

    capsys.readouterr()
    assert main(train) == 0
    err = capsys.readouterr().err
    assert "resuming from checkpoint_latest.pth at epoch 2/3" in err
    assert "epoch 1/3" not in err and "epoch 2/3" in err and "epoch 3/3" in err
    record = find_model(weights, Backend.NNUNET, "Phantoms/1")
    card = json.loads((record.path / "model_card.json").read_text())
    assert card["training"]["epochs_done"] == 3 and verify(record) == []
