"""``segnode models list | import PATH | verify [NAME...] | remove NAME``."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from segnode.cliargs import group_option
from segnode.errors import WeightsError
from segnode.models.cli_compare import register_compare
from segnode.models.engines import Engine
from segnode.models.weights import Kind, import_weights, list_models, remove, verify, weights_root
from segnode.profiles.schema import Backend


#: the committed tiny models of a source checkout (the gate's default)
TINY_MODELS = Path(__file__).resolve().parent.parent / "tests" / "data" / "tiny_models"


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

    p = sub.add_parser("verify", help="re-hash every file of the imported models (all, or those named); "
                                      "with --engine, run that engine's parity gate")
    p.add_argument("names", nargs="*")
    p.add_argument("--engine", choices=[e.value for e in Engine if e not in (Engine.AUTO, Engine.FP32)], default=None,
                   help="run the parity gate for this engine on this device and record the result")
    p.add_argument("--device", default="auto", help="device the gate runs on (auto, cpu, cuda, cuda:N)")
    p.add_argument("--tiny", type=Path, default=TINY_MODELS,
                   help=f"the committed tiny models (default: {TINY_MODELS})")
    p.add_argument("--no-real-size", dest="real_size", action="store_false",
                   help="skip the real-size network check (about a minute on two CPU cores)")
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


def _gate(args: argparse.Namespace) -> int:
    from segnode.models.device import resolve_device
    from segnode.models.engine_gate import record_result
    from segnode.models.parity import run_gate

    root = weights_root(args.weights_dir)
    if not (args.tiny / "nnunet_model").is_dir():
        raise WeightsError("the tiny models are not there (give --tiny DIR: the repository's tests/data/tiny_models)",
                           where=str(args.tiny))
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory(prefix="segnode-gate-") as work:
        result = run_gate(Engine(args.engine), device, args.tiny, Path(work), real_size=args.real_size)
    for check in result.checks:
        print(f"{'ok' if check.passed else 'FAILED':<6} {check.name}: {check.value:.6f} "
              f"(needs >= {check.threshold}; {check.detail})")
    path = record_result(root, result)
    verdict = "passed" if result.passed else "FAILED"
    print(f"engine {result.engine.value} {verdict} the parity gate on {result.device_kind} "
          f"(torch {result.torch_version}); recorded in {path}")
    return 0 if result.passed else 4


def _verify(args: argparse.Namespace) -> int:
    if args.engine:
        return _gate(args)
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
