"""``segnode train``: fine-tune nnU-Net on a frozen dataset version and register the result.

1. export the frozen version ``NAME@VERSION`` in nnU-Net's raw layout with its
   patient-level train/test split (:mod:`segnode.storage.export_nnunet`), and write a
   patient-grouped cross-validation split for the training cases;
2. plan, preprocess and train in a child process (:mod:`segnode.models.nnunet_job`):
   nnU-Net's own planner (``--base none``) or the base model's plans and
   weights (``--base totalsegmentator`` / ``--base nnunet``: nnU-Net's
   pretrained-weights transfer, output layers new);
3. predict the held-out test cases and evaluate them (:mod:`segnode.models.evaluate`);
4. register the model under ``<weights>/finetuned/NAME/VERSION`` (NAME: the
   dataset's or ``--name``; VERSION: the dataset version's, or ``--name
   NAME/VERSION``) with a model card (JSON and Markdown) and a sha256 manifest
   of every file.

Everything lives in a work folder (default ``<weights>/.training/NAME/VERSION``);
running the same command again after an interruption resumes where it
stopped: finished stages are skipped and training continues from the last
epoch's checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

from segnode.errors import BackendError, ConfigError, WeightsError
from segnode.profiles.schema import Backend

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from segnode.models.evaluate import Evaluation
    from segnode.models.predict_cases import PredictionStats
    from segnode.models.segmentation_io import Grid
    from segnode.storage.dataset import DatasetStore

logger = logging.getLogger(__name__)

#: the TotalSegmentator task used as the base by default: ``total``, 3 mm (fast)
DEFAULT_TS_BASE = "Dataset297_TotalSegmentator_total_3mm_1559subj"
CARD_JSON = "model_card.json"
CARD_MD = "model_card.md"
CV_FOLDS = 5

Reporter = Callable[[str], None]


class BaseModel(str, Enum):
    """What training starts from."""

    NONE = "none"
    TOTALSEGMENTATOR = "totalsegmentator"
    NNUNET = "nnunet"


@dataclass(frozen=True)
class TrainOptions:
    """Everything ``segnode train`` needs; defaults are nnU-Net's except the schedule."""

    dataset: str
    store: Path
    base: BaseModel = BaseModel.NONE
    base_model: str | None = None
    configuration: str = "3d_fullres"
    epochs: int = 100
    iterations: int = 250
    val_iterations: int = 50
    initial_lr: float = 0.01
    fold: str = "0"
    device: str = "auto"
    threads: int | None = None
    processes: int = 2
    augmentation_workers: int | None = None
    dataset_id: int = 501
    test_fraction: float = 0.2
    name: str | None = None
    workdir: Path | None = None
    weights_dir: Path | None = None
    fresh: bool = False
    force: bool = False
    evaluate: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.iterations < 1 or self.val_iterations < 1:
            raise ConfigError("epochs and iterations must be at least 1")
        if self.fold != "all" and not self.fold.isdigit():
            raise ConfigError(f"--fold must be a number or 'all', got {self.fold!r}")
        if self.initial_lr <= 0:
            raise ConfigError("the learning rate must be positive")


@dataclass
class TrainResult:
    """The registered model, its card and where the work lies."""

    model_path: Path
    name: str
    weights_hash: str
    card: dict
    workdir: Path
    evaluation_dir: Path | None = None
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- base model


@dataclass(frozen=True)
class _Base:
    kind: BaseModel
    name: str
    folder: Path  # an nnU-Net model folder (dataset.json, plans.json, fold_N/)
    checkpoint: Path
    weights_hash: str


def resolve_base(options: TrainOptions, root: Path) -> _Base | None:
    """The base model's folder and checkpoint, or ``None`` for ``--base none``."""
    from segnode.models.weights import find_model, verify_or_raise

    if options.base is BaseModel.NONE:
        return None
    if options.base is BaseModel.NNUNET and not options.base_model:
        raise ConfigError("--base nnunet needs --base-model NAME (segnode models list)")
    backend = Backend.TOTALSEGMENTATOR if options.base is BaseModel.TOTALSEGMENTATOR else Backend.NNUNET
    name = options.base_model or DEFAULT_TS_BASE
    try:
        record = find_model(root, backend, name)
    except WeightsError as exc:
        raise WeightsError(f"--base {options.base.value} needs the pre-trained weights {name!r}, which are not "
                           f"installed: {exc.message}", where=str(root)) from exc
    verify_or_raise(record)
    folder = record.path
    if backend is Backend.TOTALSEGMENTATOR:  # task folder → its one <trainer>__<plans>__<config> run
        runs = sorted(p for p in folder.iterdir() if p.is_dir() and p.name.count("__") == 2)
        if len(runs) != 1:
            raise WeightsError(f"expected one <trainer>__<plans>__<config> folder, found {len(runs)}",
                               where=str(folder))
        folder = runs[0]
    checkpoints = sorted(folder.glob("fold_*/checkpoint_final.pth"))
    if not checkpoints:
        raise WeightsError("the base model has no fold_N/checkpoint_final.pth", where=str(folder))
    return _Base(options.base, name, folder, checkpoints[0], record.weights_hash)


