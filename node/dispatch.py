"""The dispatch policy: when to try a delivery again, what one delivery's objects add up to, what a job encodes.

Sending itself lives in :mod:`segnode.node.sending` (a sender and a delivery
queue per destination); this module only decides.  A try that fails with a
retryable result (its :class:`~segnode.node.status.Category`: no
connection, a timeout, a transient rejection, an abort, out of resources) is
tried again after an exponential backoff (:func:`backoff_s`) until
``dispatch.max_attempts``; a permanent failure goes to dead-letter at once.
All objects of a job for one destination go in one association (or one
STOW-RS request), each with its own result, so that a retry re-sends only what
was not stored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from segnode.errors import ConfigError
from segnode.node.config import Dispatch, NodeConfig
from segnode.node.status import Category
from segnode.output_kinds import OutputKind, parse_kinds


class Outcome(Protocol):
    """What the policy needs of one object's try (a sender's ``SendResult`` is one)."""

    @property
    def category(self) -> Category: ...

    @property
    def message(self) -> str: ...


@dataclass(frozen=True)
class Summary:
    """One delivery's try, from its objects' (:func:`summarise`)."""

    category: Category
    message: str

    @property
    def ok(self) -> bool:
        return self.category is Category.STORED


def backoff_s(attempts: int, initial_s: float, max_s: float) -> float:
    """Delay before the next try after ``attempts`` failed ones: ``initial·2^(n-1)``, capped."""
    return min(max_s, initial_s * 2 ** max(0, attempts - 1))


def next_try_at(outcome: Category, tries: int, policy: Dispatch, now: float) -> float | None:
    """When to try again after ``tries`` tries, the last ending ``outcome``; None: no more tries (done or dead)."""
    if outcome is not Category.RETRYABLE or tries >= policy.max_attempts:
        return None
    return now + backoff_s(tries, policy.backoff_initial_s, policy.backoff_max_s)


def summarise(kinds: Sequence[str], results: Sequence[Outcome],
              dead: Sequence[tuple[str, str]] = ()) -> Summary:
    """One delivery's result from its objects': ``kinds[i]`` was sent with ``results[i]``.

    Stored when every object is (``dead``: objects of earlier attempts that failed for good);
    retryable when a failure is; the message names the kind of each failure.
    """
    failed = [(k, r.message) for k, r in zip(kinds, results) if r.category is not Category.STORED] + list(dead)
    if not failed:
        return Summary(Category.STORED, f"stored {len(results)} object(s)" if results else "nothing left to send")
    by_message: dict[str, list[str]] = {}
    for kind, message in failed:
        by_message.setdefault(message, []).append(kind)
    text = "; ".join(f"{', '.join(dict.fromkeys(k))}: {m}" for m, k in by_message.items())
    retry = any(r.category is Category.RETRYABLE for r in results)
    return Summary(Category.RETRYABLE if retry else Category.PERMANENT, text)


def encoded_kinds(config: NodeConfig, route_outputs: Sequence[str] | None,
                  destinations: Sequence[str]) -> tuple[str, ...]:
    """The kinds a job encodes: the route's ``outputs``, else what its destinations take.

    A destination without ``outputs`` counts as taking ``seg``; no destination at all: ``seg``.
    A destination is then sent the encoded kinds it takes (:meth:`Destination.takes`).
    """
    if route_outputs:
        return parse_kinds(route_outputs)
    wanted: list[str] = []
    for name in destinations:
        try:
            wanted += config.destination(name).outputs or [OutputKind.SEG.value]
        except ConfigError:  # gone from the config since routing: dispatch reports it
            wanted.append(OutputKind.SEG.value)
    return parse_kinds(wanted) or (OutputKind.SEG.value,)
