"""Evaluate routing rules against a data set and the association's facts.

Every check returns whether it holds and a sentence saying why, so that
``segnode route test`` can tell an operator which rule matched and why each
earlier one did not.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Collection
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from pydicom import Dataset
from pydicom.datadict import keyword_for_tag
from pydicom.multival import MultiValue

from segnode.routing.rules import Action, Condition, Rule, Select, _Operators, host_network, read_rules, resolve_tag

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    """What the first matching rule says to do with a study."""

    rule: str
    profile: str
    backend: str | None
    destinations: tuple[str, ...]  # "@sender": back to the sender's configured destination
    harvest: str | None  # dataset name, or None
    options: dict[str, Any] = field(default_factory=dict)  # the action's other settings (Action.options)
    profiles: tuple[str, ...] = ()  # a multi-profile route: every profile, ``profile`` first; () for one
    select: Select | None = None  # series selection per study (routing/selection.py)


@dataclass(frozen=True)
class RuleTrace:
    """One rule's outcome: matched or not, and why (the first failing condition)."""

    rule: str
    matched: bool
    reason: str


@dataclass(frozen=True)
class Facts:
    """What a rule can look at: the data set and the association it came on."""

    ds: Dataset
    calling_ae: str
    called_ae: str
    sender_host: str


@dataclass(frozen=True)
class RuleSet:
    """An immutable, ordered list of rules; the first that matches decides."""

    rules: tuple[Rule, ...]
    source: str = "(built-in default)"

    @classmethod
    def default(cls) -> RuleSet:
        """One fallback rule: every study goes to profile ``lungs``, nowhere else."""
        return cls((Rule(name="fallback", fallback=True, action=Action(profile="lungs")),))

    def explain(
        self, ds: Dataset, *, calling_ae: str, called_ae: str, sender_host: str
    ) -> list[RuleTrace]:
        """Traces of the rules tried, in order, up to and including the first match."""
        facts = Facts(ds, calling_ae.strip(), called_ae.strip(), sender_host)
        traces = []
        for rule in self.rules:
            matched, why = (True, "fallback rule") if rule.match is None else check(rule.match, facts)
            traces.append(RuleTrace(rule.name, matched, why))
            if matched:
                break
        return traces

    def evaluate(
        self, ds: Dataset, *, calling_ae: str, called_ae: str, sender_host: str
    ) -> Decision | None:
        """The decision of the first matching rule; ``None`` means "not routed"."""
        traces = self.explain(ds, calling_ae=calling_ae, called_ae=called_ae, sender_host=sender_host)
        if not traces or not traces[-1].matched:
            return None
        rule = next(r for r in self.rules if r.name == traces[-1].rule)
        action = rule.action
        backend = action.backend.value if action.backend is not None else None
        return Decision(rule.name, action.profile, backend, action.destinations, action.harvest, action.options(),
                        profiles=action.profiles or (), select=action.select)


def load_rules(
    path: Path,
    *,
    profiles: Collection[str] | None = None,
    destinations: Collection[str] | None = None,
) -> RuleSet:
    """Load a rules file (errors name file, line and key); see ``docs/routing.md``."""
    rules = read_rules(path, profiles=profiles, destinations=destinations)
    logger.debug("loaded %d routing rules from %s", len(rules), path)
    return RuleSet(rules, source=str(path))


def check(cond: Condition, facts: Facts) -> tuple[bool, str]:
    """Does ``cond`` hold for ``facts``, and why (or why not)."""
    match cond.kind:
        case "tag":
            return _check_tag(cond, facts.ds)
        case "calling_ae" | "called_ae":
            test = cond.calling_ae or cond.called_ae
            assert test is not None  # the kind names the one field set (Condition._one_kind)
            name = cond.kind.replace("_ae", " AE")
            return _check_values(name, [getattr(facts, cond.kind)], test)
        case "sender_host":
            return _check_host(cond.sender_host or (), facts.sender_host)
        case "all":
            return _check_all(cond.all or (), facts)
        case "any":
            return _check_any(cond.any or (), facts)
        case _:
            assert cond.not_ is not None  # the only kind left (Condition._one_kind)
            holds, why = check(cond.not_, facts)
            return (False, f"excluded by 'not': {why}") if holds else (True, f"not ({why})")


