"""Schema of the routing rules file (``routes.yaml``): frozen, validated models.

Rules are data.  A condition is one of: a test on a DICOM element (``tag``
with one operator), a test on the calling or called AE title, a test on the
sender's address, or ``all`` / ``any`` / ``not`` over other conditions.
Nothing in the file is ever evaluated as code.  The format is documented in
``docs/routing.md``.
"""

from __future__ import annotations

import difflib
import functools
import ipaddress
import re
from collections.abc import Collection
from contextvars import ContextVar
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BeforeValidator, Field, field_serializer, field_validator, model_validator
from pydicom.datadict import keyword_dict, tag_for_keyword
from pydicom.tag import BaseTag, Tag

from segnode.errors import ConfigError
from segnode.output_kinds import kinds_field
from segnode.profiles.schema import Backend
from segnode.yamlconf import Frozen, _line_of, read_yaml, validate

#: the destination that means "back to the sender's configured AE".
SENDER = "@sender"

Scalar = str | int | float
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=64)]

#: names the file may refer to, set by :func:`read_rules` while validating.
_KNOWN: ContextVar[tuple[frozenset[str] | None, frozenset[str] | None]] = ContextVar(
    "_KNOWN", default=(None, None)
)
_KINDS = ("tag", "calling_ae", "called_ae", "sender_host", "all", "any", "not_")
_TAG_TEXT = re.compile(r"^\(?([0-9A-Fa-f]{4}),\s*([0-9A-Fa-f]{4})\)?$")
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*$")


