"""``segnode dataset …``: the curators' commands on the dataset store.

``list``, ``show NAME``, ``add PATH``, ``correct CASE LABELS``, ``freeze NAME``
and ``export NAME@VERSION --format nnunet --out DIR``.  ``--store`` defaults to
``$SEGNODE_DATASET_STORE`` (else ``./segnode-datasets``); the secret comes from
``--secret-file`` or ``$SEGNODE_DEID_SECRET_FILE`` and is required by the
commands that de-identify (``add``, ``correct``).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from segnode.cliargs import group_option
from segnode.errors import ConfigError
from segnode.storage.dataset import STORE_ENV, DatasetStore
from segnode.storage.export_nnunet import export_nnunet
from segnode.storage.importers import Layout, import_path, summary
from segnode.storage.labels import parse_label_mapping
from segnode.storage.manifest import LabelStatus
from segnode.storage.pseudonyms import SECRET_ENV, load_secret

DEFAULT_STORE = Path("segnode-datasets")


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("dataset", help="curate the de-identified training dataset store")
    commands = parser.add_subparsers(dest="dataset_command", required=True)
    commands.add_parser("list", help="datasets, cases and versions").set_defaults(func=_list)
    show = commands.add_parser("show", help="one dataset: labels, cases, versions")
    show.add_argument("name")
    show.set_defaults(func=_show)
    add = commands.add_parser("add", help="import MSD, NIfTI pairs or DICOM + SEG from disk")
    add.add_argument("path", type=Path)
    add.add_argument("--dataset", required=True)
    add.add_argument("--layout", choices=[x.value for x in Layout], help="default: detected")
    add.add_argument("--label-map", default="", help="VALUE=TISSUE,… (VALUE=- drops a label)")
    add.add_argument("--profile", default="", help="organ profile the labels belong to")
    add.add_argument("--label-status", choices=[s.value for s in LabelStatus], default=LabelStatus.REVIEWED.value)
    add.set_defaults(func=_add)
    correct = commands.add_parser("correct", help="replace a case's labels (NIfTI on the image grid, or SEG)")
    correct.add_argument("case")
    correct.add_argument("labels", type=Path)
    correct.add_argument("--dataset", default=None)
    correct.add_argument("--label-map", default="")
    correct.set_defaults(func=_correct)
    freeze = commands.add_parser("freeze", help="freeze the working manifest as the next version")
    freeze.add_argument("name")
    freeze.set_defaults(func=_freeze)
    export = commands.add_parser("export", help="export a frozen version")
    export.add_argument("ref", metavar="NAME@VERSION")
    export.add_argument("--format", choices=["nnunet"], default="nnunet")
    export.add_argument("--out", type=Path, required=True)
    export.add_argument("--id", type=int, default=501, help="nnU-Net dataset number (default 501)")
    export.add_argument("--test-fraction", type=float, default=0.2)
    export.set_defaults(func=_export)
    group_option(parser, commands, "--store", type=Path,
                 help=f"store folder (default ${STORE_ENV}, else ./{DEFAULT_STORE})")
    group_option(parser, commands, "--secret-file", type=Path,
                 help=f"HMAC secret for pseudonyms (default ${SECRET_ENV}); never inside the store")


def _root(args: argparse.Namespace) -> Path:
    return args.store or Path(os.environ.get(STORE_ENV) or DEFAULT_STORE)


def _writable(args: argparse.Namespace) -> DatasetStore:
    secret = load_secret(args.secret_file)
    from_env = os.environ.get(SECRET_ENV)
    secret_path = args.secret_file or (Path(from_env) if from_env else None)
    return DatasetStore.open(_root(args), secret, secret_path=secret_path)


def _readable(args: argparse.Namespace) -> DatasetStore:
    root = _root(args)
    if not (root / "store.json").exists():
        raise ConfigError("no dataset store here (create one with 'segnode dataset add')", where=str(root))
    return DatasetStore.open_read_only(root)


def _list(args: argparse.Namespace) -> int:
    store = _readable(args)
    for name in store.datasets():
        print(f"{name}\t{len(store.cases(name))} cases\tversions {store.versions(name) or '-'}")
    print(f"quarantined series: {len(store.quarantined())}")
    return 0


def _show(args: argparse.Namespace) -> int:
    store = _readable(args)
    cases = store.cases(args.name)
    if not cases and not store.versions(args.name):
        raise ConfigError(f"no dataset {args.name!r}", where=str(store.root))
    print(json.dumps({str(k): v for k, v in store.label_table(args.name).items()}))
    for record in cases.values():
        print(f"{record.case_id}\tpatient {record.patient}\t{record.label_status.value}\t{record.backend}"
              f"\t{record.model_version}\t{record.study_date}")
    print(f"versions: {store.versions(args.name) or '-'}")
    return 0


def _add(args: argparse.Namespace) -> int:
    store = _writable(args)
    report = import_path(
        store, args.path, dataset=args.dataset, layout=args.layout,
        mapping=parse_label_mapping(args.label_map) if args.label_map else None,
        profile=args.profile, label_status=args.label_status,
    )
    print(summary(report))
    return 0


def _correct(args: argparse.Namespace) -> int:
    store = _writable(args)
    mapping = parse_label_mapping(args.label_map) if args.label_map else None
    record = store.correct(args.case, args.labels, dataset=args.dataset, mapping=mapping)
    print(f"{record.case_id}: labels corrected ({len(record.previous_labels)} earlier label maps kept)")
    return 0


def _freeze(args: argparse.Namespace) -> int:
    number = _readable(args).freeze(args.name)
    print(f"{args.name}@{number}")
    return 0


def _export(args: argparse.Namespace) -> int:
    result = export_nnunet(_readable(args), args.ref, args.out, dataset_id=args.id, test_fraction=args.test_fraction)
    print(f"{result.folder}: {len(result.train)} training, {len(result.test)} test cases")
    return 0
