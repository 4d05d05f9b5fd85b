"""Tiny real deep-learning models for the backend tests, and the script that made them.

Nothing here is mocked: the models are trained with the libraries themselves
and run through their real inference code.  Training on a CPU is not
reproducible across CPU families (floating-point kernels differ), so the
tests never train what they assert on: they use the models committed in
``tests/data/tiny_models/`` (``MANIFEST.json`` there records their hashes,
seeds, parameters and the library versions that made them), and
``tests/models/test_tiny_models.py`` only checks that this script still runs end to end.

* :func:`synthetic_case`: a small synthetic abdominal CT (body, fat, spine,
  liver, spleen, kidneys, gallbladder) with its truth labels, numbered as
  TotalSegmentator's ``total`` task numbers them (1 spleen, 2 kidney_right,
  3 kidney_left, 4 gallbladder, 5 liver).
* :func:`build_tiny_nnunet`: plans, preprocesses and trains a tiny nnU-Net v2
  (a few feature maps, a few hundred iterations; about a minute on two CPU
  cores) on such cases stored in canonical RAS voxel order (as
  TotalSegmentator's models are trained), and returns its model folder
  (``dataset.json``, ``plans.json``, ``fold_0/checkpoint_final.pth``).
* :func:`place_in_totalsegmentator_layout`: the same model under the folder
  names TotalSegmentator's task table expects for ``total`` fast (297) and
  fastest (298), so that ``totalsegmentator()`` itself runs offline on it.
* :func:`build_tiny_monai_bundle` / :func:`build_tiny_torchscript`: a tiny
  MONAI UNet as a bundle directory and as a TorchScript file.

Rebuild the committed models (then commit ``tests/data/tiny_models``)::

    python tests/dl_fixtures.py tests/data/tiny_models

``--quick`` trains for a few iterations only (what the end-to-end test runs).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import shutil
import sys
import zipfile
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # pragma: no cover - when run as a script
    sys.path.insert(0, str(REPO))

from segnode.models.phantom import SHAPE, SPACING, TS_LABELS, synthetic_case  # noqa: E402,F401  (the models' phantom)
from segnode.models.volume import Volume  # noqa: E402

#: the committed models the tests use (built by this script, see the module docstring)
COMMITTED = Path(__file__).resolve().parent / "data" / "tiny_models"
MANIFEST = "MANIFEST.json"
DATASET_ID = 987
DATASET_NAME = f"Dataset{DATASET_ID}_SegnodeTiny"
TS_FOLDERS = {
    "fast": "Dataset297_TotalSegmentator_total_3mm_1559subj",
    "fastest": "Dataset298_TotalSegmentator_total_6mm_1559subj",
}
TS_TRAINER = "nnUNetTrainer_4000epochs_NoMirroring"
#: training length of the tiny nnU-Net (epochs x iterations)
TRAIN_EPOCHS = 6
TRAIN_ITERATIONS = 40
PATCH = [24, 32, 32]  # smaller than the image: random crops, sliding windows at inference


# --------------------------------------------------------------------------- helpers


@contextmanager
def _environ(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _save_nifti(volume: Volume, array: np.ndarray | None, path: Path) -> None:
    import nibabel as nib
    from segnode.models.io_nifti import ras_affine, volume_to_nifti

    # canonical RAS voxel order, as TotalSegmentator's models were trained (and are fed)
    if array is None:
        nib.save(nib.as_closest_canonical(volume_to_nifti(volume)), path)
    else:
        img = nib.Nifti1Image(np.ascontiguousarray(array.transpose(2, 1, 0)), ras_affine(volume))
        nib.save(nib.as_closest_canonical(img), path)


# --------------------------------------------------------------------------- nnU-Net


def _write_raw_dataset(raw: Path, n_cases: int) -> None:
    folder = raw / DATASET_NAME
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    for case in range(n_cases):
        volume, labels = synthetic_case(seed=1000 + case)
        _save_nifti(volume, None, folder / "imagesTr" / f"tiny_{case:03d}_0000.nii.gz")
        _save_nifti(volume, labels, folder / "labelsTr" / f"tiny_{case:03d}.nii.gz")
    dataset = {
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, **TS_LABELS},
        "numTraining": n_cases,
        "file_ending": ".nii.gz",
        "name": "segnode tiny synthetic abdomen",
    }
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))


def _shrink_plans(plans_file: Path) -> None:
    """Make the planned 3d_fullres network tiny (few feature maps, batch 2)."""
    plans = json.loads(plans_file.read_text())
    plans["configurations"] = {"3d_fullres": plans["configurations"]["3d_fullres"]}
    cfg = plans["configurations"]["3d_fullres"]
    kwargs = cfg["architecture"]["arch_kwargs"]
    n = kwargs["n_stages"]
    kwargs["features_per_stage"] = [min(8 * 2**s, 32) for s in range(n)]
    kwargs["n_conv_per_stage"] = [1] * n
    kwargs["n_conv_per_stage_decoder"] = [1] * (n - 1)
    cfg["batch_size"] = 2
    cfg["patch_size"] = PATCH
    plans_file.write_text(json.dumps(plans, indent=2))


def _train(preprocessed: Path, epochs: int, iterations: int) -> Path:
    import torch
    from batchgeneratorsv2.transforms.utils.random import RandomTransform
    from nnunetv2.training.nnUNetTrainer.variants.training_length.nnUNetTrainer_Xepochs_NoMirroring import (
        nnUNetTrainer_4000epochs_NoMirroring,
    )

    class TinyTrainer(nnUNetTrainer_4000epochs_NoMirroring):
        """Short CPU training: a few epochs of a few iterations, Adam, no intensity augmentation.

        No mirroring (as TotalSegmentator's trainers): left and right organs
        must stay apart.
        """

        def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cpu")):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_epochs = epochs
            self.num_iterations_per_epoch = iterations
            self.num_val_iterations_per_epoch = 1
            self.initial_lr = 5e-3
            self.logger.plot_progress_png = lambda *args, **kwargs: None  # seaborn plot: seconds per epoch

        def configure_optimizers(self):
            optimizer = torch.optim.Adam(self.network.parameters(), lr=self.initial_lr)
            return optimizer, torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)

        @staticmethod
        def get_training_transforms(*args, **kwargs):
            compose = nnUNetTrainer_4000epochs_NoMirroring.get_training_transforms(*args, **kwargs)
            compose.transforms = [t for t in compose.transforms if not isinstance(t, RandomTransform)]
            return compose

    plans = json.loads((preprocessed / DATASET_NAME / "nnUNetPlans.json").read_text())
    plans["continue_training"] = False  # nnunetv2 2.8 pops this key in the trainer
    dataset_json = json.loads((preprocessed / DATASET_NAME / "dataset.json").read_text())
    # patch sampling and augmentation run in this process (nnUNet_n_proc_DA=0) on the global RNGs: seeded,
    # a rebuild on the same CPU family gives the same model (another family's float kernels may not)
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    trainer = TinyTrainer(plans, "3d_fullres", 0, dataset_json, device=torch.device("cpu"))
    trainer.run_training()
    return Path(trainer.output_folder).parent


def build_tiny_nnunet(workdir: Path, n_cases: int = 8, epochs: int = TRAIN_EPOCHS,
                      iterations: int = TRAIN_ITERATIONS) -> Path:
    """Train the tiny nnU-Net v2 once; return its model folder.

    The checkpoint's trainer name is set to ``nnUNetTrainer`` so that the
    predictor finds the class in nnunetv2 (the short trainer only changes the
    training schedule, not the network).
    """
    model = workdir / "nnunet_model"
    if (model / "fold_0" / "checkpoint_final.pth").exists():
        return model
    import torch

    raw, pre, res = (workdir / "nnunet_work" / d for d in ("raw", "preprocessed", "results"))
    for d in (raw, pre, res):
        d.mkdir(parents=True, exist_ok=True)
    env = {"nnUNet_raw": str(raw), "nnUNet_preprocessed": str(pre), "nnUNet_results": str(res),
           "nnUNet_n_proc_DA": "1", "nnUNet_compile": "false"}
    with _environ(**env):
        from nnunetv2.experiment_planning.plan_and_preprocess_api import (
            extract_fingerprints,
            plan_experiments,
            preprocess,
        )

        _write_raw_dataset(raw, n_cases)
        extract_fingerprints([DATASET_ID], num_processes=1, check_dataset_integrity=True,
                             verbose=False, show_progress_bar=False)
        plan_experiments([DATASET_ID])
        _shrink_plans(pre / DATASET_NAME / "nnUNetPlans.json")
        preprocess([DATASET_ID], configurations=("3d_fullres",), num_processes=(1,), verbose=False)
        with _environ(nnUNet_n_proc_DA="0"):  # augment in-process (planning needs >= 1)
            trained = _train(pre, epochs, iterations)
    staging = workdir / "nnunet_model.partial"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "fold_0").mkdir(parents=True)
    for name in ("dataset.json", "plans.json"):
        shutil.copy2(trained / name, staging / name)
    checkpoint = torch.load(trained / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    checkpoint["trainer_name"] = "nnUNetTrainer"
    checkpoint.pop("optimizer_state", None)  # not needed for inference; keeps the fixture small
    torch.save(checkpoint, staging / "fold_0" / "checkpoint_final.pth")
    staging.rename(model)
    return model


def place_in_totalsegmentator_layout(model: Path, dest: Path) -> Path:
    """Copy ``model`` under TotalSegmentator's folder names for ``total`` fast and fastest.

    ``dest`` plays ``TOTALSEG_WEIGHTS_PATH``; returns it.
    """
    import torch

    for folder in TS_FOLDERS.values():
        target = dest / folder / f"{TS_TRAINER}__nnUNetPlans__3d_fullres"
        if (target / "fold_0" / "checkpoint_final.pth").exists():
            continue
        (target / "fold_0").mkdir(parents=True, exist_ok=True)
        for name in ("dataset.json", "plans.json"):
            shutil.copy2(model / name, target / name)
        checkpoint = torch.load(model / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
        checkpoint["trainer_name"] = TS_TRAINER
        torch.save(checkpoint, target / "fold_0" / "checkpoint_final.pth")
    return dest


def zip_folder(folder: Path, zip_path: Path, arcroot: str | None = None) -> Path:
    """Zip ``folder`` (entries under ``arcroot``/, default the folder's name)."""
    root = arcroot if arcroot is not None else folder.name
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, f"{root}/{path.relative_to(folder).as_posix()}" if root else
                         path.relative_to(folder).as_posix())
    return zip_path


# --------------------------------------------------------------------------- MONAI


MONAI_NET = {"spatial_dims": 3, "in_channels": 1, "out_channels": 6, "channels": [8, 16, 32], "strides": [2, 2],
             "num_res_units": 0}
MONAI_STEPS = 400


def _tiny_monai_net():
    from monai.networks.nets import UNet

    return UNet(**MONAI_NET)


@functools.cache
def _fitted_monai_state(steps: int = MONAI_STEPS) -> dict:
    """Train the tiny MONAI UNet on random 32-voxel crops of four phantoms (as MONAI training does),
    in the layout the backend feeds it (RAS ``x, y, z``); return its state dict."""
    import torch
    from monai.losses import DiceCELoss
    from segnode.models.monai import labels_to_network_array, to_network_array
    from segnode.profiles.schema import MonaiOptions

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    cases = []
    for seed in range(2000, 2004):
        volume, labels = synthetic_case(seed)
        cases.append((to_network_array(volume, MonaiOptions())[0], labels_to_network_array(labels, volume)))
    net = _tiny_monai_net()
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    net.train()
    for _ in range(steps):
        xs, ys = [], []
        for _ in range(2):
            data, labels = cases[rng.integers(len(cases))]
            x0, y0 = rng.integers(0, data.shape[0] - 31), rng.integers(0, data.shape[1] - 31)
            xs.append(data[x0:x0 + 32, y0:y0 + 32, :32])
            ys.append(labels[x0:x0 + 32, y0:y0 + 32, :32])
        opt.zero_grad()
        loss = loss_fn(net(torch.from_numpy(np.stack(xs))[:, None]),
                       torch.from_numpy(np.stack(ys).astype(np.int64))[:, None])
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def build_tiny_monai_bundle(workdir: Path, steps: int = MONAI_STEPS) -> Path:
    """A MONAI bundle directory: ``configs/inference.json``, ``configs/metadata.json``,
    ``models/model.pt`` (state dict)."""
    bundle = workdir / "monai_bundle"
    if (bundle / "models" / "model.pt").exists():
        return bundle
    import torch

    (bundle / "configs").mkdir(parents=True, exist_ok=True)
    (bundle / "models").mkdir(parents=True, exist_ok=True)
    torch.save(_fitted_monai_state(steps), bundle / "models" / "model.pt")
    inference = {"network_def": {"_target_": "monai.networks.nets.UNet", **MONAI_NET}, "network": "$@network_def"}
    metadata = {
        "version": "0.1.0", "name": "segnode tiny abdomen",
        "network_data_format": {"outputs": {"pred": {"channel_def": {
            "0": "background", **{str(v): k for k, v in TS_LABELS.items()}}}}},
    }
    (bundle / "configs" / "inference.json").write_text(json.dumps(inference, indent=2))
    (bundle / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=2))
    return bundle


