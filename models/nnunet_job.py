"""The nnU-Net half of ``segnode train``, run in its own process.

nnU-Net reads its folders (``nnUNet_raw``, ``nnUNet_preprocessed``,
``nnUNet_results``) from the environment when it is first imported, so each
training runs in a fresh interpreter with them set (:mod:`segnode.models.training`
starts it): ``python -m models.nnunet_job JOB.json``.

Stages, each skipped when its output exists (an interrupted run resumes):
fingerprint → plans (nnU-Net's planner, or the base model's plans moved onto
this dataset, as transfer learning requires) → preprocessing → training, which
continues from ``checkpoint_latest.pth`` (nnU-Net's ``--c``) or starts from the
base model's weights (nnU-Net's ``-pretrained_weights``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: plans identifier of plans taken over from a base model
BASE_PLANS = "segnodeBasePlans"
DEFAULT_PLANS = "nnUNetPlans"


def _say(message: str) -> None:
    print(f"[segnode train] {message}", flush=True)


def make_trainer_class(epochs: int, iterations: int, val_iterations: int, initial_lr: float) -> type:
    """An ``nnUNetTrainer`` with our schedule, a checkpoint every epoch (atomic) and a progress line."""
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    class SegnodeTrainer(nnUNetTrainer):
        def __init__(self, plans: dict, configuration: str, fold: int | str, dataset_json: dict,
                     device: torch.device = torch.device("cuda")) -> None:
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_epochs = epochs
            self.num_iterations_per_epoch = iterations
            self.num_val_iterations_per_epoch = val_iterations
            self.initial_lr = initial_lr
            self.save_every = 1

        def save_checkpoint(self, filename: str) -> None:
            partial = f"{filename}.partial"
            super().save_checkpoint(partial)
            if os.path.exists(partial):
                os.replace(partial, filename)  # a kill mid-save never leaves a truncated checkpoint

        def on_epoch_end(self) -> None:
            epoch = self.current_epoch
            super().on_epoch_end()
            log = self.logger.get_value
            seconds = log("epoch_end_timestamps", step=-1) - log("epoch_start_timestamps", step=-1)
            dice = [round(float(d), 3) for d in log("dice_per_class_or_region", step=-1)]
            _say(f"epoch {epoch + 1}/{self.num_epochs}: train loss {log('train_losses', step=-1):.4f}, "
                 f"val loss {log('val_losses', step=-1):.4f}, pseudo Dice {dice}, {seconds:.1f} s")

    return SegnodeTrainer


def _plan(job: dict, dataset_id: int, dataset_name: str, preprocessed: Path) -> str:
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments

    if not (preprocessed / dataset_name / "dataset_fingerprint.json").exists():
        _say("extracting the dataset fingerprint")
        extract_fingerprints([dataset_id], num_processes=job["processes"], check_dataset_integrity=True,
                             verbose=False, show_progress_bar=False)
    if job["base_model"] is None:
        if not (preprocessed / dataset_name / f"{DEFAULT_PLANS}.json").exists():
            _say("planning (nnU-Net's default planner)")
            plan_experiments([dataset_id])
        return DEFAULT_PLANS
    target = preprocessed / dataset_name / f"{BASE_PLANS}.json"
    raw_json = Path(os.environ["nnUNet_raw"]) / dataset_name / "dataset.json"
    (preprocessed / dataset_name / "dataset.json").write_text(raw_json.read_text())  # the planner would copy it
    if not target.exists():
        _say(f"taking the network and preprocessing plans of the base model {job['base_model']}")
        target.write_text(json.dumps(_moved_plans(job, dataset_name), indent=2))
    return BASE_PLANS


def _moved_plans(job: dict, dataset_name: str) -> dict:
    """The base model's plans for this dataset (what ``nnUNetv2_move_plans_between_datasets`` does)."""
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    plans = json.loads((Path(job["base_model"]) / "plans.json").read_text())
    old = plans.get("plans_name", DEFAULT_PLANS)
    plans["dataset_name"] = dataset_name
    plans["plans_name"] = BASE_PLANS
    for config in plans["configurations"].values():
        identifier = config.get("data_identifier")
        if identifier:
            config["data_identifier"] = BASE_PLANS + identifier[len(old):] if identifier.startswith(old) \
                else f"{BASE_PLANS}_{identifier}"
    raw = Path(os.environ["nnUNet_raw"]) / dataset_name
    dataset_json = json.loads((raw / "dataset.json").read_text())
    example = next((raw / "imagesTr").glob("*_0000.nii.gz"))
    reader = determine_reader_writer_from_dataset_json(dataset_json, str(example), allow_nonmatching_filename=True,
                                                       verbose=False)
    plans["image_reader_writer"] = reader.__name__
    return plans


