"""TotalSegmentator backend, through the library's Python API ``totalsegmentator()``.

The profile chooses the task (``total``), the resolution (``normal`` 1.5 mm,
``fast`` 3 mm, ``fastest`` 6 mm) and ``roi_subset``; each tissue lists the
TotalSegmentator classes it is made of.  The multilabel image TotalSegmentator
returns (``ml=True``) is mapped class by class to the profile's segment numbers.

Offline by construction:

* TotalSegmentator downloads any weights folder it does not find, at call
  time, and checks only that the folder exists.  Before every call segnode
  checks the folders the call will need (the task's models, and the 6 mm
  model it runs first to crop when ``roi_subset`` is set) against the task
  table, their inner ``<trainer>__<plans>__<config>/fold_N/checkpoint`` and
  their manifests (sha256 of every file, at load), and raises a
  :class:`WeightsError` naming the missing folder and the import command.
* ``config.json`` (in ``TOTALSEG_HOME_DIR``, under the weights directory) is
  written with usage statistics off before the first call.
* No licence number is ever passed (TotalSegmentator's licence check exits
  the process when offline); tasks that need one are refused.
* TotalSegmentator rewrites ``nnUNet_raw``/``nnUNet_preprocessed``/
  ``nnUNet_results`` in ``os.environ``; segnode restores them (and its own
  ``TOTALSEG_*`` settings) after each call, and runs one call at a time.

TotalSegmentator's prediction starts worker processes with ``spawn``: every
entry point that can run it must be safe to import (no work at import time).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator


from segnode.errors import BackendError, ConfigError, DependencyMissingError, WeightsError, WeightsNotInstalledError
from segnode.models.base import RunSettings, installed_version
from segnode.models.device import MemoryModel, resolve_device, run_within_budget, torch_threads
from segnode.models.engine_gate import choose_engine
from segnode.models.engines import Engine
from segnode.models.io_nifti import labels_from_nifti, volume_to_nifti
from segnode.models.labels import map_labels
from segnode.models.ts_inprocess import NpyPredictor
from segnode.models.volume import LabelMap, Volume

if TYPE_CHECKING:  # pragma: no cover
    from nibabel import Nifti1Image
from segnode.models.weights import ModelRecord, combined_hash, find_model, verify_or_raise, weights_root
from segnode.profiles.schema import Backend, Profile, TotalSegmentatorOptions

logger = logging.getLogger(__name__)

HOME_DIRNAME = "totalsegmentator-home"
_ENV_KEYS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "TOTALSEG_WEIGHTS_PATH", "TOTALSEG_HOME_DIR")
#: one TotalSegmentator call at a time per process (it changes os.environ and torch threads)
_CALL_LOCK = threading.Lock()
#: crop model TotalSegmentator runs before a CT task when roi_subset is set (6 mm "total")
_CROP_TASK_ID = 298
_CROP_TRAINER = "nnUNetTrainer_4000epochs_NoMirroring"


@dataclass(frozen=True)
class RequiredFolder:
    """A weights folder a call needs, with the run folder inside it."""

    task_id: int | str
    folder: str  # as in TotalSegmentator's task table (relative to TOTALSEG_WEIGHTS_PATH)
    run: str  # <trainer>__<plans>__<config>
    folds: tuple[int, ...]


def ts_weights_dir(root: Path) -> Path:
    """``TOTALSEG_WEIGHTS_PATH``: where imported TotalSegmentator task folders live."""
    return root / "pretrained" / Backend.TOTALSEGMENTATOR.value


def _task_config(options: TotalSegmentatorOptions) -> dict:
    """The task's configuration, as ``python_api.get_task_config`` builds it.

    Rebuilt from the task table so that checking weights does not import
    torch (a missing-weights fallback stays cheap); a test compares it with
    the library's own function.
    """
    from totalsegmentator.map_tasks_config import DEFAULT_CONFIG, TASK_CONFIGS

    if options.task not in TASK_CONFIGS:
        raise ConfigError(f"unknown TotalSegmentator task {options.task!r}")
    raw = TASK_CONFIGS[options.task]
    if raw.get("commercial"):
        raise ConfigError(f"TotalSegmentator task {options.task!r} needs a licence; segnode does not use licensed "
                          "tasks (the licence check exits the process when offline)")
    if options.task.endswith("_mr"):
        raise ConfigError(f"TotalSegmentator task {options.task!r} is for MR; segnode segments CT")
    config = {**DEFAULT_CONFIG, "plans": "nnUNetPlans"}
    if "sub_modes" in raw:
        mode = {"normal": "default"}.get(options.resolution, options.resolution)
        if mode not in raw["sub_modes"]:
            mode = "fast" if mode != "default" else "default"
        config.update(raw["sub_modes"][mode])
    else:
        if raw.get("disallow_fast") and options.resolution == "fast":
            raise ConfigError(f"TotalSegmentator task {options.task!r} does not work with resolution fast")
        config.update({k: v for k, v in raw.items() if k not in ("disallow_fast", "commercial", "info_msg")})
    return config


def required_folders(options: TotalSegmentatorOptions) -> list[RequiredFolder]:
    """Every weights folder ``totalsegmentator()`` will open for these options."""
    from totalsegmentator.map_tasks_config import TASK_ID_WEIGHTS_CONFIGS

    config = _task_config(options)
    ids = config["task_id"] if isinstance(config["task_id"], list) else [config["task_id"]]
    plans = config.get("plans") or "nnUNetPlans"
    runs = [(tid, f"{config['trainer']}__{plans}__{config['model']}", tuple(config["folds"])) for tid in ids]
    if options.roi_subset is not None or config.get("crop") is not None or config.get("cascade"):
        if config.get("crop_model") is not None:
            raise ConfigError(f"TotalSegmentator task {options.task!r} crops with another task's model; "
                              "not supported by segnode")
        runs.insert(0, (_CROP_TASK_ID, f"{_CROP_TRAINER}__nnUNetPlans__3d_fullres", (0,)))
    out: list[RequiredFolder] = []
    for tid, run, folds in runs:
        info = TASK_ID_WEIGHTS_CONFIGS[tid]
        folder = str(Path(info.get("rel_path") or "") / info["foldername"])
        if folder not in {r.folder for r in out}:
            out.append(RequiredFolder(tid, folder, run, folds))
    return out


def class_ids(profile: Profile) -> dict[int, list[int]]:
    """Segment number → the TotalSegmentator class values it is made of."""
    from totalsegmentator.map_to_binary import class_map

    options = profile.options.totalsegmentator
    table = {name: value for value, name in class_map[options.task].items()}
    unknown = [c for t in profile.tissues for c in t.totalsegmentator if c not in table]
    unknown += [c for c in options.roi_subset or () if c not in table]
    if unknown:
        raise ConfigError(f"profile {profile.organ}: unknown TotalSegmentator classes for task "
                          f"{options.task!r}: {sorted(set(unknown))}")
    if options.roi_subset is not None:
        outside = [c for t in profile.tissues for c in t.totalsegmentator if c not in options.roi_subset]
        if outside:
            raise ConfigError(f"profile {profile.organ}: classes {outside} are not in roi_subset, "
                              "so TotalSegmentator would never output them")
    return {value: [table[c] for c in tissue.totalsegmentator]
            for value, tissue in enumerate(profile.tissues, start=1)}


def write_config(home: Path) -> Path:
    """TotalSegmentator's ``config.json`` with usage statistics off (kept keys otherwise)."""
    home.mkdir(parents=True, exist_ok=True)
    path = home / "config.json"
    config: dict = {}
    if path.exists():
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            config = {}
    config.update({"send_usage_stats": False, "statistics_disclaimer_shown": True})
    config.setdefault("totalseg_id", "segnode")
    config.setdefault("prediction_counter", 0)
    path.write_text(json.dumps(config, indent=4), encoding="utf-8")
    return path


