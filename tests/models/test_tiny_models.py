"""The committed tiny models are intact, and the script that made them still runs end to end.

Dice floors are asserted on the committed models only (test_backend_*.py):
a model trained here would differ from one CPU family to the next.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from segnode.models.weights import import_weights
from segnode.profiles.schema import Backend

from tests.dl_fixtures import COMMITTED, MANIFEST, MODEL_PATHS, SHAPE, committed_models
from tests.paths import REPO


def test_committed_models_match_their_manifest() -> None:
    models = committed_models()
    assert set(models) == set(MODEL_PATHS) and all(p.exists() for p in models.values())
    manifest = json.loads((COMMITTED / MANIFEST).read_text())
    assert manifest["made_by"] == "python tests/dl_fixtures.py OUT"  # the full build, not --quick
    assert sum((COMMITTED / f).stat().st_size for f in manifest["files_sha256"]) < 4 << 20


def test_a_changed_byte_is_refused(tmp_path: Path) -> None:
    copy = shutil.copytree(COMMITTED, tmp_path / "models")
    script = copy / MODEL_PATHS["monai_torchscript"]
    data = bytearray(script.read_bytes())
    data[-1] ^= 1
    script.write_bytes(bytes(data))
    with pytest.raises(AssertionError, match="does not match"):
        committed_models(copy)


@pytest.mark.slow
def test_the_build_script_runs_end_to_end(tmp_path: Path) -> None:
    import torch

    out = tmp_path / "built"
    result = subprocess.run([sys.executable, "tests/dl_fixtures.py", "--quick", str(out)], cwd=REPO,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    models = committed_models(out)  # every file is in the manifest it wrote
    assert json.loads((out / MANIFEST).read_text())["parameters"]["epochs"] == 1
    records = import_weights(models["nnunet"], tmp_path / "weights", backend=Backend.NNUNET, name="quick")
    assert records[0].files and len(records[0].weights_hash) == 64
    net = torch.jit.load(str(models["monai_torchscript"]))
    with torch.no_grad():
        logits = net(torch.zeros((1, 1, 32, 32, 32)))
    assert logits.shape == (1, 6, 32, 32, 32) and np.isfinite(logits.numpy()).all()
    state = torch.load(models["monai_bundle"] / "models" / "model.pt", weights_only=True)
    assert state.keys() == torch.jit.load(str(models["monai_torchscript"])).state_dict().keys()
    assert SHAPE == tuple(json.loads((models["nnunet"] / "plans.json").read_text())["configurations"]
                          ["3d_fullres"]["median_image_size_in_voxels"])