def _preprocess(job: dict, dataset_id: int, plans_name: str, preprocessed: Path, dataset_name: str) -> dict:
    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess

    plans = json.loads((preprocessed / dataset_name / f"{plans_name}.json").read_text())
    configuration = job["configuration"]
    if configuration not in plans["configurations"]:
        raise SystemExit(f"configuration {configuration!r} is not in the plans "
                         f"({', '.join(plans['configurations'])})")
    identifier = plans["configurations"][configuration]["data_identifier"]
    done = preprocessed / dataset_name / f"{identifier}.done"
    if not done.exists():
        _say(f"preprocessing ({configuration}, spacing {plans['configurations'][configuration]['spacing']} mm)")
        preprocess([dataset_id], plans_identifier=plans_name, configurations=(configuration,),
                   num_processes=(job["processes"],), verbose=False)
        done.write_text("ok\n")
    return plans


def _transfer_weights(network: torch.nn.Module, checkpoint_file: str) -> int:
    """Load every matching weight of the base checkpoint but the output (``seg_layers``) layers."""
    import torch

    saved = torch.load(checkpoint_file, map_location="cpu", weights_only=False)["network_weights"]
    own = network.state_dict()
    for key, value in own.items():
        if ".seg_layers." in key:
            continue
        if key not in saved or saved[key].shape != value.shape:
            found = tuple(saved[key].shape) if key in saved else "missing"
            raise SystemExit(f"the base model does not fit this network: {key} is {tuple(value.shape)} here, "
                             f"{found} in {checkpoint_file}")
    moved = {k: v for k, v in saved.items() if k in own and ".seg_layers." not in k}
    own.update(moved)
    network.load_state_dict(own)
    return len(moved)


def _train(job: dict, plans: dict, dataset_json: dict) -> Path:
    import torch

    device = torch.device(job["device"])
    trainer_class = make_trainer_class(job["epochs"], job["iterations"], job["val_iterations"], job["initial_lr"])
    fold = job["fold"]
    output = (Path(os.environ["nnUNet_results"]) / job["dataset_name"]
              / f"{trainer_class.__name__}__{plans['plans_name']}__{job['configuration']}" / f"fold_{fold}")
    latest, final = output / "checkpoint_latest.pth", output / "checkpoint_final.pth"
    if final.exists():
        _say(f"training already finished: {final}")
        return final
    plans["continue_training"] = latest.exists()  # nnU-Net 2.8 reads it to append to the training log
    trainer = trainer_class(plans, job["configuration"], fold, dataset_json, device=device)
    trainer.initialize()
    if latest.exists():
        trainer.load_checkpoint(str(latest))
        _say(f"resuming from {latest.name} at epoch {trainer.current_epoch + 1}/{job['epochs']}")
    elif job["base_checkpoint"]:
        n = _transfer_weights(trainer.network, job["base_checkpoint"])
        _say(f"starting from the base model's weights ({n} tensors; output layers new)")
    else:
        _say("starting from random weights")
    trainer.run_training()
    return final


def main(argv: list[str]) -> int:
    job = json.loads(Path(argv[0]).read_text())
    import torch

    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    torch.manual_seed(int(job.get("seed", 0)))
    dataset_id, dataset_name = job["dataset_id"], job["dataset_name"]
    preprocessed = Path(os.environ["nnUNet_preprocessed"])
    start = time.perf_counter()
    plans_name = _plan(job, dataset_id, dataset_name, preprocessed)
    plans = _preprocess(job, dataset_id, plans_name, preprocessed, dataset_name)
    dataset_json = json.loads((preprocessed / dataset_name / "dataset.json").read_text())
    final = _train(job, plans, dataset_json)
    _say(f"done in {time.perf_counter() - start:.0f} s: {final}")
    print(json.dumps({"segnode_result": {"checkpoint": str(final), "plans": plans_name}}), flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover - run as a process by models.training
    sys.exit(main(sys.argv[1:]))
