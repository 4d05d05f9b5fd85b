"""``segnode run`` with each deep-learning backend on a DICOM CT series: a SEG that passes
``dciodvfy``, names the backend in its algorithm identification and matches the backend's labels;
and the declared fallback when weights are missing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from segnode.models.base import RunSettings
from segnode.models.registry import get_backend
from segnode.models.series import load_series
from segnode.node.cli.main import main
from segnode.profiles import load_profile

from tests.dicomtools import dciodvfy, seg_labelmap_on_source
from tests.dl_fixtures import (  # noqa: F401
    abdomen_profile_file,
    dl_models,
    dl_weights,
    synthetic_case,
)
from tests.paths import REPO
from tests.phantoms import head_phantom, write_ct_series

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> Path:
    volume, _ = synthetic_case(seed=3004)
    folder = tmp_path_factory.mktemp("ct")
    write_ct_series(volume.hu, folder, volume.spacing, volume.origin, volume.direction)
    return folder


@pytest.mark.parametrize("backend", ["nnunet", "totalsegmentator", "monai"])
def test_segnode_run_writes_a_valid_seg(backend: str, series: Path, dl_weights: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    profile_path = abdomen_profile_file(tmp_path / "profiles", backend)
    out = tmp_path / "out"
    argv = ["run", str(series), "-o", str(out), "--organ", str(profile_path), "--model", backend,
            "--no-fallback", "--device", "cpu", "--weights-dir", str(dl_weights)]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    seg_path = Path(stdout.split("wrote ")[1].split()[0])
    assert dciodvfy(seg_path) == []

    summary = json.loads(next(out.glob("summary_abdomen_*.json")).read_text())
    assert summary["backend"] == backend and summary["attempts"] == [{"backend": backend, "error": ""}]
    assert len(summary["weights_sha256"]) == 64
    seg = pydicom.dcmread(seg_path)
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == f"segnode {backend}"
    assert algorithm.AlgorithmVersion == summary["model_version"][:64]

    # the SEG holds exactly what the backend produced for the loaded series
    volume = load_series(series)
    profile = load_profile(profile_path)
    expected = get_backend(backend).load(profile, RunSettings(device="cpu", weights_dir=dl_weights)).segment(volume)
    assert expected.array.any()
    assert np.array_equal(seg_labelmap_on_source(seg_path, volume), expected.array)


def test_missing_weights_fall_back_and_the_job_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    phantom = head_phantom(shape=(24, 64, 64), spacing=(3.6, 3.6, 6.0))
    v = phantom.volume
    write_ct_series(v.hu, tmp_path / "ct", v.spacing, v.origin, v.direction)
    argv = ["run", str(tmp_path / "ct"), "-o", str(tmp_path / "out"), "--organ", "brain", "--device", "cpu",
            "--weights-dir", str(tmp_path / "no-weights")]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "backend: hu_based" in captured.out
    summary = json.loads(next((tmp_path / "out").glob("summary_brain_*.json")).read_text())
    assert summary["backend"] == "hu_based"
    first = summary["attempts"][0]
    assert first["backend"] == "totalsegmentator"
    assert "Dataset297_TotalSegmentator_total_3mm_1559subj" in first["error"] and "never downloads" in first["error"]
    seg_path = Path(summary["output"]["path"])
    assert dciodvfy(seg_path) == []
    algorithm = pydicom.dcmread(seg_path).SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "segnode hu_based"


def test_no_backend_left_is_a_backend_error(tmp_path: Path, series: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["run", str(series), "-o", str(tmp_path / "out"), "--organ", "liver", "--device", "cpu",
            "--weights-dir", str(tmp_path / "no-weights")]
    assert main(argv) == 4
    err = capsys.readouterr().err
    assert "totalsegmentator" in err and "nnunet" in err and "segnode models import" in err


@pytest.mark.parametrize("entry", ["node/cli/main.py", "node/jobs/worker.py", "bench/bench_backends.py",
                                   "tests/dl_fixtures.py", ".venv/bin/segnode"])
def test_entry_points_are_safe_to_re_import_as_spawn_does(entry: str) -> None:
    """nnU-Net (inside TotalSegmentator) starts workers with "spawn", which re-runs the main
    module as ``__mp_main__``: that must do nothing."""
    import subprocess
    import sys

    repo = REPO
    path = repo / entry
    if not path.exists():
        pytest.skip(f"{entry} not installed here")
    code = f"import runpy; runpy.run_path({str(path)!r}, run_name='__mp_main__')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