# --------------------------------------------------------------------------- work folder


def _identity(options: TrainOptions, rows_hash: str, base: _Base | None) -> dict:
    """What must match for a work folder to be resumed."""
    return {
        "dataset": options.dataset, "rows_hash": rows_hash, "base": options.base.value,
        "base_weights": base.weights_hash if base else None, "configuration": options.configuration,
        "fold": options.fold, "dataset_id": options.dataset_id, "test_fraction": options.test_fraction,
    }


def _prepare_workdir(workdir: Path, identity: dict, fresh: bool, say: Reporter) -> None:
    run_file = workdir / "run.json"
    if fresh and workdir.exists():
        shutil.rmtree(workdir)
    if run_file.exists():
        previous = json.loads(run_file.read_text(encoding="utf-8"))
        if previous != identity:
            changed = sorted(k for k in identity if previous.get(k) != identity[k])
            raise ConfigError(f"the work folder holds another training ({', '.join(changed)} differ); "
                              "use --fresh to start over or --workdir for a new one", where=str(workdir))
        say(f"resuming the training in {workdir}")
        return
    workdir.mkdir(parents=True, exist_ok=True)
    run_file.write_text(json.dumps(identity, indent=2), encoding="utf-8")


def _export(options: TrainOptions, store: DatasetStore, raw: Path, say: Reporter) -> Path:
    from segnode.storage.export_nnunet import export_nnunet, parse_ref

    name, _ = parse_ref(options.dataset)
    folder = raw / f"Dataset{options.dataset_id:03d}_{name}"
    if (folder / "dataset.json").exists():
        return folder
    if folder.exists():  # an interrupted export: start it again
        shutil.rmtree(folder)
    result = export_nnunet(store, options.dataset, raw, dataset_id=options.dataset_id,
                           test_fraction=options.test_fraction)
    say(f"exported {options.dataset}: {len(result.train)} training, {len(result.test)} test cases")
    return result.folder


def patient_folds(case_patients: dict[str, str], n_folds: int = CV_FOLDS) -> list[dict[str, list[str]]]:
    """Cross-validation folds with every patient's cases on one side (nnU-Net's ``splits_final.json``)."""
    patients = sorted(set(case_patients.values()), key=lambda p: hashlib.sha256(p.encode()).hexdigest())
    n = min(n_folds, len(patients))
    if n < 2:
        raise ConfigError("cross-validation needs training cases of at least two patients; use --fold all")
    folds = []
    for k in range(n):
        held = set(patients[k::n])
        folds.append({
            "train": sorted(c for c, p in case_patients.items() if p not in held),
            "val": sorted(c for c, p in case_patients.items() if p in held),
        })
    return folds


def _write_splits(options: TrainOptions, store: DatasetStore, folder: Path, preprocessed: Path) -> None:
    if options.fold == "all":
        return
    from segnode.storage.export_nnunet import parse_ref

    name, version = parse_ref(options.dataset)
    training = {p.name.removesuffix(".nii.gz") for p in (folder / "labelsTr").glob("*.nii.gz")}
    patients = {r.case_id: r.patient for r in store.version(name, version) if r.case_id in training}
    folds = patient_folds(patients)
    if int(options.fold) >= len(folds):
        raise ConfigError(f"fold {options.fold} does not exist: {len(folds)} folds for {len(set(patients.values()))} "
                          "training patients")
    target = preprocessed / folder.name / "splits_final.json"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(folds, indent=2), encoding="utf-8")


# --------------------------------------------------------------------------- the child process


