"""Benchmark the deep-learning backends on a 512×512×300 CT: load time, time per study
(cold and warm), peak memory.

Usage::

    .venv/bin/python bench/bench_backends.py [--device cpu|cuda|auto] [--backends totalsegmentator,nnunet,monai]
                                             [--slices 300] [--size 512] [--warm 1] [--work bench/out/backends]

Models are networks of real size with random weights (the compute does not depend on the
weights), imported with segnode's own importer into a weights folder under ``--work``:

* ``totalsegmentator``: nnU-Net's default 3d_fullres topology (6 stages, 32–320 features,
  2 convolutions per stage, patch 128³, 118 outputs: TotalSegmentator ``total``), placed as
  ``Dataset297_TotalSegmentator_total_3mm_1559subj`` so ``totalsegmentator(fast=True)`` runs it;
* ``nnunet``: the same topology with 6 outputs (a five-organ model), 3 mm, no mirroring;
* ``monai``: a bundle like MONAI's spleen model (UNet 16–256, residual units, roi 96³,
  1.5 mm), 6 outputs.

Each backend runs in a fresh process (as a job does in the node): import, then a
:class:`segnode.models.cache.ModelCache` ``get`` (cold: verify every weights file, build, load),
one segmentation, then a second ``get`` (warm: a hit) and ``--warm`` more segmentations.
Peak memory is the child's maximum resident set (and of its own helper processes, e.g.
TotalSegmentator's spawned pre-processing and export workers), and on CUDA the peak
allocated by torch.  Figures are printed as a table and written to ``WORK/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TS_FOLDER = "Dataset297_TotalSegmentator_total_3mm_1559subj"
TS_RUN = "nnUNetTrainer_4000epochs_NoMirroring__nnUNetPlans__3d_fullres"
ORGANS = {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "gallbladder": 4, "liver": 5}

PROFILE = """\
organ: benchabdomen
description: Benchmark profile (random-weight networks of real size)
model_type: totalsegmentator
fallback: []
tissues:
- {name: liver, description: Liver, codes_from: liver, totalsegmentator: [liver], label: 5}
- {name: spleen, description: Spleen, codes_from: spleen, totalsegmentator: [spleen], label: 1}
- {name: kidney_right, description: Right kidney, codes_from: kidney_right, totalsegmentator: [kidney_right], label: 2}
- {name: kidney_left, description: Left kidney, codes_from: kidney_left, totalsegmentator: [kidney_left], label: 3}
options:
  totalsegmentator: {task: total, resolution: fast}
  nnunet: {model: bench_nnunet, folds: [0], use_mirroring: false, tile_step_size: 0.5}
  monai: {model: bench_monai, roi_size: [96, 96, 96], sw_batch_size: 1, overlap: 0.25,
          target_spacing: [1.5, 1.5, 1.5], hu_window: [-57, 164]}
