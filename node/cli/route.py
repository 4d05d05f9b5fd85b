"""``segnode route test``: which rule matches a file or folder, and why earlier ones do not."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from segnode.errors import InputError
from segnode.node.completion import judge, read_facts
from segnode.node.config import load_config
from segnode.profiles.loader import profile_paths
from segnode.routing.matcher import Decision, RuleSet, load_rules
from segnode.routing.selection import SeriesFacts, choose, describe, ineligible

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("route", help="test routing rules")
    verbs = parser.add_subparsers(dest="verb", required=True)
    test = verbs.add_parser(
        "test", help="show which rule matches a DICOM file or folder, and why earlier rules do not"
    )
    test.add_argument("--config", type=Path, help="node configuration (its 'routes' and 'destinations')")
    test.add_argument("--rules", type=Path, help="rules file (default: the config's 'routes', else built-in)")
    test.add_argument("--calling-ae", default="STORESCU", help="the sender's AE title (default STORESCU)")
    test.add_argument("--called-ae", help="our AE title (default: the config's ae_title, else SEGNODE)")
    test.add_argument("--host", default="127.0.0.1", help="the sender's address (default 127.0.0.1)")
    test.add_argument("path", type=Path, help="a DICOM file or a folder (searched recursively)")
    test.set_defaults(func=_test)


def _test(args: argparse.Namespace) -> int:
    rules, called_ae = _rules_for(args)
    print(f"rules: {rules.source}")
    routed: dict[str, list[tuple[SeriesFacts, Decision]]] = {}
    found = _series(args.path)
    study = len(found) > 1  # a study folder: completion evidence and selection are shown too
    for path, ds, files in found:
        count = len(files)
        more = f" (+{count - 1} more files of series {ds.SeriesInstanceUID})" if count > 1 else ""
        print(f"{path}{more}")
        series = read_facts(str(ds.get("SeriesInstanceUID", "")), files) if study else None
        if series is not None:
            verdict = judge(series)
            print(f"  on release: {'whole' if verdict.whole else 'not whole'} ({verdict.reason}); "
                  f"{describe(series)}")
        facts = {"calling_ae": args.calling_ae, "called_ae": called_ae, "sender_host": args.host}
        for trace in rules.explain(ds, **facts):
            print(f"  {'MATCH' if trace.matched else 'no   '} {trace.rule}: {trace.reason}")
        decision = rules.evaluate(ds, **facts)
        if decision is None:
            print("  => not routed")
            continue
        profiles = ", ".join(decision.profiles or (decision.profile,))
        print(
            f"  => rule {decision.rule}: profile {profiles}, "
            f"backend {decision.backend or '(from profile)'}, "
            f"destinations {', '.join(decision.destinations) or '(none)'}, "
            f"harvest {decision.harvest or '(no)'}"
        )
        if series is not None:
            routed.setdefault(decision.rule, []).append((series, decision))
    _show_selection(routed)
    return 0


def _show_selection(routed: dict[str, list[tuple[SeriesFacts, Decision]]]) -> None:
    """What ``completion.group_by: study`` would segment: skips, then each rule's ``select``."""
    if not any(d.select is not None for members in routed.values() for _, d in members):
        return
    print("study selection (completion.group_by: study):")
    for rule, members in routed.items():
        select = members[0][1].select
        candidates = []
        for series, _ in members:
            skip = ineligible(series)
            if skip is not None:
                print(f"  skip   {series.series_uid}: {skip}")
            else:
                candidates.append(series)
        if select is None:
            for series in candidates:
                print(f"  run    {series.series_uid}: rule {rule} (no select: every series it matches)")
            continue
        choice = choose(candidates, select)
        if choice.chosen is not None:
            print(f"  run    {choice.chosen}: rule {rule}, {choice.reason}")
        else:
            print(f"  none   rule {rule}: {choice.reason}")
        for uid, why in choice.skipped.items():
            print(f"  skip   {uid}: {why}")


def _rules_for(args: argparse.Namespace) -> tuple[RuleSet, str]:
    """The rules to test and our called AE title, from ``--rules`` / ``--config``."""
    rules_path, destinations, called_ae = args.rules, None, "SEGNODE"
    if args.config is not None:
        config = load_config(args.config)
        rules_path = rules_path or config.routes
        destinations = [d.name for d in config.destinations]
        called_ae = config.ae_title
    if rules_path is None:
        return RuleSet.default(), args.called_ae or called_ae
    rules = load_rules(rules_path, profiles=profile_paths().keys(), destinations=destinations)
    return rules, args.called_ae or called_ae


def _series(path: Path) -> list[tuple[Path, Dataset, list[Path]]]:
    """First file, its data set and all files of each series under ``path``, in path order."""
    if not path.exists():
        raise InputError("no such file or folder", where=str(path))
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    groups: dict[object, list] = {}
    skipped = 0
    for file in files:
        try:
            ds = dcmread(file, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
            logger.info("skipped %s: not readable as DICOM (%s)", file, exc)
            skipped += 1
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        key = (str(ds.get("StudyInstanceUID", "")), uid) if uid else file
        groups.setdefault(key, [file, ds, []])[2].append(file)
    if skipped:
        print(f"skipped {skipped} files that are not readable as DICOM (-v lists them)")
    if not groups:
        raise InputError("no readable DICOM file found", where=str(path))
    return [(p, ds, n) for p, ds, n in groups.values()]
