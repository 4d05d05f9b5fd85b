"""Weights management: import from zip/folder, manifests, verify, remove, CLI.

The model folders here are small stand-ins with the real layouts (the hash
checks do not depend on what the files hold); the backend tests import real
tiny models through the same code.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
from segnode.errors import (
    ConfigError,
    InputError,
    WeightsError,
    WeightsNotInstalledError,
)
from segnode.models.weights import (
    MANIFEST,
    Kind,
    combined_hash,
    detect,
    find_model,
    import_weights,
    list_models,
    read_manifest,
    remove,
    verify,
    verify_or_raise,
)
from segnode.node.cli.main import main
from segnode.profiles.schema import Backend

TS_297 = "Dataset297_TotalSegmentator_total_3mm_1559subj"
TS_RUN = "nnUNetTrainer_4000epochs_NoMirroring__nnUNetPlans__3d_fullres"


def _nnunet_folder(base: Path, payload: bytes = b"weights") -> Path:
    folder = base / "Dataset500_Liver" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    (folder / "fold_0").mkdir(parents=True)
    (folder / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver": 1}}))
    (folder / "plans.json").write_text(json.dumps({"configurations": {"3d_fullres": {}}}))
    (folder / "fold_0" / "checkpoint_final.pth").write_bytes(payload)
    return folder


def _ts_folder(base: Path) -> Path:
    folder = base / TS_297
    run = folder / TS_RUN
    (run / "fold_0").mkdir(parents=True)
    (run / "dataset.json").write_text("{}")
    (run / "plans.json").write_text("{}")
    (run / "fold_0" / "checkpoint_final.pth").write_bytes(b"ts")
    return folder


def _zip(folder: Path, zip_path: Path, root: Path) -> Path:
    with zipfile.ZipFile(zip_path, "w") as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(root).as_posix())
    return zip_path


def test_import_folder_records_every_file_hash(tmp_path: Path) -> None:
    src = _nnunet_folder(tmp_path / "src")
    root = tmp_path / "weights"
    [record] = import_weights(src, root)
    assert record.backend is Backend.NNUNET and record.kind is Kind.PRETRAINED
    assert record.name == "Dataset500_Liver"  # named after the dataset, not the trainer folder
    assert record.path == root / "pretrained" / "nnunet" / "Dataset500_Liver"
    assert set(record.files) == {"dataset.json", "plans.json", "fold_0/checkpoint_final.pth"}
    assert record.weights_hash == combined_hash(record.files)
    manifest = json.loads((record.path / MANIFEST).read_text())
    assert manifest["files"] == record.files and manifest["source"] == str(src)
    assert verify(record) == []


def test_import_zip_with_name_and_kind(tmp_path: Path) -> None:
    src = _nnunet_folder(tmp_path / "src")
    zip_path = _zip(src, tmp_path / "liver.zip", tmp_path / "src")
    with pytest.raises(ConfigError, match="a fine-tuned model is named NAME/VERSION"):
        import_weights(zip_path, tmp_path / "w", name="liver", kind=Kind.FINETUNED)
    [record] = import_weights(zip_path, tmp_path / "w", name="liver/3", kind=Kind.FINETUNED)
    assert record.path == tmp_path / "w" / "finetuned" / "liver" / "3"
    assert find_model(tmp_path / "w", Backend.NNUNET, "liver/3").path == record.path
    assert [r.name for r in list_models(tmp_path / "w")] == ["liver/3"]
    # nothing left behind by the staging area
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["finetuned"]


def test_finetuned_wins_over_pretrained_and_a_bare_name_means_the_latest_version(tmp_path: Path) -> None:
    root = tmp_path / "w"
    pretrained = import_weights(_nnunet_folder(tmp_path / "a", b"p"), root, name="liver")[0]
    versions = {v: import_weights(_nnunet_folder(tmp_path / v, v.encode()), root, name=f"liver/{v}",
                                  kind=Kind.FINETUNED)[0] for v in ("2", "10", "9")}
    assert find_model(root, Backend.NNUNET, "liver").weights_hash == versions["10"].weights_hash  # 10 > 9 > 2
    assert find_model(root, Backend.NNUNET, "liver/2").weights_hash == versions["2"].weights_hash
    assert [r.name for r in list_models(root)] == ["liver", "liver/2", "liver/9", "liver/10"]
    remove(root, "liver/10")
    assert find_model(root, Backend.NNUNET, "liver").weights_hash == versions["9"].weights_hash
    for v in ("2", "9"):
        remove(root, f"liver/{v}")
    assert find_model(root, Backend.NNUNET, "liver").weights_hash == pretrained.weights_hash
    with pytest.raises(WeightsNotInstalledError, match="--name liver/2 --kind finetuned"):
        find_model(root, Backend.NNUNET, "liver/2")
    with pytest.raises(WeightsNotInstalledError):
        find_model(root, Backend.MONAI, "liver")  # the name exists, not for this backend


def test_reimport_needs_force(tmp_path: Path) -> None:
    root = tmp_path / "w"
    import_weights(_nnunet_folder(tmp_path / "a", b"v1"), root, name="liver")
    with pytest.raises(WeightsError, match="already imported"):
        import_weights(_nnunet_folder(tmp_path / "b", b"v2"), root, name="liver")
    [new] = import_weights(_nnunet_folder(tmp_path / "c", b"v3"), root, name="liver", force=True)
    assert new.files["fold_0/checkpoint_final.pth"] != ""
    assert (new.path / "fold_0" / "checkpoint_final.pth").read_bytes() == b"v3"


def test_verify_detects_corrupted_missing_and_extra_files(tmp_path: Path) -> None:
    [record] = import_weights(_nnunet_folder(tmp_path / "src"), tmp_path / "w", name="liver")
    checkpoint = record.path / "fold_0" / "checkpoint_final.pth"
    checkpoint.write_bytes(b"weightz")  # same size, one byte flipped
    (record.path / "dataset.json").unlink()
    (record.path / "stray.txt").write_text("x")
    problems = verify(record)
    assert any(p.startswith("sha256 mismatch fold_0/checkpoint_final.pth") for p in problems)
    assert "missing file dataset.json" in problems and "unexpected file stray.txt" in problems
    with pytest.raises(WeightsError, match="integrity check"):
        verify_or_raise(record)


def test_missing_model_error_names_import_command(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="segnode models import PATH --backend nnunet --name liver"):
        find_model(tmp_path, Backend.NNUNET, "liver")


def test_totalsegmentator_folder_detected_by_task_table_name(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _ts_folder(src)
    [candidate] = detect(src)
    assert candidate.backend is Backend.TOTALSEGMENTATOR and candidate.name == TS_297
    [record] = import_weights(_zip(src / TS_297, tmp_path / f"{TS_297}.zip", src), tmp_path / "w")
    assert record.path == tmp_path / "w" / "pretrained" / "totalsegmentator" / TS_297


def test_totalsegmentator_folder_with_wrong_name_is_not_taken_for_totalsegmentator(tmp_path: Path) -> None:
    src = tmp_path / "src"
    folder = _ts_folder(src)
    folder.rename(src / "Dataset297_TotalSegmentator_total_3mm")  # not the task table's exact name
    with pytest.raises(InputError, match="task table"):
        import_weights(src, tmp_path / "w", backend=Backend.TOTALSEGMENTATOR)


def test_totalsegmentator_folder_without_checkpoint_refused(tmp_path: Path) -> None:
    folder = _ts_folder(tmp_path / "src")
    (folder / TS_RUN / "fold_0" / "checkpoint_final.pth").unlink()
    with pytest.raises(InputError, match="checkpoint_final.pth"):
        import_weights(tmp_path / "src", tmp_path / "w")
    with pytest.raises(ConfigError, match="keep their task folder name"):
        _ts_folder(tmp_path / "src2")
        import_weights(tmp_path / "src2", tmp_path / "w", name="renamed")


def test_zip_slip_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("../escape.txt", "x")
    with pytest.raises(InputError, match="escapes"):
        import_weights(bad, tmp_path / "w")
    assert not (tmp_path / "escape.txt").exists()


def test_unrecognised_source(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no model found"):
        import_weights(tmp_path / "empty", tmp_path / "w")
    with pytest.raises(InputError, match="no such file"):
        import_weights(tmp_path / "nope.zip", tmp_path / "w")


def test_invalid_names_refused(tmp_path: Path) -> None:
    for name in ("../x", "a/b", "", ".hidden"):
        with pytest.raises(ConfigError, match="invalid model name"):
            import_weights(_nnunet_folder(tmp_path / f"s{abs(hash(name))}"), tmp_path / "w", name=name)


def test_remove(tmp_path: Path) -> None:
    root = tmp_path / "w"
    [record] = import_weights(_nnunet_folder(tmp_path / "src"), root, name="liver")
    [gone] = remove(root, "liver")
    assert gone.path == record.path and not record.path.exists()
    with pytest.raises(WeightsError, match="no imported model"):
        remove(root, "liver")


def test_manifest_required(tmp_path: Path) -> None:
    folder = tmp_path / "w" / "pretrained" / "nnunet" / "handmade"
    folder.mkdir(parents=True)
    with pytest.raises(WeightsError, match="no segnode manifest"):
        read_manifest(folder)
    with pytest.raises(WeightsError, match="no segnode manifest"):
        find_model(tmp_path / "w", Backend.NNUNET, "handmade")


def test_cli_import_list_verify_remove(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "w"
    src = _nnunet_folder(tmp_path / "src")
    zip_path = _zip(src, tmp_path / "liver.zip", tmp_path / "src")
    assert main(["models", "--weights-dir", str(root), "import", str(zip_path), "--name", "liver"]) == 0
    assert "imported pretrained/nnunet/liver" in capsys.readouterr().out
    assert main(["models", "--weights-dir", str(root), "list", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert [m["name"] for m in listing["models"]] == ["liver"] and listing["models"][0]["files"] == 3
    assert main(["models", "--weights-dir", str(root), "verify"]) == 0
    assert "ok     pretrained/nnunet/liver" in capsys.readouterr().out

    (root / "pretrained" / "nnunet" / "liver" / "plans.json").write_text("{tampered}")
    assert main(["models", "--weights-dir", str(root), "verify", "liver"]) == 4
    captured = capsys.readouterr()
    assert "FAILED pretrained/nnunet/liver" in captured.out and "sha256 mismatch plans.json" in captured.out
    assert "fail their integrity check" in captured.err

    assert main(["models", "--weights-dir", str(root), "remove", "liver"]) == 0
    assert main(["models", "--weights-dir", str(root), "list"]) == 0
    assert "no models imported" in capsys.readouterr().out


def test_default_weights_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SEGNODE_WEIGHTS_DIR", str(tmp_path / "envweights"))
    assert main(["models", "list"]) == 0
    assert f"weights directory: {tmp_path / 'envweights'}" in capsys.readouterr().out
