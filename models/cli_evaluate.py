"""``segnode evaluate``: Dice, HD95 and volume difference of predictions against references.

One case (``--pred`` and ``--ref``: DICOM SEG, NIfTI label map or a folder of
NIfTI masks) or many (``--pred-dir`` and ``--ref-dir``, paired by file name,
as nnU-Net writes predictions and ``labelsTs``).  Prints a table; with
``--out``, writes ``metrics.csv``, box plots per organ and overlay pictures.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from segnode.errors import ConfigError, InputError
from segnode.models.evaluate import CaseInput, EvalGrid, Evaluation, evaluate_cases, format_table, parse_map
from segnode.models.segmentation_io import NIFTI_SUFFIXES, Grid, load_labels_file, read_segmentation
from segnode.models.volume import Volume

#: ``{value: name}`` of a NIfTI label map, None: from a dataset.json beside it or the file name
Labels = Mapping[int, str] | None

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "evaluate",
        help="Dice, HD95 and volume difference of predicted vs reference segmentations",
        description="Compare predictions with references per segment: Dice, HD95 (mm, symmetric), volume "
        "difference. Inputs are DICOM SEG, NIfTI label maps or folders of NIfTI masks, on any grid (the "
        "reference is resampled onto the prediction's grid in patient space).",
    )
    one = parser.add_argument_group("one case")
    one.add_argument("--pred", type=Path, help="predicted segmentation (SEG, NIfTI or folder of masks)")
    one.add_argument("--ref", type=Path, help="reference segmentation")
    one.add_argument("--source", type=Path, help="CT series the SEG(s) reference (exact frame placement; overlays)")
    one.add_argument("--image", type=Path, help="CT image for the overlay pictures (default: --source)")
    one.add_argument("--case", default=None, help="case name in the outputs (default: the prediction's file name)")
    many = parser.add_argument_group("many cases")
    many.add_argument("--pred-dir", type=Path, help="folder of predicted label maps (CASE.nii.gz or CASE.dcm)")
    many.add_argument("--ref-dir", type=Path, help="folder of reference label maps with the same case names")
    many.add_argument("--image-dir", type=Path, help="folder of CT images CASE_0000.nii.gz (overlays)")
    split = parser.add_argument_group("a model on a dataset split")
    split.add_argument("--dataset", metavar="NAME@VERSION", help="frozen dataset version of the store")
    split.add_argument("--model", metavar="MODEL", help="model name (segnode models list) or nnU-Net model folder")
    split.add_argument("--split", choices=["test", "train"], default="test")
    split.add_argument("--store", type=Path, default=None,
                       help="dataset store (default $SEGNODE_DATASET_STORE, else ./segnode-datasets)")
    split.add_argument("--test-fraction", type=float, default=None,
                       help="as at training (default: from the model's card, else 0.2)")
    split.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    split.add_argument("--weights-dir", type=Path, default=None, help="model weights directory")
    parser.add_argument("--pred-labels", type=Path, help="labels JSON of NIfTI predictions ({value: name})")
    parser.add_argument("--ref-labels", type=Path, help="labels JSON of NIfTI references (or a dataset.json)")
    parser.add_argument("--map", action="append", default=[], metavar="PRED=REF",
                        help="pair a predicted segment with a differently named reference one (repeatable)")
    parser.add_argument("--grid", choices=[g.value for g in EvalGrid], default=EvalGrid.PRED.value,
                        help="grid the metrics are computed on (default: the prediction's)")
    parser.add_argument("-o", "--out", type=Path, help="write metrics.csv, box plots and overlays here")
    parser.add_argument("--no-pictures", action="store_true", help="with --out: only the CSV")
    parser.set_defaults(func=_evaluate)


def _evaluate(args: argparse.Namespace) -> int:
    if args.dataset and args.model:
        args.out = args.out or Path("segnode-evaluate")
        evaluation = _on_split(args)
    else:
        evaluation = evaluate_cases(_cases(args), out_dir=args.out, mapping=parse_map(args.map), on=args.grid,
                                    pictures=not args.no_pictures)
    print(format_table(evaluation.results))
    for path in evaluation.files:
        if path.suffix == ".csv":
            print(f"wrote {path}")
    pictures = [p for p in evaluation.files if p.suffix == ".png"]
    if pictures:
        print(f"wrote {len(pictures)} pictures under {args.out}")
    return 0


def _cases(args: argparse.Namespace) -> list[CaseInput]:
    pred_labels = load_labels_file(args.pred_labels) if args.pred_labels else None
    ref_labels = load_labels_file(args.ref_labels) if args.ref_labels else None
    if args.pred and args.ref:
        return [_single_case(args, pred_labels, ref_labels)]
    if args.pred_dir and args.ref_dir:
        return list(_folder_cases(args.pred_dir, args.ref_dir, args.image_dir, pred_labels, ref_labels))
    raise ConfigError("give --pred and --ref, --pred-dir and --ref-dir, or --dataset and --model")


def _on_split(args: argparse.Namespace) -> Evaluation:
    """Predict a split of a frozen dataset version with a model, then evaluate it."""
    import os

    from segnode.models.compare import card_test_fraction, evaluate_on_split, resolve_model
    from segnode.models.device import resolve_device
    from segnode.models.weights import weights_root

    model = resolve_model(args.model, weights_root(args.weights_dir))
    store = args.store or Path(os.environ.get("SEGNODE_DATASET_STORE") or "segnode-datasets")
    fraction = args.test_fraction if args.test_fraction is not None else card_test_fraction((model,), args.dataset)
    evaluation, stats, _ = evaluate_on_split(
        model, dataset=args.dataset, store=store, out_dir=args.out, split=args.split,
        device=resolve_device(args.device), test_fraction=fraction, pictures=not args.no_pictures)
    print(f"{model.label} on {args.dataset} ({args.split} split, {stats.cases} cases)")
    return evaluation


def _load_image(path: Path) -> tuple[Volume, Grid]:
    from segnode.models.series import load_series

    volume = load_series(path)
    return volume, Grid.of_volume(volume)


def _single_case(args: argparse.Namespace, pred_labels: Labels, ref_labels: Labels) -> CaseInput:
    source: Volume | None = None
    image: np.ndarray | None = None
    image_grid: Grid | None = None
    if args.source:
        source, image_grid = _load_image(args.source)
        image = source.hu
    if args.image:
        volume, image_grid = _load_image(args.image)
        image = volume.hu
    pred = read_segmentation(args.pred, labels=pred_labels, source=source)
    ref = read_segmentation(args.ref, labels=ref_labels, source=source)
    return CaseInput(args.case or _case_name(args.pred), pred, ref, image, image_grid)


def _case_name(path: Path) -> str:
    name = path.name
    for suffix in (*NIFTI_SUFFIXES, ".dcm"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _folder_cases(pred_dir: Path, ref_dir: Path, image_dir: Path | None, pred_labels: Labels,
                  ref_labels: Labels) -> Iterator[CaseInput]:
    for folder in (pred_dir, ref_dir):
        if not folder.is_dir():
            raise InputError("not a folder", where=str(folder))
    preds = {_case_name(p): p for p in sorted(pred_dir.iterdir()) if p.is_file() and _is_case(p)}
    refs = {_case_name(p): p for p in sorted(ref_dir.iterdir()) if p.is_file() and _is_case(p)}
    common = [name for name in refs if name in preds]
    if not common:
        raise InputError(f"no case names in common with {ref_dir}", where=str(pred_dir))
    missing = sorted(set(refs) - set(preds))
    if missing:
        logger.warning("%d reference case(s) have no prediction: %s", len(missing), ", ".join(missing[:10]))
    for name in common:
        image: np.ndarray | None = None
        image_grid: Grid | None = None
        if image_dir is not None:
            candidates = [image_dir / f"{name}_0000.nii.gz", image_dir / f"{name}.nii.gz"]
            found = next((c for c in candidates if c.exists()), None)
            if found is not None:
                volume, image_grid = _load_image(found)
                image = volume.hu
        yield CaseInput(name, read_segmentation(preds[name], labels=pred_labels),
                        read_segmentation(refs[name], labels=ref_labels), image, image_grid)


def _is_case(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith((*NIFTI_SUFFIXES, ".dcm")) and name != "dataset.json"