def _nnunet_env(workdir: Path, options: TrainOptions) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"nnUNet_raw": str(workdir / "nnUNet_raw"), "nnUNet_preprocessed": str(workdir / "nnUNet_preprocessed"),
                "nnUNet_results": str(workdir / "nnUNet_results")})
    env.setdefault("nnUNet_compile", "false")
    if options.augmentation_workers is not None:
        env["nnUNet_n_proc_DA"] = str(options.augmentation_workers)
    return env


def _run_job(job: dict, workdir: Path, options: TrainOptions, say: Reporter) -> dict:
    job_file = workdir / "job.json"
    job_file.write_text(json.dumps(job, indent=2), encoding="utf-8")
    command = [sys.executable, "-u", "-m", "segnode.models.nnunet_job", str(job_file)]
    tail: list[str] = []
    result: dict | None = None
    with subprocess.Popen(command, env=_nnunet_env(workdir, options), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, cwd=str(workdir)) as process:  # closes the pipe
        try:
            assert process.stdout is not None
            for line in process.stdout:
                line = line.rstrip("\n")
                tail = (tail + [line])[-30:]
                if line.startswith("[segnode train] "):
                    say(line.removeprefix("[segnode train] "))
                elif line.startswith('{"segnode_result"'):
                    result = json.loads(line)["segnode_result"]
                else:
                    logger.debug("nnU-Net: %s", line)
            code = process.wait()
        except BaseException:  # KeyboardInterrupt included: stop the child, keep its checkpoint
            process.terminate()
            process.wait(timeout=60)
            raise
    if code != 0 or result is None:
        raise BackendError("nnU-Net training failed (exit code %s):\n%s" % (code, "\n".join(tail[-15:])),
                           where=str(workdir))
    return result


# --------------------------------------------------------------------------- the model folder and card


def _stage_model(run_folder: Path, fold: str, stage: Path) -> Path:
    """dataset.json, plans.json and the final checkpoint, loadable by nnU-Net's predictor."""
    import torch

    if stage.exists():
        shutil.rmtree(stage)
    (stage / f"fold_{fold}").mkdir(parents=True)
    for name in ("dataset.json", "plans.json"):
        shutil.copy2(run_folder / name, stage / name)
    checkpoint = torch.load(run_folder / f"fold_{fold}" / "checkpoint_final.pth", map_location="cpu",
                            weights_only=False)
    checkpoint["trainer_name"] = "nnUNetTrainer"  # same network; the predictor finds this class in nnunetv2
    checkpoint.pop("optimizer_state", None)
    torch.save(checkpoint, stage / f"fold_{fold}" / "checkpoint_final.pth")
    return stage


def _training_log(run_folder: Path, fold: str) -> dict:
    import torch

    checkpoint = torch.load(run_folder / f"fold_{fold}" / "checkpoint_final.pth", map_location="cpu",
                            weights_only=False)
    logging_ = checkpoint.get("logging", {})
    last = lambda key: float(logging_[key][-1]) if logging_.get(key) else None  # noqa: E731
    return {"epochs_done": int(checkpoint.get("current_epoch", 0)), "final_train_loss": last("train_losses"),
            "final_val_loss": last("val_losses"), "final_ema_pseudo_dice": last("ema_fg_dice")}


def _file_hashes(folder: Path) -> dict[str, str]:
    from segnode.models.weights import hash_tree

    return hash_tree(folder)


def build_card(*, name: str, options: TrainOptions, rows_hash: str, train: list[str], test: list[str],
               labels: dict[int, str], base: _Base | None, plans: dict, training: dict, seconds: float,
               metrics: dict | None, files: dict[str, str], device: str) -> dict:
    config = plans["configurations"][options.configuration]
    return {
        "model": name,
        "backend": "nnunet",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dataset": {"ref": options.dataset, "rows_sha256": rows_hash, "split": "patient-level",
                    "test_fraction": options.test_fraction, "train_cases": train, "test_cases": test},
        "labels": {str(k): v for k, v in sorted(labels.items())},
        "base_model": None if base is None else {"kind": base.kind.value, "name": base.name,
                                                 "weights_hash": base.weights_hash},
        "hyper_parameters": {
            "configuration": options.configuration, "fold": options.fold, "epochs": options.epochs,
            "iterations_per_epoch": options.iterations, "val_iterations_per_epoch": options.val_iterations,
            "initial_lr": options.initial_lr, "plans": plans.get("plans_name"), "patch_size": config.get("patch_size"),
            "batch_size": config.get("batch_size"), "spacing_mm_zyx": config.get("spacing"), "seed": options.seed,
        },
        "training": {**training, "seconds": round(seconds, 1), "device": device},
        "metrics": metrics,
        "files_sha256": files,
    }