@functools.cache
def resolve_tag(text: str) -> BaseTag:
    """``"Modality"`` or ``"0008,0060"`` → the tag; ``ValueError`` naming the problem."""
    found = _TAG_TEXT.match(text)
    if found:
        return Tag(int(found[1], 16), int(found[2], 16))
    number = tag_for_keyword(text)
    if number is None:
        close = difflib.get_close_matches(text, keyword_dict, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown DICOM keyword {text!r}{hint}; use a keyword or 'gggg,eeee'")
    return Tag(number)


@functools.cache
def host_network(spec: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    """The network of an IP or CIDR ``spec``; ``None`` for a host name."""
    try:
        return ipaddress.ip_network(spec)
    except ValueError:
        if _HOSTNAME.match(spec) and not re.fullmatch(r"[\d.]+", spec):
            return None
        raise ValueError(f"{spec!r} is not an IP address, CIDR network or host name") from None


def _check_host(spec: str) -> str:
    host_network(spec)
    return spec


def _known_profile(name: str) -> str:
    profiles, _ = _KNOWN.get()
    if profiles is not None and name not in profiles:
        raise ValueError(f"unknown profile {name!r}; known: {', '.join(sorted(profiles))}")
    return name


def _known_destination(name: str) -> str:
    _, destinations = _KNOWN.get()
    if name.startswith("@") and name != SENDER:
        raise ValueError(f"unknown special destination {name!r}; the only one is {SENDER!r}")
    if name != SENDER and destinations is not None and name not in destinations:
        known = ", ".join(sorted(destinations)) or "(none configured)"
        raise ValueError(f"unknown destination {name!r}; known: {known}")
    return name


class _Operators(Frozen):
    """The value tests shared by element and AE-title conditions."""

    equals: Scalar | None = None
    one_of: Annotated[tuple[Scalar, ...], Field(min_length=1)] | None = None
    regex: re.Pattern[str] | None = None
    glob: str | None = None

    @field_validator("regex", mode="before")
    @classmethod
    def _compile(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return re.compile(value)
        except re.error as exc:
            raise ValueError(f"invalid regular expression {value!r}: {exc}") from None

    def operators(self) -> dict[str, Any]:
        """The operators this condition sets, by name."""
        names = ("equals", "one_of", "regex", "glob", "range", "present", "absent")
        return {n: getattr(self, n) for n in names if getattr(self, n, None) is not None}


class StringTest(_Operators):
    """A test on an AE title: exactly one of equals, one_of, regex, glob."""

    @model_validator(mode="before")
    @classmethod
    def _plain_string(cls, value: Any) -> Any:
        return {"equals": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one(self) -> StringTest:
        if len(self.operators()) != 1:
            raise ValueError("give exactly one of equals, one_of, regex, glob")
        return self


class Condition(_Operators):
    """One condition of a rule's ``match``; exactly one kind per condition."""

    tag: str | None = None
    range: tuple[float | None, float | None] | None = None
    present: bool | None = None
    absent: bool | None = None
    calling_ae: StringTest | None = None
    called_ae: StringTest | None = None
    sender_host: tuple[Annotated[str, AfterValidator(_check_host)], ...] | None = None
    all: Annotated[tuple[Condition, ...], Field(min_length=1)] | None = None
    any: Annotated[tuple[Condition, ...], Field(min_length=1)] | None = None
    not_: Condition | None = Field(default=None, alias="not")

    @field_validator("tag")
    @classmethod
    def _tag(cls, value: str | None) -> str | None:
        if value is not None:
            resolve_tag(value)
        return value

    @field_validator("range")
    @classmethod
    def _ordered(cls, value: tuple[float | None, float | None] | None) -> Any:
        low, high = value if value is not None else (None, None)
        if low is not None and high is not None and low > high:
            raise ValueError(f"range low {low:g} is above high {high:g}")
        if value == (None, None):
            raise ValueError("range needs a low or a high bound")
        return value

    @field_validator("sender_host", mode="before")
    @classmethod
    def _one_host(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @property
    def kind(self) -> str:
        """``tag``, ``calling_ae``, ``called_ae``, ``sender_host``, ``all``, ``any`` or ``not``."""
        return next(k for k in _KINDS if getattr(self, k) is not None).removesuffix("_")

    @model_validator(mode="after")
    def _one_kind(self) -> Condition:
        given = [k.removesuffix("_") for k in _KINDS if getattr(self, k) is not None]
        ops = list(self.operators())
        if not given and ops:
            raise ValueError(f"{ops[0]!r} needs a 'tag' (or goes inside calling_ae/called_ae)")
        if len(given) != 1:
            raise ValueError(
                "a condition needs exactly one of tag, calling_ae, called_ae, sender_host, "
                f"all, any, not; got {given or 'none'}"
            )
        if given == ["tag"] and len(ops) != 1:
            raise ValueError(
                f"tag {self.tag!r} needs exactly one of equals, one_of, regex, glob, range, "
                f"present, absent; got {ops or 'none'}"
            )
        if given != ["tag"] and ops:
            raise ValueError(f"{ops[0]!r} applies to a 'tag', not to {given[0]!r}")
        return self


def _dataset_name(name: str) -> str:
    """The dataset store's own naming rule (names become nnU-Net dataset names)."""
    from segnode.storage.dataset import check_dataset_name

    try:
        return check_dataset_name(name)
    except ConfigError as exc:
        raise ValueError(exc.message) from None


class QcPolicy(str, Enum):
    """What a route does with a result whose quality checks (models/qc.py) warned or failed."""

    SEND = "send"
    SEND_WITH_WARNING = "send_with_warning"  # sent; the job's reason and the log say which check
    HOLD = "hold"  # held for a reviewer (status page / POST /jobs/{id}/approve|reject)
    FAIL = "fail"  # the job fails with the QC reason; nothing is sent


#: ``review: <word>`` shorthands for the common policies.
_REVIEW_WORDS = {
    "never": {"on_warn": "send_with_warning", "on_fail": "send_with_warning"},
    "on_fail": {"on_warn": "send_with_warning", "on_fail": "hold"},
    "on_warn": {"on_warn": "hold", "on_fail": "hold"},
    "always": {"on_warn": "hold", "on_fail": "hold", "always": True},
}


class Review(Frozen):
    """When a route holds a result for clinical review (``action.review``)."""

    on_warn: QcPolicy = QcPolicy.SEND_WITH_WARNING
    on_fail: QcPolicy = QcPolicy.HOLD
    always: bool = Field(default=False, description="hold every result, whatever the checks say")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if isinstance(value, str):
            if value not in _REVIEW_WORDS:
                raise ValueError(f"review must be one of {sorted(_REVIEW_WORDS)} or a mapping, got {value!r}")
            return _REVIEW_WORDS[value]
        return value


class Select(Frozen):
    """Which series of a study a route segments (``action.select``; needs ``completion.group_by: study``).

    Series that cannot be segmented (localizers, secondary captures, derived
    images, SEG/RTSTRUCT/SR, our own outputs) are always skipped; of the rest,
    those failing a minimum here are skipped, and the preferences, in order,
    pick one (:mod:`segnode.routing.selection`).
    """

    orientation: Literal["axial", "coronal", "sagittal"] | None = "axial"
    min_slices: Annotated[int, Field(ge=1)] | None = None
    description: re.Pattern[str] | None = Field(default=None, description="regex on SeriesDescription")
    kernel: re.Pattern[str] | None = Field(default=None, description="regex on ConvolutionKernel")
    contrast: Literal["with", "without"] | None = Field(
        default=None, description="contrast phase, checked only when ContrastBolusAgent is given")
    prefer: tuple[Literal["thinnest", "thickest", "most_slices"], ...] = ("thinnest",)

    @field_validator("description", "kernel", mode="before")
    @classmethod
    def _compile(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return re.compile(value, re.IGNORECASE)
        except re.error as exc:
            raise ValueError(f"invalid regular expression {value!r}: {exc}") from None

    @field_serializer("description", "kernel")
    def _pattern_text(self, value: re.Pattern[str] | None) -> str | None:
        return None if value is None else value.pattern


class Priors(Frozen):
    """Measure against the patient's earlier studies (``action.priors``; docs/routing.md, "Priors").

    The node asks ``source`` (a ``sources:`` entry of the node config) for the
    patient's studies of the same modality from ``max_age_days`` before this
    study's date until the day before it, takes the newest ``count``, picks
    each one's series by the route's ``select`` rules, and reports each
    segment's volume on it and the change in the SR.
    """

    source: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", description="the sources: entry to ask")
    count: int = Field(1, ge=1, le=5, description="how many earlier studies, newest first")
    max_age_days: int = Field(1095, ge=1, le=36500, description="how far back a prior may be")


class Action(Frozen):
    """What to do with a study that a rule matches."""

    profile: Annotated[str, AfterValidator(_known_profile)]
    profiles: tuple[Annotated[str, AfterValidator(_known_profile)], ...] | None = Field(
        default=None, description="several profiles, model runs shared (hu_based: one per HU method); 'profile' is the first")
    combine: bool | None = Field(default=None, description="with 'profiles': one result for all, not one per profile")
    select: Select | None = Field(default=None, description="series selection per study")
    backend: Backend | None = None
    destinations: tuple[Annotated[str, AfterValidator(_known_destination)], ...] = ()
    harvest: Annotated[str, AfterValidator(_dataset_name)] | None = None
    review: Review | None = Field(default=None, description="QC policy; absent: send, QC only recorded")
    outputs: Annotated[tuple[str, ...] | None, BeforeValidator(kinds_field)] = Field(
        default=None, description="kinds to encode (seg, rtstruct, overlay, sr); absent: what the destinations take")
    rtstruct_holes: Literal["keyhole", "xor"] | None = Field(
        default=None, description="RTSTRUCT holes: keyhole contours (absent: the default) or CLOSEDPLANAR_XOR")
    queue: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
                              description="broker queue for remote workers (gpu, cpu; docs/scaling.md)")
    priority: Literal["urgent", "routine", "research"] | None = Field(
        default=None, description="priority on the broker queue; absent: broker.default_priority")
    priors: Priors | None = Field(default=None, description="report the volume change since earlier studies")

    @model_validator(mode="before")
    @classmethod
    def _profile_or_profiles(cls, value: Any) -> Any:
        if not isinstance(value, dict) or "profiles" not in value:
            return value
        profiles = value["profiles"]
        if "profile" in value:
            raise ValueError("give 'profile' or 'profiles', not both")
        if not isinstance(profiles, (list, tuple)) or not profiles:
            raise ValueError("'profiles' is a non-empty list of profile names")
        if len(set(map(str, profiles))) != len(profiles):
            raise ValueError("'profiles' names a profile twice")
        return {**value, "profile": profiles[0]}

    def options(self) -> dict[str, Any]:
        """Every setting beyond profile, backend, destinations and harvest, as JSON-ready data.

        The job carries these (:attr:`segnode.storage.index.Job.options`) to the worker and the
        dispatcher, so that a new action setting needs no new index column.
        """
        return self.model_dump(mode="json", exclude={"profile", "backend", "destinations", "harvest"},
                               exclude_none=True, by_alias=True)


class Rule(Frozen):
    """A named rule: a condition (or ``fallback: true``) and an action."""

    name: Name
    match: Condition | None = None
    fallback: bool = False
    action: Action

    @model_validator(mode="after")
    def _match_or_fallback(self) -> Rule:
        if self.fallback and self.match is not None:
            raise ValueError("a fallback rule has no 'match'")
        if not self.fallback and self.match is None:
            raise ValueError("a rule needs 'match' (or 'fallback: true')")
        return self


class RulesFile(Frozen):
    rules: tuple[Rule, ...]


def _check_order(rules: tuple[Rule, ...], path: Path, node: yaml.Node | None) -> None:
    """Rule names unique; at most one fallback, and it is last."""
    seen: set[str] = set()
    for i, rule in enumerate(rules):
        problem = None
        if rule.name in seen:
            problem = f"duplicate rule name {rule.name!r}"
        elif rule.fallback and i != len(rules) - 1:
            problem = f"fallback rule {rule.name!r} must be the last rule"
        if problem:
            raise ConfigError(f"{path}:{_line_of(node, ('rules', i))}: rules[{i}]: {problem}")
        seen.add(rule.name)


def read_rules(
    path: Path,
    *,
    profiles: Collection[str] | None = None,
    destinations: Collection[str] | None = None,
) -> tuple[Rule, ...]:
    """Read and validate a rules file; unknown profiles/destinations are errors when given."""
    data, node = read_yaml(Path(path))
    known = (
        None if profiles is None else frozenset(profiles),
        None if destinations is None else frozenset(destinations),
    )
    token = _KNOWN.set(known)
    try:
        rules = validate(RulesFile, data, Path(path), node).rules
    finally:
        _KNOWN.reset(token)
    _check_order(rules, Path(path), node)
    if profiles is not None:
        _check_runs(rules, Path(path), node)
    return rules


def _check_runs(rules: tuple[Rule, ...], path: Path, node: yaml.Node | None) -> None:
    """Every route can run: its backend can segment each of its profiles (:mod:`segnode.models.capability`)."""
    from segnode.models.capability import route_problems
    from segnode.profiles.loader import load_profile

    for i, rule in enumerate(rules):
        action = rule.action
        names = action.profiles or (action.profile,)
        problems = route_problems([load_profile(name) for name in names], action.backend)
        if problems:
            raise ConfigError(f"{path}:{_line_of(node, ('rules', i, 'action', 'profiles'))}: rules[{i}] {rule.name!r} "
                              f"(profiles {', '.join(names)}) cannot run: {'; '.join(problems)}")
