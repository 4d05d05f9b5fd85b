"""The kinds of DICOM object a job can produce, shared by routing and the node.

Routes ask for kinds (``action.outputs``), destinations say which kinds they
take (``destinations[].outputs``), the worker encodes them
(:mod:`segnode.node.writers.kinds`).  This module holds only the names and their
validation, so that the routing layer can check a rules file without
importing the node.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum

from segnode.errors import ConfigError


class OutputKind(str, Enum):
    SEG = "seg"
    RTSTRUCT = "rtstruct"
    OVERLAY = "overlay"
    SR = "sr"


ALL_KINDS: tuple[str, ...] = tuple(k.value for k in OutputKind)

#: the kind of an IOCM Rejection Note (a KOS) a superseding job writes for the result it replaces; no route
#: asks for it, a destination takes it with ``rejection_notes: true`` (node/writers/rejection.py)
REJECTION_NOTE = "rejection"


def parse_kinds(kinds: str | Iterable[str] | None, *, where: str = "outputs") -> tuple[str, ...]:
    """Validated kind names, in canonical order, without duplicates (``ConfigError`` on a bad one).

    Accepts one name, a comma-separated string (``"seg,rtstruct"``), or a list of names or kinds.
    """
    if isinstance(kinds, str):
        kinds = kinds.split(",")
    names = [str(getattr(k, "value", k)).strip().lower() for k in (kinds or ())]
    names = [n for n in names if n]
    bad = [n for n in names if n not in ALL_KINDS]
    if bad:
        raise ConfigError(f"unknown output kind(s) {', '.join(bad)}; choose from {', '.join(ALL_KINDS)}", where=where)
    return tuple(k for k in ALL_KINDS if k in names)


def encoded_with(kinds: str | Iterable[str] | None) -> tuple[str, ...]:
    """``kinds`` (validated, canonical order; none: the SEG) with what they need: an SR refers to its SEG."""
    wanted = parse_kinds(kinds) or (OutputKind.SEG.value,)
    if OutputKind.SR.value in wanted:
        wanted = parse_kinds((OutputKind.SEG.value, *wanted))
    return wanted


def kinds_field(value: object) -> tuple[str, ...] | None:
    """Pydantic ``before`` validator of an ``outputs`` key: ``ValueError`` (file:line added by the loader)."""
    if value is None:
        return None
    if not isinstance(value, (str, list, tuple)):
        raise ValueError(f"give a kind name or a list of them, not {type(value).__name__}")
    try:
        kinds = parse_kinds(value)
    except ConfigError as exc:
        raise ValueError(exc.message) from None
    if not kinds:
        raise ValueError(f"give at least one output kind ({', '.join(ALL_KINDS)})")
    return kinds
