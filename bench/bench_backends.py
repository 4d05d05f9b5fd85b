"""Benchmark the deep-learning backends on a 512×512×300 CT against the models' own tools, paired.

Usage::

    .venv/bin/python bench/bench_backends.py [--device cpu|cuda|auto] [--pairs totalsegmentator,nnunet,monai]
                                             [--engines auto] [--slices 300] [--size 512] [--warm 2]
                                             [--work bench/out/backends]

Models are networks of real size with random weights (the compute does not depend on the
weights), imported with segnode's own importer into a weights folder under ``--work``:

* ``totalsegmentator``: nnU-Net's default 3d_fullres topology (6 stages, 32–320 features,
  2 convolutions per stage, patch 128³, 118 outputs: TotalSegmentator ``total``), placed as
  ``Dataset297_TotalSegmentator_total_3mm_1559subj`` so ``totalsegmentator(fast=True)`` runs it;
* ``nnunet``: the same topology with 6 outputs (a five-organ model), 3 mm, no mirroring;
* ``monai``: a bundle like MONAI's spleen model (UNet 16–256, residual units, roi 96³,
  1.5 mm), 6 outputs.

Each pair runs in a fresh process (as a job does in the node) and holds its rows loaded side by
side; the warm studies then alternate between the rows (A B A B ...), so that a machine shared
with other work slows every row alike:

* ``totalsegmentator``: TotalSegmentator's own Python API (``totalsegmentator()``, fast) against
  segnode's backend with each ``--engines`` engine (in process, ``models/ts_inprocess.py``);
* ``nnunet``: nnU-Net's own predictor as its CLI uses it (``predict_from_files`` on a NIfTI file
  written by SimpleITK, its worker processes) against segnode's backend per engine;
* ``monai``: segnode's backend per engine (fp32 first: the reference).

Per row: load (cold ``ModelCache.get``: verify + build), first study, best warm study, the peak
memory during its studies (PSS of the process and its helper processes, sampled from /proc; it
includes the other rows' loaded models),
and parity with the pair's reference row: the smallest Dice over the labels and the fraction of
voxels with the same label; on CUDA also torch's peak allocated GPU memory of the pair's process.  Figures are printed as a table and written to ``WORK/results_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TS_FOLDER = "Dataset297_TotalSegmentator_total_3mm_1559subj"
TS_RUN = "nnUNetTrainer_4000epochs_NoMirroring__nnUNetPlans__3d_fullres"
ORGANS = {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "gallbladder": 4, "liver": 5}
#: the profile's tissues' model labels, in order (segment numbers 1..4)
TISSUE_LABELS = (5, 1, 2, 3)

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


# --------------------------------------------------------------------------- memory sampling


def _pss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return 0.0


def _tree_rss_mb(pid: int) -> float:
    """Proportional set size (PSS: shared pages split between their users) of ``pid`` and its descendants."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in tree:
                tree.add(child)
                frontier.append(child)
    return sum(_pss_mb(p) for p in tree)


class PeakSampler:
    """Peak resident memory of this process tree while the ``with`` block runs."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval, self.peak_mb = interval, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, _tree_rss_mb(os.getpid()))
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, _tree_rss_mb(os.getpid()))


# --------------------------------------------------------------------------- rows (child)


class Row:
    """One way of segmenting the CT: a name and a function volume -> label array on its grid."""

    def __init__(self, name: str, segment, load_s: float, note: str = "") -> None:
        self.name, self.segment, self.load_s, self.note = name, segment, load_s, note
        self.times: list[float] = []
        self.peak_mb = 0.0
        self.labels = None

    def run(self, volume) -> None:
        with PeakSampler() as sampler:
            t0 = time.perf_counter()
            labels = self.segment(volume)
            self.times.append(time.perf_counter() - t0)
        self.peak_mb = max(self.peak_mb, sampler.peak_mb)
        if self.labels is None:
            self.labels = labels


def _segnode_row(backend: str, engine: str, profile, device: str, threads, work: Path, extra=None) -> Row:
    from segnode.models.base import RunSettings
    from segnode.models.cache import ModelCache

    settings = RunSettings(device=device, threads=threads, weights_dir=work / "weights", engine=engine,
                           extra=dict(extra or {}))
    t0 = time.perf_counter()
    model = ModelCache(max_models=1).get(backend, profile, settings)
    load_s = time.perf_counter() - t0
    used = getattr(model, "engine", None)
    name = f"segnode {backend} {engine}" + (f" (ran {used.value})" if used is not None and used.value != engine else "")
    return Row(name, lambda v: model.segment(v).array, load_s)


def _nnunet_own_row(work: Path, device: str, threads) -> Row:
    """nnU-Net's own predictor as ``nnUNetv2_predict`` runs it: files in, files out, worker processes."""
    import SimpleITK as sitk
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from segnode.models.weights import find_model, weights_root
    from segnode.profiles.schema import Backend

    record = find_model(weights_root(work / "weights"), Backend.NNUNET, "bench_nnunet")
    t0 = time.perf_counter()
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=device != "cpu", device=torch.device(device),
                                verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(record.path), use_folds=(0,))
    load_s = time.perf_counter() - t0
    lut = np.zeros(256, dtype=np.uint8)
    for value, label in enumerate(TISSUE_LABELS, start=1):
        lut[label] = value

    def segment(volume) -> np.ndarray:
        with tempfile.TemporaryDirectory(prefix="nnunet-own-") as tmp:
            image = sitk.GetImageFromArray(np.asarray(volume.hu))
            image.SetSpacing(tuple(float(s) for s in volume.spacing))
            Path(tmp, "in").mkdir()
            sitk.WriteImage(image, f"{tmp}/in/case_0000.nii.gz")
            predictor.predict_from_files(f"{tmp}/in", f"{tmp}/out", save_probabilities=False, overwrite=True,
                                         num_processes_preprocessing=2, num_processes_segmentation_export=2)
            out = sitk.GetArrayFromImage(sitk.ReadImage(f"{tmp}/out/case.nii.gz"))
        return lut[out]

    return Row("nnU-Net's own predictor (predict_from_files)", segment, load_s)