def _check_all(conds: tuple[Condition, ...], facts: Facts) -> tuple[bool, str]:
    reasons = []
    for cond in conds:
        holds, why = check(cond, facts)
        if not holds:
            return False, why
        reasons.append(why)
    return True, " and ".join(reasons)


def _check_any(conds: tuple[Condition, ...], facts: Facts) -> tuple[bool, str]:
    reasons = []
    for cond in conds:
        holds, why = check(cond, facts)
        if holds:
            return True, why
        reasons.append(why)
    return False, f"none of any: {'; '.join(reasons)}"


def _check_tag(cond: Condition, ds: Dataset) -> tuple[bool, str]:
    given = cond.tag or ""
    tag = resolve_tag(given)
    keyword = keyword_for_tag(tag)
    name = given if given == keyword or not keyword else f"{given} ({keyword})"
    elem = ds[tag] if tag in ds else None
    present = elem is not None and not elem.is_empty
    if cond.present is not None or cond.absent is not None:
        wanted = cond.present if cond.present is not None else not cond.absent
        return present == wanted, f"{name} is {'present' if present else 'absent'}"
    if elem is None or not present:
        return False, f"{name} is absent"
    if elem.VR == "SQ":
        return False, f"{name} is a sequence; only present/absent apply"
    value = elem.value
    values = list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]
    return _check_values(name, values, cond)


def _check_values(name: str, values: list[Any], test: _Operators) -> tuple[bool, str]:
    """A multi-valued element holds if any of its values does."""
    ((op, arg),) = test.operators().items()
    for value in values:
        if _holds(op, arg, value):
            return True, f"{name}: {_show(value)} {_phrase(op, arg)}"
    if len(values) == 1:
        return False, f"{name}: {_show(values[0])} {_phrase(op, arg, negated=True)}"
    shown = ", ".join(_show(v) for v in values)
    return False, f"{name}: none of [{shown}] {_phrase(op, arg)}"


def _holds(op: str, arg: Any, value: Any) -> bool:
    if op == "equals":
        return _equals(arg, value)
    if op == "one_of":
        return any(_equals(a, value) for a in arg)
    if op == "regex":
        return arg.search(str(value)) is not None
    if op == "glob":
        return fnmatchcase(str(value), arg)
    number = _number(value)  # range
    low, high = arg
    return number is not None and (low is None or low <= number) and (high is None or number <= high)


def _equals(expected: Any, value: Any) -> bool:
    if isinstance(expected, (int, float)) and not isinstance(expected, bool):
        return _number(value) == expected
    return str(value) == str(expected)


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _show(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return repr(str(value))


def _phrase(op: str, arg: Any, negated: bool = False) -> str:
    if op == "range":
        low, high = (f"{b:g}" if b is not None else "" for b in arg)
        return f"is {'not ' if negated else ''}in [{low or '-inf'}, {high or 'inf'}]"
    if op in ("equals", "one_of"):
        shown = _show(arg) if op == "equals" else f"[{', '.join(_show(a) for a in arg)}]"
        return f"is {'not ' if negated else ''}{'one of ' if op == 'one_of' else ''}{shown}"
    pattern = arg.pattern if op == "regex" else arg
    return f"{'does not match' if negated else 'matches'} {op} {pattern!r}"


def _check_host(specs: tuple[str, ...], host: str) -> tuple[bool, str]:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    for spec in specs:
        network = host_network(spec)
        if network is None and host.casefold() == spec.casefold():
            return True, f"sender host {host!r} is {spec!r}"
        if network is not None and address is not None and address in network:
            return True, f"sender host {host!r} is in {spec}"
    return False, f"sender host {host!r} is not in {list(specs)}"