def build_tiny_torchscript(workdir: Path, steps: int = MONAI_STEPS) -> Path:
    """The same tiny MONAI network saved as a TorchScript file."""
    path = workdir / "monai_tiny.ts"
    if path.exists():
        return path
    import torch

    net = _tiny_monai_net()
    net.load_state_dict(_fitted_monai_state(steps))
    torch.jit.script(net.eval()).save(str(path))
    return path


# --------------------------------------------------------------------------- profiles and weights

ABDOMEN_PROFILE = """\
organ: abdomen
description: Tiny synthetic abdomen (backend tests)
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
  totalsegmentator: {{task: total, resolution: {resolution}, roi_subset: {roi_subset}}}
  nnunet: {{model: tiny_abdomen, folds: [0], tile_step_size: 0.5, use_mirroring: false, orientation: ras}}
  monai: {{model: {monai_model}, roi_size: [32, 32, 32], overlap: 0.25}}
"""


def abdomen_profile_file(folder: Path, model_type: str = "nnunet", resolution: str = "fastest",
                         roi_subset: str = "null", monai_model: str = "tiny_bundle") -> Path:
    """Write ``abdomen.yaml`` (the profile the tiny models are trained for) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "abdomen.yaml"
    path.write_text(ABDOMEN_PROFILE.format(model_type=model_type, resolution=resolution, roi_subset=roi_subset,
                                           monai_model=monai_model))
    return path


def import_all(models: dict[str, Path], root: Path) -> Path:
    """Import every tiny model into the weights directory ``root`` with segnode's importer."""
    from segnode.models.weights import import_weights
    from segnode.profiles.schema import Backend

    if (root / ".complete").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    import_weights(models["nnunet"], root, backend=Backend.NNUNET, name="tiny_abdomen")
    for folder in TS_FOLDERS.values():
        import_weights(models["ts_weights"] / folder, root, backend=Backend.TOTALSEGMENTATOR)
    import_weights(models["monai_bundle"], root, backend=Backend.MONAI, name="tiny_bundle")
    import_weights(models["monai_torchscript"], root, backend=Backend.MONAI, name="tiny_script")
    (root / ".complete").touch()
    return root


