"""``segnode route test``: which rule matches a file or folder, why earlier ones do not, and the node's verdict.

The verdict on each series (routed, skipped with the reason, not routed) is
the node's own: both call :func:`segnode.routing.study.judge_series`.
"""

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
from segnode.routing.matcher import RuleSet, load_rules
from segnode.routing.selection import describe
from segnode.routing.study import Candidate, Outcome, SeriesVerdict, describe_verdict, judge_series

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
    test.add_argument("--group-by", choices=("series", "study"),
                      help="completion.group_by to judge as (default: the config's; without one, study for a "
                           "folder of several series, else series)")
    test.add_argument("path", type=Path, help="a DICOM file or a folder (searched recursively)")
    test.set_defaults(func=_test)


def _test(args: argparse.Namespace) -> int:
    rules, called_ae, group_by = _rules_for(args)
    print(f"rules: {rules.source}")
    found = _series(args.path)
    by_study = (group_by or ("study" if len(found) > 1 else "series")) == "study"
    candidates = [_candidate(ds, files, args.calling_ae, called_ae, args.host) for _, ds, files in found]
    verdicts = judge_series(candidates, rules, by_study=by_study)  # the node's verdicts (node/sweep.py)
    for (path, ds, files), series, verdict in zip(found, candidates, verdicts):
        count = len(files)
        more = f" (+{count - 1} more files of series {ds.SeriesInstanceUID})" if count > 1 else ""
        print(f"{path}{more}")
        if len(found) > 1 and series.facts is not None:  # a study folder: completion evidence too
            whole = judge(series.facts)
            print(f"  on release: {'whole' if whole.whole else 'not whole'} ({whole.reason}); "
                  f"{describe(series.facts)}")
        facts = {"calling_ae": args.calling_ae, "called_ae": called_ae, "sender_host": args.host}
        for trace in rules.explain(ds, **facts):
            print(f"  {'MATCH' if trace.matched else 'no   '} {trace.rule}: {trace.reason}")
        print(f"  => {describe_verdict(verdict)}")
    _show_selection(verdicts, by_study)
    return 0


def _candidate(ds: Dataset, files: list[Path], calling_ae: str, called_ae: str, host: str) -> Candidate:
    """One series as the node's completion sweep sees it: header facts, first instance, association."""
    uid = str(ds.get("SeriesInstanceUID", ""))
    return Candidate(uid, read_facts(uid, files), ds, calling_ae, called_ae, host)


def _show_selection(verdicts: list[SeriesVerdict], by_study: bool) -> None:
    """The study's verdicts in one list when a rule selects one series per study."""
    if not by_study or not any(v.decision is not None and v.decision.select is not None for v in verdicts):
        return
    print("study selection (completion.group_by: study):")
    for verdict in verdicts:
        if verdict.outcome is Outcome.ROUTED and verdict.decision is not None:
            print(f"  run    {verdict.series_uid}: rule {verdict.decision.rule}"
                  + (f", {verdict.reason}" if verdict.reason else " (no select: every series it matches)"))
        elif verdict.outcome is Outcome.SKIPPED:
            print(f"  skip   {verdict.series_uid}: {verdict.reason}")
        else:
            print(f"  none   {verdict.series_uid}: {verdict.reason}")


def _rules_for(args: argparse.Namespace) -> tuple[RuleSet, str, str | None]:
    """The rules to test, our called AE title and the grouping, from ``--rules`` / ``--config`` / ``--group-by``."""
    rules_path, destinations, called_ae, group_by = args.rules, None, "SEGNODE", args.group_by
    if args.config is not None:
        config = load_config(args.config)
        rules_path = rules_path or config.routes
        destinations = [d.name for d in config.destinations]
        called_ae = config.ae_title
        group_by = group_by or config.completion.group_by
    if rules_path is None:
        return RuleSet.default(), args.called_ae or called_ae, group_by
    rules = load_rules(rules_path, profiles=profile_paths().keys(), destinations=destinations)
    return rules, args.called_ae or called_ae, group_by


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