def card_markdown(card: dict) -> str:
    """The model card for people."""
    hp = card["hyper_parameters"]
    base = card["base_model"]
    lines = [
        f"# Model card: {card['model']}", "",
        f"- backend: nnU-Net v2 ({hp['configuration']}, fold {hp['fold']})",
        f"- created: {card['created']}",
        f"- dataset: {card['dataset']['ref']} (rows sha256 {card['dataset']['rows_sha256'][:16]}…), "
        f"{len(card['dataset']['train_cases'])} training / {len(card['dataset']['test_cases'])} test cases, "
        "split by patient",
        f"- base model: {'none (random initialisation)' if base is None else base['kind'] + ' ' + base['name']}",
        f"- labels: {', '.join(f'{k}={v}' for k, v in card['labels'].items())}",
        f"- schedule: {hp['epochs']} epochs x {hp['iterations_per_epoch']} iterations, lr {hp['initial_lr']}, "
        f"patch {hp['patch_size']}, batch {hp['batch_size']}, spacing {hp['spacing_mm_zyx']} mm (z, y, x)",
        f"- training: {card['training']['seconds']:.0f} s on {card['training']['device']}, final train loss "
        f"{card['training']['final_train_loss']}, EMA pseudo Dice {card['training']['final_ema_pseudo_dice']}",
        "",
    ]
    metrics = card.get("metrics")
    if metrics:
        lines += ["## Test split", "", "| organ | n | Dice mean | Dice sd | HD95 median (mm) |", "|---|---|---|---|---|"]
        for organ in metrics["organs"]:
            lines.append(f"| {organ['segment']} | {organ['n']} | {organ['dice_mean']:.3f} | {organ['dice_sd']:.3f} "
                         f"| {organ['hd95_median_mm']:.1f} |")
        lines += ["", f"Speed: {metrics['seconds_per_case']:.1f} s per scan on {metrics['device']}, peak memory "
                  f"{metrics['peak_rss_mb']:.0f} MB.", ""]
    else:
        lines += ["No test cases: no held-out metrics.", ""]
    lines += ["## Files (sha256)", ""] + [f"- `{rel}` {sha}" for rel, sha in sorted(card["files_sha256"].items())]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- evaluation on the test split


def evaluate_model_folder(model_folder: Path, dataset_folder: Path, out_dir: Path, *, device: str,
                          threads: int | None = None, split: str = "Ts",
                          pictures: bool = True) -> tuple[Evaluation, PredictionStats]:
    """Predict ``images<split>`` with the model and evaluate against ``labels<split>``.

    Returns ``(Evaluation, PredictionStats)``.
    """
    from segnode.models.evaluate import CaseInput, evaluate_cases
    from segnode.models.predict_cases import model_labels, predict_folder
    from segnode.models.segmentation_io import load_labels_file, read_segmentation

    pred_dir = out_dir / "predictions"
    stats = predict_folder(model_folder, dataset_folder / f"images{split}", pred_dir, device=device, threads=threads)
    pred_labels = model_labels(model_folder)
    ref_labels = load_labels_file(dataset_folder / "dataset.json")
    cases = []
    for ref in sorted((dataset_folder / f"labels{split}").glob("*.nii.gz")):
        case = ref.name.removesuffix(".nii.gz")
        image = read_image(dataset_folder / f"images{split}" / f"{case}_0000.nii.gz") if pictures else (None, None)
        cases.append(CaseInput(case, read_segmentation(pred_dir / ref.name, labels=pred_labels),
                               read_segmentation(ref, labels=ref_labels), *image))
    evaluation = evaluate_cases(cases, out_dir=out_dir, pictures=pictures)
    return evaluation, stats


def read_image(path: Path) -> tuple[np.ndarray, Grid]:
    """A CT NIfTI as ``(array [k, j, i], Grid)`` for the overlay pictures."""
    from segnode.models.io_nifti import load_nifti, volume_from_nifti
    from segnode.models.segmentation_io import Grid

    volume = volume_from_nifti(load_nifti(path))
    return volume.hu, Grid.of_volume(volume)


def metrics_block(evaluation: Evaluation, stats: PredictionStats) -> dict:
    from segnode.models.evaluate import summarise

    return {
        "cases": len(evaluation.results),
        "organs": [asdict(s) for s in summarise(evaluation.rows)],
        "seconds_per_case": stats.seconds_per_case,
        "peak_rss_mb": stats.peak_rss_mb,
        "peak_gpu_mb": stats.peak_gpu_mb,
        "device": stats.device,
    }