# --------------------------------------------------------------------------- committed models


#: what :func:`build_all` writes, by the name the fixtures use
MODEL_PATHS = {"nnunet": "nnunet_model", "monai_bundle": "monai_bundle", "monai_torchscript": "monai_tiny.ts"}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): _sha256(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != MANIFEST}


def build_all(out: Path, *, quick: bool = False) -> dict[str, Path]:
    """Train every tiny model into ``out`` and write its ``MANIFEST.json``; return their paths.

    ``quick``: a few iterations only, to prove the script runs (not for use).
    """
    import torch

    epochs, iterations, steps = (1, 2, 2) if quick else (TRAIN_EPOCHS, TRAIN_ITERATIONS, MONAI_STEPS)
    out.mkdir(parents=True, exist_ok=True)
    work = out / ".work"
    paths = {"nnunet": build_tiny_nnunet(work, epochs=epochs, iterations=iterations),
             "monai_bundle": build_tiny_monai_bundle(work, steps),
             "monai_torchscript": build_tiny_torchscript(work, steps)}
    for name, path in paths.items():
        target = out / MODEL_PATHS[name]
        if target.is_dir():
            shutil.rmtree(target)
        target.unlink(missing_ok=True)
        shutil.move(path, target)
    shutil.rmtree(work)
    manifest = {
        "made_by": "python tests/dl_fixtures.py" + (" --quick" if quick else "") + " OUT",
        "seeds": {"nnunet_cases": [1000, 1000 + 7], "nnunet_training": 0, "monai_cases": [2000, 2003],
                  "monai_training": 0},
        "parameters": {"shape": SHAPE, "spacing": SPACING, "patch": PATCH, "epochs": epochs,
                       "iterations_per_epoch": iterations, "monai_net": MONAI_NET, "monai_steps": steps},
        "built_with": {**{lib: version(lib) for lib in ("torch", "nnunetv2", "monai", "numpy")},
                       "cpu_capability": torch.backends.cpu.get_cpu_capability()},
        "files_sha256": _files(out),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return {name: out / rel for name, rel in MODEL_PATHS.items()}


def committed_models(root: Path = COMMITTED) -> dict[str, Path]:
    """Paths of the committed tiny models, after checking every file against the manifest."""
    manifest = json.loads((root / MANIFEST).read_text())
    if _files(root) != manifest["files_sha256"]:
        raise AssertionError(f"{root} does not match its {MANIFEST}: rebuild with python tests/dl_fixtures.py {root}")
    return {name: root / rel for name, rel in MODEL_PATHS.items()}


@functools.cache
def built_models(base: Path) -> dict[str, Path]:
    """The committed models, and the nnU-Net one placed in TotalSegmentator's layout under ``base``."""
    models = committed_models()
    return {**models, "ts_weights": place_in_totalsegmentator_layout(models["nnunet"], base / "ts_weights")}


try:  # pytest fixtures, when imported by a test module
    import pytest

    @pytest.fixture(scope="session")
    def dl_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
        """Paths of the tiny models (committed; read-only)."""
        return built_models(tmp_path_factory.getbasetemp() / "dl_models")

    @pytest.fixture(scope="session")
    def dl_weights(dl_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
        """A weights directory with every tiny model imported (pristine: copy before corrupting)."""
        return import_all(dl_models, tmp_path_factory.getbasetemp() / "dl_weights")
except ImportError:  # pragma: no cover - script use without pytest
    pass


def _main(argv: list[str]) -> int:
    quick = "--quick" in argv
    args = [a for a in argv if a != "--quick"]
    if len(args) != 1:
        print("usage: python tests/dl_fixtures.py [--quick] OUT_DIR", file=sys.stderr)
        return 2
    for name, path in build_all(Path(args[0]).resolve(), quick=quick).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
