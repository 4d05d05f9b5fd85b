"""``segnode train``: fine-tune nnU-Net on a frozen dataset version (see :mod:`segnode.models.training`)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from segnode.models.training import BaseModel, TrainOptions, train


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "train",
        help="train or fine-tune nnU-Net on a frozen dataset version and register the model",
        description="Export NAME@VERSION in nnU-Net's layout (patient-level split), plan, preprocess and train "
        "(progress per epoch; run the same command again to resume after an interruption), evaluate on the "
        "test split and register the model under <weights>/finetuned/NAME/VERSION with a model card.",
    )
    parser.add_argument("--dataset", required=True, metavar="NAME@VERSION", help="frozen dataset version")
    parser.add_argument("--store", type=Path, default=None,
                        help="dataset store (default $SEGNODE_DATASET_STORE, else ./segnode-datasets)")
    parser.add_argument("--base", choices=[b.value for b in BaseModel], default=BaseModel.NONE.value,
                        help="start from random weights, TotalSegmentator's or an imported nnU-Net model's")
    parser.add_argument("--base-model", metavar="NAME",
                        help="pre-trained model name (default for totalsegmentator: Dataset297, total 3 mm)")
    parser.add_argument("--configuration", default="3d_fullres", help="nnU-Net configuration (default 3d_fullres)")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--iterations", type=int, default=250, help="training iterations per epoch")
    parser.add_argument("--val-iterations", type=int, default=50, help="validation iterations per epoch")
    parser.add_argument("--lr", type=float, default=0.01, help="initial learning rate (poly schedule)")
    parser.add_argument("--fold", default="0", help="cross-validation fold (patient-grouped) or 'all'")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    parser.add_argument("--processes", type=int, default=2, help="processes for preprocessing")
    parser.add_argument("--augmentation-workers", type=int, default=None,
                        help="nnU-Net data-augmentation workers (nnUNet_n_proc_DA; 0: in-process)")
    parser.add_argument("--dataset-id", type=int, default=501, help="nnU-Net dataset number (default 501)")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="patients held out for testing")
    parser.add_argument("--name", help="registered model: NAME or NAME/VERSION (default: the dataset's name "
                        "and version, e.g. Liver/3)")
    parser.add_argument("--workdir", type=Path, help="work folder (default <weights>/.training/<model name>)")
    parser.add_argument("--weights-dir", type=Path, default=None, help="model weights directory")
    parser.add_argument("--fresh", action="store_true", help="discard an earlier run in the work folder")
    parser.add_argument("--force", action="store_true", help="replace a registered model of the same name")
    parser.add_argument("--no-eval", action="store_true", help="skip the evaluation on the test split")
    parser.set_defaults(func=_train)


def _store(args: argparse.Namespace) -> Path:
    return args.store or Path(os.environ.get("SEGNODE_DATASET_STORE") or "segnode-datasets")


def _train(args: argparse.Namespace) -> int:
    options = TrainOptions(
        dataset=args.dataset, store=_store(args), base=BaseModel(args.base), base_model=args.base_model,
        configuration=args.configuration, epochs=args.epochs, iterations=args.iterations,
        val_iterations=args.val_iterations, initial_lr=args.lr, fold=args.fold, device=args.device,
        threads=args.threads, processes=args.processes, augmentation_workers=args.augmentation_workers,
        dataset_id=args.dataset_id, test_fraction=args.test_fraction, name=args.name, workdir=args.workdir,
        weights_dir=args.weights_dir, fresh=args.fresh, force=args.force, evaluate=not args.no_eval,
    )
    result = train(options, say=lambda message: print(message, file=sys.stderr, flush=True))
    metrics = result.card.get("metrics")
    if metrics:
        for organ in metrics["organs"]:
            print(f"  {organ['segment']:20} Dice {organ['dice_mean']:.3f}  HD95 {organ['hd95_median_mm']:.1f} mm")
        print(f"  {metrics['seconds_per_case']:.1f} s per scan on {metrics['device']}")
    print(f"model: {result.name} ({result.model_path})")
    print(f"card:  {result.model_path / 'model_card.md'}")
    print(f"use it: set 'options: nnunet: model: {result.name}' in an organ profile (labels: "
          f"{', '.join(f'{k}={v}' for k, v in result.card['labels'].items())})")
    return 0
