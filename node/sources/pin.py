"""A route forced on a series: ``segnode fetch --route/--profile`` and ``segnode reprocess``.

Without one, the node's rules decide (the completion sweep routes a retrieved
series like any push).  With one, the series' ``received`` job is completed
at once on the pinned route (:meth:`segnode.storage.index.Index.mark_complete`),
before the sweep sees it; if the sweep was first (it routes a series only after
its evidence and grace period, or the quiet period), the rules' route stands
and the outcome says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from segnode.errors import ConfigError
from segnode.node.config import NodeConfig
from segnode.routing.matcher import RuleSet, load_rules
from segnode.storage.index import Index


@dataclass(frozen=True)
class Pin:
    """The route a series is given: the rule name recorded on the job, its profile, backend, destinations."""

    rule: str
    profile: str
    backend: str | None = None
    destinations: tuple[str, ...] = ()
    harvest: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_rule(cls, rules: RuleSet, name: str) -> Pin:
        """The action of the rule ``name`` (its conditions are not checked: the operator chose it)."""
        rule = next((r for r in rules.rules if r.name == name), None)
        if rule is None:
            known = ", ".join(r.name for r in rules.rules)
            raise ConfigError(f"unknown rule {name!r} (rules in {rules.source}: {known})")
        action = rule.action
        if action.profiles is not None and len(action.profiles) > 1:
            raise ConfigError(f"rule {name!r} has several profiles: forcing it is not supported; use --profile")
        if any(d.startswith("@") for d in action.destinations):
            raise ConfigError(f"rule {name!r} sends to the sender (@sender): forcing it is not supported")
        return cls(rule.name, action.profile, action.backend.value if action.backend else None,
                   action.destinations, action.harvest, action.options())

    @classmethod
    def for_profile(cls, profile: str) -> Pin:
        """Segment with ``profile``; the result is kept (job folder, ops API), sent nowhere."""
        return cls(f"--profile {profile}", profile)


def pin_for(config: NodeConfig, *, route: str | None, profile: str | None) -> Pin | None:
    """The pin ``--route`` / ``--profile`` ask for (the rules of ``config.routes``); ``None`` for neither."""
    if route is not None and profile is not None:
        raise ConfigError("give a route or a profile, not both")
    if profile is not None:
        from segnode.profiles.loader import profile_paths

        known = set(profile_paths())
        if profile not in known:
            raise ConfigError(f"unknown profile {profile!r} (known: {', '.join(sorted(known))})")
        return Pin.for_profile(profile)
    if route is None:
        return None
    rules = RuleSet.default() if config.routes is None else load_rules(
        config.routes, destinations=tuple(d.name for d in config.destinations))
    return Pin.from_rule(rules, route)


def apply_pin(index: Index, series_uid: str, pin: Pin, *, note: str, supersedes: tuple[int, ...] = ()) -> int | None:
    """The series' ``received`` job completed on ``pin``: its id, or ``None`` if there was none left to pin.

    Earlier current results of the series with the same profile are superseded
    (as for a late instance, :mod:`segnode.node.sweep`), and ``supersedes`` too.
    """
    job = index.received_job(series_uid)
    if job is None:
        return None
    earlier = tuple(j.job_id for j in index.earlier_results(series_uid, job.job_id) if j.profile == pin.profile)
    replaced = sorted(set(earlier) | set(supersedes))
    options = {**pin.options, **({"supersedes": replaced} if replaced else {})}
    if index.mark_complete(job.job_id, rule=pin.rule, profile=pin.profile, backend=pin.backend,
                           destinations=pin.destinations, harvest=pin.harvest, options=options, note=note):
        return job.job_id
    return None