# --------------------------------------------------------------------------- train


def train(options: TrainOptions, say: Reporter | None = None) -> TrainResult:
    """Export, train, evaluate and register; see the module docstring."""
    from segnode.models.device import resolve_device
    from segnode.models.weights import Kind, import_weights, model_path, split_finetuned, weights_root
    from segnode.storage.dataset import DatasetStore
    from segnode.storage.export_nnunet import parse_ref
    from segnode.storage.manifest import rows_hash

    say = say or (lambda message: logger.info("%s", message))
    started = time.perf_counter()
    name, version = parse_ref(options.dataset)
    root = weights_root(options.weights_dir)
    model, model_version = split_finetuned(options.name or name)
    model_name = f"{model}/{model_version or version}"  # NAME/VERSION: the dataset's version unless given
    target = model_path(root, Kind.FINETUNED, Backend.NNUNET, model_name)
    if target.exists() and not options.force:
        raise WeightsError(f"a fine-tuned model {model_name!r} is already registered; remove it, use --force or "
                           "--name NAME/VERSION", where=str(target))
    if not (Path(options.store) / "store.json").exists():
        raise ConfigError("no dataset store here", where=str(options.store))
    store = DatasetStore.open_read_only(Path(options.store))
    rows = store.version(name, version)
    digest = rows_hash([r.to_json() for r in rows])
    base = resolve_base(options, root)
    device = resolve_device(options.device)
    workdir = Path(options.workdir) if options.workdir else root / ".training" / model_name
    _prepare_workdir(workdir, _identity(options, digest, base), options.fresh, say)

    folder = _export(options, store, workdir / "nnUNet_raw", say)
    _write_splits(options, store, folder, workdir / "nnUNet_preprocessed")
    job = {
        "dataset_id": options.dataset_id, "dataset_name": folder.name, "configuration": options.configuration,
        "fold": options.fold if options.fold == "all" else int(options.fold), "epochs": options.epochs,
        "iterations": options.iterations, "val_iterations": options.val_iterations,
        "initial_lr": options.initial_lr, "device": device, "threads": options.threads,
        "processes": options.processes, "seed": options.seed,
        "base_model": str(base.folder) if base else None, "base_checkpoint": str(base.checkpoint) if base else None,
    }
    say(f"training {options.configuration} fold {options.fold} on {device}: {options.epochs} epochs x "
        f"{options.iterations} iterations" + (f", from {base.kind.value} {base.name}" if base else ""))
    result = _run_job(job, workdir, options, say)
    run_folder = Path(result["checkpoint"]).parent.parent
    stage = _stage_model(run_folder, options.fold, workdir / "model")
    plans = json.loads((stage / "plans.json").read_text())
    labels = json.loads((stage / "dataset.json").read_text())["labels"]

    metrics = evaluation_dir = None
    test_cases = sorted(p.name.removesuffix(".nii.gz") for p in (folder / "labelsTs").glob("*.nii.gz"))
    if options.evaluate and test_cases:
        say(f"evaluating on {len(test_cases)} test case(s)")
        evaluation_dir = workdir / "evaluation"
        evaluation, stats = evaluate_model_folder(stage, folder, evaluation_dir, device=device,
                                                  threads=options.threads)
        metrics = metrics_block(evaluation, stats)
    train_cases = sorted(p.name.removesuffix(".nii.gz") for p in (folder / "labelsTr").glob("*.nii.gz"))
    card = build_card(name=model_name, options=options, rows_hash=digest, train=train_cases, test=test_cases,
                      labels={v: k for k, v in labels.items() if v}, base=base, plans=plans,
                      training=_training_log(run_folder, options.fold), seconds=time.perf_counter() - started,
                      metrics=metrics, files=_file_hashes(stage), device=device)
    (stage / CARD_JSON).write_text(json.dumps(card, indent=2), encoding="utf-8")
    (stage / CARD_MD).write_text(card_markdown(card), encoding="utf-8")
    (record,) = import_weights(stage, root, backend=Backend.NNUNET, name=model_name, kind=Kind.FINETUNED,
                               force=options.force)
    say(f"registered {record.path} (weights {record.weights_hash[:12]})")
    return TrainResult(record.path, model_name, record.weights_hash, card, workdir, evaluation_dir)
