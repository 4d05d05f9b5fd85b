"""Run an nnU-Net model folder over a folder of CT images, timing each case.

Used to evaluate a model on a dataset split (``segnode evaluate --dataset``,
``segnode train``, ``segnode models compare``).  Each call runs in a fresh
process (``spawn``) so that its peak memory is its own: the figure reported is
the child's peak resident memory (and CUDA's peak allocation on a GPU).

A model is any nnU-Net v2 model folder (``dataset.json``, ``plans.json``,
``fold_N/``): an imported or fine-tuned nnU-Net model, or one run folder of a
TotalSegmentator task.  Predictions keep every label of the model's
``dataset.json``, on the image's own grid.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from segnode.errors import BackendError, InputError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PredictionStats:
    """Speed and memory of one model over a folder of cases."""

    cases: int
    seconds_per_case: float
    peak_rss_mb: float
    peak_gpu_mb: float | None
    device: str

    @property
    def minutes_per_scan(self) -> float:
        return self.seconds_per_case / 60.0


def model_labels(model_folder: Path) -> dict[int, str]:
    """``{value: name}`` of a model folder's ``dataset.json``."""
    from segnode.models.segmentation_io import load_labels_file

    return load_labels_file(Path(model_folder) / "dataset.json")


def _folds(model_folder: Path, checkpoint: str) -> tuple[int | str, ...]:
    folds = []
    for folder in sorted(model_folder.glob("fold_*")):
        if (folder / checkpoint).is_file():
            name = folder.name[len("fold_"):]
            folds.append(int(name) if name.isdigit() else name)
    if not folds:
        raise InputError(f"no fold_N/{checkpoint} in the model folder", where=str(model_folder))
    return tuple(folds)


def _predict(model_folder: str, images: list[str], out_dir: str, device: str, threads: int | None,
             checkpoint: str, result_file: str) -> None:
    """Child process body: predict every image, write label maps and a stats JSON."""
    import nibabel as nib
    import numpy as np
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from segnode.models.io_nifti import load_nifti, ras_affine, volume_from_nifti

    if threads:
        torch.set_num_threads(threads)
    folder = Path(model_folder)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=device != "cpu", device=torch.device(device),
                                verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(folder), use_folds=_folds(folder, checkpoint),
                                                   checkpoint_name=checkpoint)
    seconds = []
    for image in images:
        volume = volume_from_nifti(load_nifti(image))
        start = time.perf_counter()
        data = np.asarray(volume.hu, dtype=np.float32)[None]
        props = {"spacing": [float(volume.spacing[2]), float(volume.spacing[1]), float(volume.spacing[0])]}
        with torch.inference_mode():
            labels = np.asarray(predictor.predict_single_npy_array(data, props, None, None, False))
        seconds.append(time.perf_counter() - start)
        case = Path(image).name.removesuffix(".nii.gz").removesuffix("_0000")
        out = nib.Nifti1Image(np.ascontiguousarray(labels.transpose(2, 1, 0)).astype(np.uint8), ras_affine(volume))
        nib.save(out, Path(out_dir) / f"{case}.nii.gz")
        print(f"[segnode predict] {case}: {seconds[-1]:.1f} s", flush=True)
    gpu = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None
    stats = PredictionStats(len(images), float(np.mean(seconds)) if seconds else 0.0,
                            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, gpu, device)
    Path(result_file).write_text(json.dumps(asdict(stats)))


def predict_folder(model_folder: Path, images_dir: Path, out_dir: Path, *, device: str = "cpu",
                   threads: int | None = None, checkpoint: str = "checkpoint_final.pth") -> PredictionStats:
    """Predict every ``*_0000.nii.gz`` under ``images_dir`` into ``out_dir/CASE.nii.gz``."""
    images = sorted(str(p) for p in Path(images_dir).glob("*_0000.nii.gz"))
    if not images:
        raise InputError("no images (*_0000.nii.gz)", where=str(images_dir))
    _folds(Path(model_folder), checkpoint)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = out_dir / ".prediction_stats.json"
    result.unlink(missing_ok=True)
    context = multiprocessing.get_context("spawn")
    process = context.Process(target=_predict, args=(str(model_folder), images, str(out_dir), device, threads,
                                                     checkpoint, str(result)))
    process.start()
    process.join()
    if process.exitcode != 0 or not result.exists():
        raise BackendError(f"prediction failed (exit code {process.exitcode})", where=str(model_folder))
    stats = PredictionStats(**json.loads(result.read_text()))
    result.unlink()
    logger.info("%s: %d cases, %.1f s/case, peak RSS %.0f MB", model_folder, stats.cases, stats.seconds_per_case,
                stats.peak_rss_mb)
    return stats
