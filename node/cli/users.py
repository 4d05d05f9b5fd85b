"""``segnode users``: the people who use the ops HTTP server, their roles, passwords and API tokens.

``users add NAME --role R [--role R2] [--password-file F | --password-stdin]``,
``users list``, ``users token NAME`` (prints a new personal API token once),
``users remove NAME``.  Kept in ``<state_dir>/accounts.db``
(:mod:`segnode.node.ops.accounts`); a running node sees the change at once.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from segnode.errors import InputError
from segnode.node.cli.serve import CONFIG_OPTIONS
from segnode.node.config import load_config
from segnode.node.ops.accounts import AccountStore
from segnode.node.ops.roles import Role, parse_role


def register(sub: argparse._SubParsersAction) -> None:
    users = sub.add_parser("users", help="accounts of the ops HTTP server (roles, passwords, API tokens)")
    verbs = users.add_subparsers(dest="users_command", required=True)
    p = verbs.add_parser("add", help="add a user with one or more roles")
    p.add_argument("name")
    p.add_argument("--role", action="append", required=True, type=_role,
                   help=f"one of {', '.join(r.value for r in Role)} (repeat for several)")
    secret = p.add_mutually_exclusive_group()
    secret.add_argument("--password-file", type=Path, help="a file holding the password (first line)")
    secret.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    p.set_defaults(func=cmd_add)
    p = verbs.add_parser("list", help="users, their roles, whether they have a password and how many tokens")
    p.set_defaults(func=cmd_list)
    p = verbs.add_parser("token", help="a new personal API token for a user (printed once)")
    p.add_argument("name")
    p.set_defaults(func=cmd_token)
    p = verbs.add_parser("remove", help="remove a user and their tokens")
    p.add_argument("name")
    p.set_defaults(func=cmd_remove)
    for verb in verbs.choices.values():
        for flag, text in CONFIG_OPTIONS.items():
            verb.add_argument(flag, type=Path, help=text)


def _role(value: str) -> Role:
    try:
        return parse_role(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _store(args: argparse.Namespace) -> AccountStore:
    return AccountStore.in_state_dir(load_config(args.config, state_dir=args.state_dir).state_dir)


def _password(args: argparse.Namespace) -> str | None:
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    if args.password_file is not None:
        try:
            lines = args.password_file.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise InputError(f"cannot read the password file: {exc.strerror}", where=str(args.password_file)) \
                from exc
        return lines[0] if lines else ""
    return None


def cmd_add(args: argparse.Namespace) -> int:
    account = _store(args).add(args.name, frozenset(args.role), _password(args))
    how = "with a password" if account.has_password else "without a password (use `segnode users token`)"
    print(f"added {account.name} ({', '.join(sorted(account.roles))}) {how}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    accounts = _store(args).users()
    if not accounts:
        print("no users")
    for a in accounts:
        created = time.strftime("%Y-%m-%d", time.gmtime(a.created_at))
        print(f"{a.name:<24} {','.join(sorted(a.roles)):<28} password={'yes' if a.has_password else 'no'} "
              f"tokens={a.tokens} created={created}")
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    print(_store(args).new_token(args.name))
    print("(shown once: keep it in a secret store; send it as 'Authorization: Bearer <token>')", file=sys.stderr)
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    _store(args).remove(args.name)
    print(f"removed {args.name}")
    return 0
