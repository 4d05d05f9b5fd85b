"""The ``segnode`` command.

Each area registers its own subcommands (``register(subparsers)`` in its
``cli`` module); this module only wires them, configures logging and maps
:class:`~segnode.errors.SegnodeError` to exit codes (2 usage/config, 3 input,
4 backend, ...).  No traceback ever reaches the operator for an expected error.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from typing import NoReturn

from segnode.errors import SegnodeError

logger = logging.getLogger(__name__)

#: modules that provide ``register(subparsers)``; each adds its subcommands.
COMMAND_MODULES = (
    "segnode.node.cli.run",
    "segnode.profiles.cli",
    "segnode.node.cli.route",
    "segnode.node.cli.serve",
    "segnode.node.cli.worker",
    "segnode.node.cli.fetch",
    "segnode.node.cli.reprocess",
    "segnode.node.cli.users",
    "segnode.storage.cli",
    "segnode.models.cli_evaluate",
    "segnode.models.cli",
    "segnode.models.cli_train",
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # exit code 2, as for config errors
        self.print_usage(sys.stderr)
        self.exit(2, f"segnode: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="segnode", description="DICOM-native AI organ segmentation node")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    parser.add_argument("--log-json", action="store_true", help="log to stderr as JSON lines")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def configure_logging(verbosity: int, as_json: bool = False) -> None:
    from segnode.node.ops.logs import configure

    configure(verbosity, as_json)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage errors and --help: return, do not exit the caller
        return int(exc.code or 0)
    configure_logging(args.verbose, args.log_json)
    try:
        return int(args.func(args) or 0)
    except SegnodeError as exc:
        print(f"segnode: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("segnode: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
