"""``segnode models compare A B --dataset NAME@VERSION --split test``: see :mod:`segnode.models.compare`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def register_compare(models_subparsers: argparse._SubParsersAction) -> None:
    """Add ``compare`` to the ``segnode models`` command group."""
    p = models_subparsers.add_parser(
        "compare", help="two models side by side on a dataset split: Dice, HD95, speed, memory, verdict per organ",
        description="Run models A and B on the same split of a frozen dataset version; print Dice and HD95 per "
        "organ with a verdict, seconds per scan, peak memory and organs available; with --out write per-case "
        "CSVs, pictures and the success-metrics report (report.md).")
    p.add_argument("model_a", metavar="A", help="model name (segnode models list) or nnU-Net model folder")
    p.add_argument("model_b", metavar="B", help="model name or folder")
    p.add_argument("--dataset", required=True, metavar="NAME@VERSION")
    p.add_argument("--split", choices=["test", "train"], default="test")
    p.add_argument("--store", type=Path, default=None,
                   help="dataset store (default $SEGNODE_DATASET_STORE, else ./segnode-datasets)")
    p.add_argument("--test-fraction", type=float, default=None,
                   help="as at training (default: from the fine-tuned model's card, else 0.2)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("-o", "--out", type=Path, default=Path("segnode-compare"), help="output folder")
    p.add_argument("--no-pictures", action="store_true")
    p.set_defaults(func=_compare)


def _compare(args: argparse.Namespace) -> int:
    from segnode.models.compare import compare, format_comparison
    from segnode.models.device import resolve_device
    from segnode.models.report import write_report
    from segnode.models.weights import weights_root

    store = args.store or Path(os.environ.get("SEGNODE_DATASET_STORE") or "segnode-datasets")
    result = compare(args.model_a, args.model_b, dataset=args.dataset, store=store,
                     root=weights_root(args.weights_dir), out_dir=args.out, split=args.split,
                     device=resolve_device(args.device), threads=args.threads, test_fraction=args.test_fraction,
                     pictures=not args.no_pictures)
    print(format_comparison(result))
    report = write_report(result)
    print(f"\nreport: {report}", file=sys.stderr)
    better = [o for o in result.organs if o.verdict == "B better"]
    if better:
        print(f"to use B for {', '.join(o.segment for o in better)}: set 'options: nnunet: model: "
              f"{args.model_b}' in the organ profile", file=sys.stderr)
    return 0