"""


# --------------------------------------------------------------------------- models


def _plans(name: str, spacing: float) -> dict:
    n = 6
    return {
        "dataset_name": name, "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [spacing] * 3,
        "original_median_shape_after_transp": [128, 128, 128],
        "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": {
            "max": 3071.0, "mean": 100.0, "median": 80.0, "min": -1024.0, "percentile_00_5": -1000.0,
            "percentile_99_5": 1500.0, "std": 300.0}},
        "configurations": {"3d_fullres": {
            "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
            "batch_size": 2, "patch_size": [128, 128, 128], "median_image_size_in_voxels": [128.0, 128.0, 128.0],
            "spacing": [spacing] * 3, "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
            "resampling_fn_data": "resample_data_or_seg_to_shape",
            "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
            "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                   "force_separate_z": None},
            "architecture": {
                "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                "arch_kwargs": {
                    "n_stages": n, "features_per_stage": [32, 64, 128, 256, 320, 320],
                    "conv_op": "torch.nn.modules.conv.Conv3d", "kernel_sizes": [[3, 3, 3]] * n,
                    "strides": [[1, 1, 1]] + [[2, 2, 2]] * (n - 1), "n_conv_per_stage": [2] * n,
                    "n_conv_per_stage_decoder": [2] * (n - 1), "conv_bias": True,
                    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                    "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
                    "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
                "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
            "batch_dice": False}},
    }


def _nnunet_folder(folder: Path, name: str, labels: dict[str, int], spacing: float, trainer: str) -> Path:
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    plans = _plans(name, spacing)
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    torch.manual_seed(0)
    net = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                 1, len(labels), deep_supervision=False)
    (folder / "fold_0").mkdir(parents=True, exist_ok=True)
    (folder / "plans.json").write_text(json.dumps(plans, indent=1))
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": labels,
                                                     "numTraining": 1, "file_ending": ".nii.gz"}))
    torch.save({"network_weights": net.state_dict(), "trainer_name": trainer,
                "init_args": {"configuration": "3d_fullres"}, "inference_allowed_mirroring_axes": None},
               folder / "fold_0" / "checkpoint_final.pth")
    print(f"  built {folder} ({sum(p.numel() for p in net.parameters()) / 1e6:.1f} M parameters)", flush=True)
    return folder


def _monai_bundle(folder: Path) -> Path:
    import torch
    from monai.networks.nets import UNet

    kwargs = {"spatial_dims": 3, "in_channels": 1, "out_channels": 6, "channels": [16, 32, 64, 128, 256],
              "strides": [2, 2, 2, 2], "num_res_units": 2, "norm": "batch"}
    torch.manual_seed(0)
    net = UNet(**kwargs)
    (folder / "configs").mkdir(parents=True, exist_ok=True)
    (folder / "models").mkdir(parents=True, exist_ok=True)
    (folder / "configs" / "inference.json").write_text(json.dumps(
        {"network_def": {"_target_": "monai.networks.nets.UNet", **kwargs}}, indent=1))
    torch.save(net.state_dict(), folder / "models" / "model.pt")
    print(f"  built {folder} ({sum(p.numel() for p in net.parameters()) / 1e6:.1f} M parameters)", flush=True)
    return folder


def prepare(work: Path, slices: int, size: int) -> None:
    """The CT (``ct.npy``), the profile and the imported weights, built once per work folder."""
    import numpy as np
    from segnode.models.weights import import_weights
    from segnode.profiles.schema import Backend

    work.mkdir(parents=True, exist_ok=True)
    (work / "benchabdomen.yaml").write_text(PROFILE)
    ct = work / f"ct_{size}x{size}x{slices}.npy"
    if not ct.exists():
        from tests.dl_fixtures import synthetic_case

        spacing = (0.8, 0.8, 1.0)
        volume, _ = synthetic_case(seed=1, shape=(slices, size, size), spacing=spacing)
        np.save(ct, volume.hu)
        (work / "ct.json").write_text(json.dumps({"spacing": spacing, "origin": volume.origin}))
    weights = work / "weights"
    if (weights / ".complete").exists():
        return
    models = work / "models"
    from totalsegmentator.map_to_binary import class_map

    ts_labels = {"background": 0, **{name: value for value, name in class_map["total"].items()}}
    _nnunet_folder(models / TS_FOLDER / TS_RUN, TS_FOLDER, ts_labels, 3.0, "nnUNetTrainer_4000epochs_NoMirroring")
    _nnunet_folder(models / "bench_nnunet", "Dataset900_Bench", {"background": 0, **ORGANS}, 3.0, "nnUNetTrainer")
    _monai_bundle(models / "bench_monai")
    import_weights(models / TS_FOLDER, weights, backend=Backend.TOTALSEGMENTATOR)
    import_weights(models / "bench_nnunet", weights, backend=Backend.NNUNET, name="bench_nnunet")
    import_weights(models / "bench_monai", weights, backend=Backend.MONAI, name="bench_monai")
    (weights / ".complete").touch()


# --------------------------------------------------------------------------- one backend (child)


def _peak_mb() -> tuple[float, float]:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    helpers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return own, helpers


def run_child(backend: str, work: Path, device: str, threads: int | None, warm: int, slices: int,
              size: int) -> dict:
    t0 = time.perf_counter()
    import numpy as np
    import torch
    from segnode.models.base import RunSettings
    from segnode.models.cache import ModelCache
    from segnode.models.volume import Volume
    from segnode.profiles import load_profile

    import_s = time.perf_counter() - t0
    meta = json.loads((work / "ct.json").read_text())
    volume = Volume(hu=np.load(work / f"ct_{size}x{size}x{slices}.npy"), spacing=tuple(meta["spacing"]),
                    origin=tuple(meta["origin"]), direction=np.eye(3))
    profile = load_profile(work / "benchabdomen.yaml")
    settings = RunSettings(device=device, threads=threads, weights_dir=work / "weights")
    cache = ModelCache(max_models=1)
    t0 = time.perf_counter()
    model = cache.get(backend, profile, settings)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    labels = model.segment(volume)
    cold_s = time.perf_counter() - t0
    warm_get, warm_times = [], []
    for _ in range(warm):
        t0 = time.perf_counter()
        again = cache.get(backend, profile, settings)
        warm_get.append(time.perf_counter() - t0)
        assert again is model
        t0 = time.perf_counter()
        again.segment(volume)
        warm_times.append(time.perf_counter() - t0)
    own, helpers = _peak_mb()
    gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {
        "backend": backend, "device": getattr(model, "device", device), "model_version": model.model_version,
        "import_s": round(import_s, 2), "load_s": round(load_s, 2), "first_study_s": round(cold_s, 2),
        "warm_get_s": round(max(warm_get, default=0.0), 4),
        "warm_study_s": round(min(warm_times), 2) if warm_times else None,
        "cold_process_total_s": round(import_s + load_s + cold_s, 2),
        "peak_rss_mb": round(own), "peak_helper_rss_mb": round(helpers),
        "peak_gpu_mb": round(gpu) if gpu is not None else None,
        "labelled_voxels": int((labels.array > 0).sum()), "threads": torch.get_num_threads(),
    }


# --------------------------------------------------------------------------- parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backends", default="totalsegmentator,nnunet,monai")
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--warm", type=int, default=1, help="warm segmentations after the first")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "backends")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        result = run_child(args.child, args.work, args.device, args.threads, args.warm, args.slices, args.size)
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    print(f"preparing {args.size}x{args.size}x{args.slices} CT and real-size random-weight models in {args.work}",
          flush=True)
    prepare(args.work, args.slices, args.size)
    results = []
    for backend in args.backends.split(","):
        print(f"running {backend} on {args.device} ...", flush=True)
        cmd = [sys.executable, __file__, "--child", backend, "--device", args.device, "--work", str(args.work),
               "--warm", str(args.warm), "--slices", str(args.slices), "--size", str(args.size)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(f"  {backend} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", flush=True)
            results.append({"backend": backend, "error": proc.stderr[-500:]})
            continue
        results.append(json.loads(lines[-1][len("RESULT "):]))
        print(f"  {results[-1]}", flush=True)

    header = (f"{'backend':<17}{'device':<8}{'import s':>9}{'load s':>8}{'1st study s':>12}{'warm get s':>11}"
              f"{'warm study s':>13}{'cold proc s':>12}{'peak RSS MB':>12}{'helpers MB':>11}{'GPU MB':>8}")
    print(f"\n{args.size}x{args.size}x{args.slices} CT, {os.cpu_count()} CPU cores\n" + header)
    for r in results:
        if "error" in r:
            print(f"{r['backend']:<17}FAILED")
            continue
        print(f"{r['backend']:<17}{r['device']:<8}{r['import_s']:>9}{r['load_s']:>8}{r['first_study_s']:>12}"
              f"{r['warm_get_s']:>11}{str(r['warm_study_s']):>13}{r['cold_process_total_s']:>12}"
              f"{r['peak_rss_mb']:>12}{r['peak_helper_rss_mb']:>11}{str(r['peak_gpu_mb']):>8}")
    (args.work / f"results_{args.device}.json").write_text(json.dumps(results, indent=2))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