def check_folders(root: Path, needed: list[RequiredFolder], options: TotalSegmentatorOptions,
                  verify: bool) -> list[ModelRecord]:
    """Find (and with ``verify``, re-hash) every folder ``needed``; raise a clear WeightsError if not there."""
    base = ts_weights_dir(root)
    records = []
    for req in needed:
        what = (f"TotalSegmentator weights {req.folder} (task {req.task_id}, needed for task "
                f"{options.task!r} {options.resolution}" + (" with roi_subset" if options.roi_subset else "") + ")")
        try:
            record = find_model(root, Backend.TOTALSEGMENTATOR, Path(req.folder).name)
        except WeightsNotInstalledError:
            raise WeightsNotInstalledError(f"{what} are not installed in {base}; segnode never downloads: import them with "
                               f"'segnode models import {Path(req.folder).name}.zip'") from None
        for fold in req.folds:
            if not (record.path / req.run / f"fold_{fold}" / "checkpoint_final.pth").is_file():
                raise WeightsError(f"{what} lack {req.run}/fold_{fold}/checkpoint_final.pth", where=str(record.path))
        if verify:
            verify_or_raise(record)
        records.append(record)
    return records


@contextmanager
def _ts_environment(root: Path) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in _ENV_KEYS}
    os.environ["TOTALSEG_WEIGHTS_PATH"] = str(ts_weights_dir(root))
    os.environ["TOTALSEG_HOME_DIR"] = str(root / HOME_DIRNAME)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _ts_device(device: str) -> str:
    return "cpu" if device == "cpu" else device.replace("cuda", "gpu")