def _ts_own_row(profile, device: str, threads, work: Path) -> Row:
    from segnode.models.totalsegmentator import RUNNER_KEY

    row = _segnode_row("totalsegmentator", "fp32", profile, device, threads, work, {RUNNER_KEY: "api"})
    row.name = "TotalSegmentator's own API (fast)"
    return row


def parity(reference: np.ndarray, candidate: np.ndarray) -> tuple[float, float]:
    """(smallest Dice over the labels present, fraction of voxels with the same label)."""
    from segnode.models.parity import dice_per_label

    dice = dice_per_label(reference, candidate)
    return (min(dice.values()) if dice else 1.0), float(np.mean(reference == candidate))


def run_pair(pair: str, work: Path, device: str, threads: int | None, warm: int, slices: int, size: int,
             engines: list[str]) -> list[dict]:
    import torch
    from segnode.models.volume import Volume
    from segnode.profiles import load_profile

    meta = json.loads((work / "ct.json").read_text())
    volume = Volume(hu=np.load(work / f"ct_{size}x{size}x{slices}.npy"), spacing=tuple(meta["spacing"]),
                    origin=tuple(meta["origin"]), direction=np.eye(3))
    profile = load_profile(work / "benchabdomen.yaml")
    rows: list[Row] = []
    if pair == "totalsegmentator":
        rows.append(_ts_own_row(profile, device, threads, work))
    elif pair == "nnunet":
        rows.append(_nnunet_own_row(work, device, threads))
    rows += [_segnode_row(pair, e, profile, device, threads, work) for e in engines]
    for row in rows:  # first studies
        row.run(volume)
    for _ in range(warm):  # warm studies, alternating
        for row in rows:
            row.run(volume)
    out = []
    for row in rows:
        dice, agreement = parity(rows[0].labels, row.labels)
        out.append({
            "pair": pair, "row": row.name, "device": device, "load_s": round(row.load_s, 2),
            "first_study_s": round(row.times[0], 2),
            "warm_study_s": round(min(row.times[1:]), 2) if len(row.times) > 1 else None,
            "warm_runs": len(row.times) - 1, "peak_rss_mb": round(row.peak_mb),
            "min_dice_vs_ref": round(dice, 6), "agreement_vs_ref": round(agreement, 6),
            "reference": rows[0].name, "threads": torch.get_num_threads(),
            "labelled_voxels": int((row.labels > 0).sum()),
            "peak_gpu_mb_pair": round(torch.cuda.max_memory_allocated() / 2**20) if torch.cuda.is_available() else None,
        })
    return out


# --------------------------------------------------------------------------- parent


def _print_table(results: list[dict], args: argparse.Namespace) -> None:
    print(f"\n{args.size}x{args.size}x{args.slices} CT, {os.cpu_count()} CPU cores, device {args.device}, "
          f"warm studies alternate between the rows of a pair")
    print(f"{'row':<52}{'load s':>8}{'1st s':>8}{'warm s':>8}{'x ref':>7}{'peak MB':>9}{'min Dice':>10}"
          f"{'agree':>10}")
    ref_time: dict[str, float] = {}
    for r in results:
        if "error" in r:
            print(f"{r['pair']:<52}FAILED")
            continue
        ref_time.setdefault(r["pair"], r["warm_study_s"] or r["first_study_s"])
        ratio = (r["warm_study_s"] or r["first_study_s"]) / ref_time[r["pair"]]
        print(f"{r['row']:<52}{r['load_s']:>8}{r['first_study_s']:>8}{str(r['warm_study_s']):>8}{ratio:>7.2f}"
              f"{r['peak_rss_mb']:>9}{r['min_dice_vs_ref']:>10}{r['agreement_vs_ref']:>10}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--pairs", "--backends", dest="pairs", default="totalsegmentator,nnunet,monai")
    parser.add_argument("--engines", default="auto", help="segnode engines per pair (comma separated)")
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--warm", type=int, default=2, help="warm rounds (each row once per round) after the first")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "backends")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    engines = args.engines.split(",")
    if args.child:
        rows = run_pair(args.child, args.work, args.device, args.threads, args.warm, args.slices, args.size, engines)
        print("RESULT " + json.dumps(rows), flush=True)
        return 0

    print(f"preparing {args.size}x{args.size}x{args.slices} CT and real-size random-weight models in {args.work}",
          flush=True)
    prepare(args.work, args.slices, args.size)
    results: list[dict] = []
    for pair in args.pairs.split(","):
        print(f"running {pair} on {args.device} ...", flush=True)
        cmd = [sys.executable, __file__, "--child", pair, "--device", args.device, "--work", str(args.work),
               "--warm", str(args.warm), "--slices", str(args.slices), "--size", str(args.size),
               "--engines", args.engines]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(f"  {pair} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", flush=True)
            results.append({"pair": pair, "error": proc.stderr[-500:]})
            continue
        for row in json.loads(lines[-1][len("RESULT "):]):
            results.append(row)
            print(f"  {row}", flush=True)
    _print_table(results, args)
    (args.work / f"results_{args.device}.json").write_text(json.dumps(results, indent=2))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
