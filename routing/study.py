"""The verdict on each series of a study: routed (by which rule), skipped (why) or not routed.

One function, :func:`judge_series`, gives it; the node's completion sweep
(:mod:`segnode.node.sweep`) and ``segnode route test`` both call it, so the
two never disagree.  In order:

1. a series that cannot be segmented (:func:`segnode.routing.selection.ineligible`:
   a returned SEG, RTSTRUCT or SR, a localizer, a secondary capture; with
   ``by_study`` also derived images and single images) is skipped;
2. the rules are evaluated on its first instance: none matching, not routed;
3. with ``by_study``, a rule with ``select`` takes one series per study
   (:func:`segnode.routing.selection.choose`), the others are skipped;
4. with ``by_study``, when that rule already routed another series of the
   study earlier (``earlier``: a series that arrived late, on a second
   association), the newcomers are judged against that series by the same
   preferences: worse, skipped ("study already routed to series X, preferred
   by rule R"); better, routed, and its result supersedes the earlier one's
   (:attr:`SeriesVerdict.supersedes`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from pydicom import Dataset

from segnode.routing.matcher import Decision, RuleSet
from segnode.routing.selection import SeriesFacts, choose, ineligible


class Outcome(str, Enum):
    ROUTED = "routed"
    SKIPPED = "skipped"
    NOT_ROUTED = "not_routed"


@dataclass(frozen=True)
class Candidate:
    """A complete series to judge: its header facts, its first instance, the association it came on."""

    series_uid: str
    facts: SeriesFacts | None  # None: a header could not be read
    header: Dataset  # the first instance (what the rules match on)
    calling_ae: str
    called_ae: str
    sender_host: str


@dataclass(frozen=True)
class Earlier:
    """A series of the same study that a rule routed before (its result current or on its way)."""

    series_uid: str
    rule: str
    facts: SeriesFacts | None


@dataclass(frozen=True)
class SeriesVerdict:
    """What happens to one series, and the sentence saying why (the job's reason)."""

    series_uid: str
    outcome: Outcome
    reason: str
    decision: Decision | None = None
    supersedes: tuple[str, ...] = ()  # series routed earlier whose results this one's replace


Routed = tuple[Candidate, Decision]


def judge_series(candidates: Sequence[Candidate], rules: RuleSet, *, by_study: bool,
                 earlier: Sequence[Earlier] = ()) -> list[SeriesVerdict]:
    """The verdict on every candidate, in their order (see the module docstring)."""
    verdicts: dict[str, SeriesVerdict] = {}
    by_rule: dict[str, list[Routed]] = {}
    for series in candidates:
        skip = ineligible(series.facts, strict=by_study) if series.facts is not None else None
        decision = None if skip else rules.evaluate(series.header, calling_ae=series.calling_ae,
                                                     called_ae=series.called_ae, sender_host=series.sender_host)
        if skip is not None:
            verdicts[series.series_uid] = SeriesVerdict(series.series_uid, Outcome.SKIPPED, skip)
        elif decision is None:
            verdicts[series.series_uid] = SeriesVerdict(series.series_uid, Outcome.NOT_ROUTED,
                                                        "no routing rule matched")
        else:
            by_rule.setdefault(decision.rule, []).append((series, decision))
    for rule, routed in by_rule.items():
        before = [e for e in earlier if e.rule == rule] if by_study else []
        for verdict in _select(routed, by_study, before):
            verdicts[verdict.series_uid] = verdict
    return [verdicts[series.series_uid] for series in candidates]


def _select(routed: list[Routed], by_study: bool, before: list[Earlier]) -> list[SeriesVerdict]:
    """One rule's series: all of them without ``select``, else the chosen one (against ``before`` too)."""
    select = routed[0][1].select
    if select is None or not by_study:
        return [SeriesVerdict(s.series_uid, Outcome.ROUTED, "", d) for s, d in routed]
    rule = routed[0][1].rule
    unknown = next((e for e in before if e.facts is None), None)
    if unknown is not None:
        return [SeriesVerdict(s.series_uid, Outcome.SKIPPED, f"study already routed to series {unknown.series_uid} "
                              f"by rule {rule!r} (its headers are gone: not compared)", d) for s, d in routed]
    known = [e.facts for e in before if e.facts is not None]
    choice = choose([*(s.facts for s, _ in routed if s.facts is not None), *known], select)
    earlier_uids = tuple(f.series_uid for f in known)
    verdicts = []
    for series, decision in routed:
        uid = series.series_uid
        if uid == choice.chosen:
            over = f"; preferred over series {', '.join(earlier_uids)}, routed earlier" if earlier_uids else ""
            verdicts.append(SeriesVerdict(uid, Outcome.ROUTED, choice.reason + over, decision, earlier_uids))
        elif choice.chosen in earlier_uids:
            why = choice.skipped.get(uid, "not selected: headers unreadable")
            verdicts.append(SeriesVerdict(uid, Outcome.SKIPPED, f"study already routed to series {choice.chosen}, "
                                          f"preferred by rule {rule!r} ({why})", decision))
        else:
            why = choice.skipped.get(uid, "not selected: headers unreadable")
            verdicts.append(SeriesVerdict(uid, Outcome.SKIPPED, f"rule {rule!r}: {why}", decision))
    return verdicts


def describe_verdict(verdict: SeriesVerdict) -> str:
    """One line for ``segnode route test``: what the node would do with the series."""
    decision = verdict.decision
    if verdict.outcome is Outcome.SKIPPED:
        return f"skipped: {verdict.reason}"
    if verdict.outcome is Outcome.NOT_ROUTED or decision is None:
        return "not routed"
    return (f"rule {decision.rule}: profile {', '.join(decision.profiles or (decision.profile,))}, "
            f"backend {decision.backend or '(from profile)'}, "
            f"destinations {', '.join(decision.destinations) or '(none)'}, harvest {decision.harvest or '(no)'}")


__all__ = ["Candidate", "Earlier", "Outcome", "SeriesVerdict", "describe_verdict", "judge_series"]
