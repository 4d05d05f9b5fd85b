"""Routing: YAML rules that pick a profile, backend and destinations per study.

``from routing import RuleSet, Decision, load_rules``; see ``docs/routing.md``.
"""

from segnode.routing.matcher import Decision, RuleSet, RuleTrace, load_rules
from segnode.routing.reload import RulesHolder, install_sighup
from segnode.routing.rules import SENDER

__all__ = ["SENDER", "Decision", "RuleSet", "RuleTrace", "RulesHolder", "install_sighup", "load_rules"]
