"""``segnode models list | import PATH | verify [NAME...] | remove NAME``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from segnode.cliargs import group_option
from segnode.errors import WeightsError
from segnode.models.cli_compare import register_compare
from segnode.models.weights import Kind, import_weights, list_models, remove, verify, weights_root
from segnode.profiles.schema import Backend


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("models", help="manage model weights (import, list, verify, remove)")
    sub = parser.add_subparsers(dest="models_command", required=True)

    p = sub.add_parser("list", help="imported models with their weights hash")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    p.set_defaults(func=_list)

    p = sub.add_parser("import", help="import weights from a local zip, folder or TorchScript file")
    p.add_argument("path", type=Path)
    p.add_argument("--backend", choices=[b.value for b in Backend if b is not Backend.HU_BASED], default=None,
                   help="what the weights are for (default: detected)")
    p.add_argument("--name", default=None, help="model name (default: from the folder; not for TotalSegmentator)")
    p.add_argument("--kind", choices=[k.value for k in Kind], default=Kind.PRETRAINED.value)
    p.add_argument("--force", action="store_true", help="replace a model already imported under that name")
    p.set_defaults(func=_import)

    p = sub.add_parser("verify", help="re-hash every file of the imported models (all, or those named)")
    p.add_argument("names", nargs="*")
    p.set_defaults(func=_verify)

    p = sub.add_parser("remove", help="delete an imported model")
    p.add_argument("name")
    p.add_argument("--backend", choices=[b.value for b in Backend if b is not Backend.HU_BASED], default=None)
    p.add_argument("--kind", choices=[k.value for k in Kind], default=None)
    p.set_defaults(func=_remove)

    register_compare(sub)
    group_option(parser, sub, "--weights-dir", type=Path,
                 help="weights directory (default: $SEGNODE_WEIGHTS_DIR or ~/.local/share/segnode/weights)")


def _list(args: argparse.Namespace) -> int:
    root = weights_root(args.weights_dir)
    records = list_models(root)
    if args.json:
        print(json.dumps({"weights_dir": str(root), "models": [
            {"name": r.name, "backend": r.backend.value, "kind": r.kind.value, "weights_hash": r.weights_hash,
             "files": len(r.files), "size_bytes": r.size_bytes, "source": r.source, "imported_at": r.imported_at,
             "path": str(r.path)} for r in records]}, indent=2))
        return 0
    print(f"weights directory: {root}")
    if not records:
        print("no models imported (segnode models import PATH)")
    for r in records:
        print(f"{r.kind.value:<10} {r.backend.value:<16} {r.name:<48} {r.weights_hash[:16]}  "
              f"{len(r.files):>4} files {r.size_bytes / 2**20:9.1f} MB")
    return 0


def _import(args: argparse.Namespace) -> int:
    root = weights_root(args.weights_dir)
    records = import_weights(args.path, root, backend=Backend(args.backend) if args.backend else None,
                             name=args.name, kind=Kind(args.kind), force=args.force)
    for r in records:
        print(f"imported {r.kind.value}/{r.backend.value}/{r.name}: {len(r.files)} files, "
              f"weights sha256 {r.weights_hash}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    root = weights_root(args.weights_dir)
    records = list_models(root)
    if args.names:
        unknown = sorted(set(args.names) - {r.name for r in records})
        if unknown:
            raise WeightsError(f"no imported model named {', '.join(unknown)}", where=str(root))
        records = [r for r in records if r.name in args.names]
    bad = 0
    for r in records:
        problems = verify(r)
        status = "ok" if not problems else "FAILED"
        print(f"{status:<6} {r.kind.value}/{r.backend.value}/{r.name}")
        for problem in problems:
            print(f"       {problem}")
        bad += bool(problems)
    if bad:
        raise WeightsError(f"{bad} of {len(records)} model(s) fail their integrity check; re-import them")
    print(f"{len(records)} model(s) verified")
    return 0


def _remove(args: argparse.Namespace) -> int:
    root = weights_root(args.weights_dir)
    removed = remove(root, args.name, Backend(args.backend) if args.backend else None,
                     Kind(args.kind) if args.kind else None)
    for r in removed:
        print(f"removed {r.kind.value}/{r.backend.value}/{r.name}")
    return 0
