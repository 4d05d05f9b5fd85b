"""``segnode profiles list|show``."""

from __future__ import annotations

import argparse

import yaml

from segnode.profiles.loader import load_all, load_profile, profile_paths


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("profiles", help="list or show organ profiles")
    verbs = parser.add_subparsers(dest="verb", required=True)
    ls = verbs.add_parser("list", help="list the organ profiles")
    ls.set_defaults(func=_list)
    show = verbs.add_parser("show", help="show one profile, validated, with codes filled in")
    show.add_argument("name")
    show.set_defaults(func=_show)


def _list(args: argparse.Namespace) -> int:
    profiles = load_all()
    paths = profile_paths()
    for name, profile in sorted(profiles.items()):
        tissues = ", ".join(t.name for t in profile.tissues)
        chain = " → ".join([profile.model_type.value, *(b.value for b in profile.fallback)])
        print(f"{name:10} {chain:32} {tissues}    ({paths[name]})")
    return 0


def _show(args: argparse.Namespace) -> int:
    profile = load_profile(args.name)
    print(yaml.safe_dump(profile.model_dump(mode="json"), sort_keys=False, width=100), end="")
    return 0