#: ``RunSettings.extra[RUNNER_KEY] = "api"`` makes every call go through TotalSegmentator's own API
RUNNER_KEY = "totalsegmentator_runner"
RESOLUTION_MM = {"normal": 1.5, "fast": 3.0, "fastest": 6.0}


def _memory(options: TotalSegmentatorOptions) -> MemoryModel:
    mm = RESOLUTION_MM[options.resolution]
    # 118 classes; logits, gaussian and counts at the network's spacing, input copies on the input grid
    return MemoryModel(target_spacing_mm=(mm, mm, mm), bytes_per_model_voxel=4.0 * 118 * 3,
                       bytes_per_input_voxel=36.0, fixed_mb=1500.0)


@dataclass
class TotalSegmentatorModel:
    """TotalSegmentator with checked weights, bound to a profile."""

    root: Path
    profile: Profile
    settings: RunSettings
    device: str
    needed: list[RequiredFolder]
    records: list[ModelRecord]
    mapping: dict[int, list[int]]
    engine: Engine = Engine.FP32
    predictor: NpyPredictor | None = None  # set: segnode runs TotalSegmentator's steps in process (ts_inprocess.py)
    backend: Backend = Backend.TOTALSEGMENTATOR

    @property
    def weights_hash(self) -> str:
        return combined_hash({r.name: r.weights_hash for r in self.records})

    @property
    def model_version(self) -> str:
        o = self.profile.options.totalsegmentator
        engine = "" if self.engine is Engine.FP32 else f" {self.engine.value}"
        return f"TotalSegmentator {installed_version('TotalSegmentator')} {o.task} {o.resolution}{engine}"

    def segment(self, volume: Volume) -> LabelMap:
        memory = _memory(self.profile.options.totalsegmentator)
        return run_within_budget(self._segment, volume, self.settings, memory, self.backend.value)

    def run_totalsegmentator(self, volume: Volume, output: Path | None = None) -> Nifti1Image:
        """TotalSegmentator's own multilabel NIfTI image for ``volume`` (written to ``output`` if given)."""
        options = self.profile.options.totalsegmentator
        # TotalSegmentator would download anything missing now: check again, cheaply
        check_folders(self.root, self.needed, options, verify=False)
        from totalsegmentator.python_api import totalsegmentator

        printed = io.StringIO()
        with _CALL_LOCK, _ts_environment(self.root), contextlib.redirect_stdout(printed):
            write_config(self.root / HOME_DIRNAME)
            try:
                return totalsegmentator(
                    volume_to_nifti(volume), output, ml=True, task=options.task,
                    fast=options.resolution == "fast", fastest=options.resolution == "fastest",
                    roi_subset=list(options.roi_subset) if options.roi_subset is not None else None,
                    device=_ts_device(self.device), quiet=True, nr_thr_resamp=1, nr_thr_saving=1,
                )
            except SystemExit as exc:
                raise BackendError(f"TotalSegmentator tried to exit the process (code {exc.code})") from exc
            except (RuntimeError, ValueError, OSError, KeyError, IndexError, AssertionError, MemoryError) as exc:
                raise BackendError(f"TotalSegmentator failed: {type(exc).__name__}: {exc}") from exc
            finally:
                if printed.getvalue().strip():
                    logger.debug("TotalSegmentator printed: %s", printed.getvalue().strip())

    def run_in_process(self, volume: Volume) -> Nifti1Image:
        """TotalSegmentator's steps run here with the engine's predictor (models/ts_inprocess.py)."""
        import nibabel as nib

        from segnode.models.ts_inprocess import predict_image

        if self.predictor is None:
            raise BackendError("no in-process predictor loaded")
        options = self.profile.options.totalsegmentator
        check_folders(self.root, self.needed, options, verify=False)  # as before every API call: removed is an error
        image = volume_to_nifti(volume)
        try:
            with _CALL_LOCK, torch_threads(self.settings.threads):
                array = predict_image(image, self.predictor, RESOLUTION_MM[options.resolution], options.task)
        except (RuntimeError, ValueError, MemoryError) as exc:
            raise BackendError(f"TotalSegmentator (in process, engine {self.engine.value}) failed: {exc}") from exc
        return nib.Nifti1Image(array, image.affine)

    def _segment(self, volume: Volume) -> LabelMap:
        image = self.run_totalsegmentator(volume) if self.predictor is None else self.run_in_process(volume)
        try:
            ts = labels_from_nifti(image, volume)
        except ValueError as exc:
            raise BackendError(f"TotalSegmentator output is off the input grid: {exc}") from exc
        out = map_labels(ts, self.mapping)
        return LabelMap(array=out, labels=self.profile.label_values(), backend=self.backend.value,
                        model_version=self.model_version, weights_hash=self.weights_hash)


class TotalSegmentatorBackend:
    name = Backend.TOTALSEGMENTATOR

    def is_available(self) -> bool:
        return all(importlib.util.find_spec(m) is not None for m in ("torch", "nnunetv2", "totalsegmentator"))

    def _check_deps(self) -> None:
        if not self.is_available():
            raise DependencyMissingError("the totalsegmentator backend needs torch, nnunetv2 and TotalSegmentator "
                                         "(pip install 'segnode[dl]')")

    def cache_key(self, profile: Profile, settings: RunSettings) -> str:
        self._check_deps()
        root = weights_root(settings.weights_dir)
        options = profile.options.totalsegmentator
        records = check_folders(root, required_folders(options), options, verify=False)
        hashes = combined_hash({r.name: r.weights_hash for r in records})
        return (f"totalsegmentator|{hashes}|{resolve_device(settings.device)}|{settings.memory_budget_mb}|"
                f"engine={settings.engine}|threads={settings.threads}|runner={settings.extra.get(RUNNER_KEY)}|"
                f"{options.model_dump_json()}|{[(t.name, t.totalsegmentator) for t in profile.tissues]}")

    def load(self, profile: Profile, settings: RunSettings) -> TotalSegmentatorModel:
        self._check_deps()
        options = profile.options.totalsegmentator
        root = weights_root(settings.weights_dir)
        mapping = class_ids(profile)
        needed = required_folders(options)
        records = check_folders(root, needed, options, verify=True)
        device = resolve_device(settings.device)
        write_config(root / HOME_DIRNAME)
        engine = choose_engine(settings.engine, root, device)
        predictor = None
        if in_process_supported(options, needed) and settings.extra.get(RUNNER_KEY, "segnode") != "api":
            predictor = _in_process_predictor(records[0], needed[0], device, engine, settings.threads)
        elif engine is not Engine.FP32:
            logger.info("TotalSegmentator %s %s%s: engines run only in segnode's in-process run (one model, no "
                        "roi_subset); TotalSegmentator's own API runs fp32", options.task, options.resolution,
                        " with roi_subset" if options.roi_subset else "")
            engine = Engine.FP32
        logger.info("TotalSegmentator %s %s ready on %s (%s, %s, engine %s)", options.task, options.resolution, device,
                    ", ".join(r.folder for r in needed), "in process" if predictor else "its own API", engine.value)
        return TotalSegmentatorModel(root=root, profile=profile, settings=settings, device=device,
                                     needed=needed, records=records, mapping=mapping, engine=engine,
                                     predictor=predictor)


def in_process_supported(options: TotalSegmentatorOptions, needed: list[RequiredFolder]) -> bool:
    """Whether segnode can run this call's steps itself: ``total`` fast or fastest, one model, no roi_subset."""
    return (options.task == "total" and options.resolution in ("fast", "fastest") and options.roi_subset is None
            and len(needed) == 1)


def _in_process_predictor(record: ModelRecord, needed: RequiredFolder, device: str, engine: Engine,
                          threads: int | None) -> NpyPredictor:
    import totalsegmentator.nnunet  # noqa: F401  TotalSegmentator's trainer classes, as its own calls see them

    from segnode.models.nnunet import PredictorOptions, build_predictor
    from segnode.models.ts_inprocess import TOTAL_STEP_SIZE

    return build_predictor(record.path / needed.run, PredictorOptions(folds=needed.folds,
                                                                      tile_step_size=TOTAL_STEP_SIZE),
                           device, engine, threads)


BACKEND = TotalSegmentatorBackend()
