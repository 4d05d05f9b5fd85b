"""DICOM PS3.15 Annex E, Table E.1-1, loaded from the vendored copy of the standard's table.

Each row names an attribute (or a pattern: the 50xx curve groups, the 60xx
overlay elements, private attributes), its action under the Basic Application
Level Confidentiality Profile (``D``, ``Z``, ``X``, ``K``, ``C``, ``U`` or a
combination such as ``X/Z/D``) and its action under each option.  The table is
data: :mod:`segnode.storage.deid` resolves it into one action per tag and never lists
attributes of its own, except the handful of IOD types (:data:`IOD_TYPE`) the
standard leaves to the implementation when it writes a combined code.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from enum import Enum
from functools import lru_cache
from importlib import resources

from segnode.errors import ConfigError

TABLE_FILE = "confidentiality_profile_attributes.json"


class Action(str, Enum):
    """Action codes of Table E.1-1."""

    DUMMY = "D"  #: replace with a non-zero-length dummy value consistent with the VR
    EMPTY = "Z"  #: replace with a zero-length value
    REMOVE = "X"  #: remove
    KEEP = "K"  #: keep (sequences: cleaned recursively)
    CLEAN = "C"  #: clean (dates shifted, text scrubbed)
    UID = "U"  #: replace with a consistent non-zero-length UID
    UID_SEQUENCE = "U*"  #: keep the sequence, replace the instance UIDs it contains


class Option(str, Enum):
    """Profile options, named by their column in the table."""

    RETAIN_LONGITUDINAL_MODIFIED_DATES = "rtnLongModifDatesOpt"
    RETAIN_PATIENT_CHARACTERISTICS = "rtnPatCharsOpt"
    RETAIN_DEVICE_IDENTITY = "rtnDevIdOpt"
    CLEAN_DESCRIPTORS = "cleanDescOpt"


#: DCM codes (CID 7050) for DeidentificationMethodCodeSequence.
BASIC_PROFILE_CODE = ("113100", "Basic Application Confidentiality Profile")
OPTION_CODES: dict[Option, tuple[str, str]] = {
    Option.RETAIN_LONGITUDINAL_MODIFIED_DATES: (
        "113107",
        "Retain Longitudinal Temporal Information Modified Dates Option",
    ),
    Option.RETAIN_PATIENT_CHARACTERISTICS: ("113108", "Retain Patient Characteristics Option"),
    Option.RETAIN_DEVICE_IDENTITY: ("113109", "Retain Device Identity Option"),
    Option.CLEAN_DESCRIPTORS: ("113105", "Clean Descriptors Option"),
}

#: Attribute types in the IODs we write and harvest (CT Image, Segmentation), used only to
#: resolve combined codes: type 1 → ``D``, type 2 → ``Z``, anything else → ``X``.
IOD_TYPE: dict[int, int] = {
    0x00181000: 1,  # Device Serial Number: type 1 in Enhanced General Equipment (SEG)
    0x00080023: 1,  # Content Date: type 1 in the Segmentation IOD
    0x00080033: 1,  # Content Time: type 1 in the Segmentation IOD
    0x00700084: 2,  # Content Creator's Name: type 2 in Segmentation Image
    0x00180010: 2,  # Contrast/Bolus Agent: type 2 in Contrast/Bolus
    0x00100020: 2,  # Patient ID: type 2 in Patient (we write a pseudonym, see deid)
}

_TAG = re.compile(r"\(([0-9A-F]{4}),([0-9A-F]{4})\)")
_REPEATING = re.compile(r"\(([0-9A-F]{2})XX,([0-9A-FX]{4})\)")


@dataclass(frozen=True)
class Row:
    """One row of Table E.1-1."""

    name: str
    tag_text: str
    basic: tuple[Action, ...]
    options: dict[Option, Action] = field(default_factory=dict)

    def action(self, enabled: frozenset[Option], tag: int) -> Action:
        """The one action for this row under ``enabled`` options.

        An option's ``K`` wins over its ``C``, and either over the basic profile;
        a combined basic code resolves through :data:`IOD_TYPE`.
        """
        chosen = [self.options[o] for o in enabled if o in self.options]
        if Action.KEEP in chosen:
            return Action.KEEP
        if chosen:
            return chosen[0]
        return resolve_combined(self.basic, tag)


def resolve_combined(codes: tuple[Action, ...], tag: int) -> Action:
    """Pick one action from a combined code such as ``X/Z/D``."""
    if len(codes) == 1:
        return codes[0]
    if Action.UID_SEQUENCE in codes:
        return Action.UID_SEQUENCE  # keep references, remapped (the SEG needs them)
    kind = IOD_TYPE.get(tag)
    if kind == 1 and Action.DUMMY in codes:
        return Action.DUMMY
    if kind in (1, 2) and Action.EMPTY in codes:
        return Action.EMPTY
    return Action.REMOVE if Action.REMOVE in codes else codes[-1]


@dataclass(frozen=True)
class Table:
    """The parsed table: single-tag rows and pattern rows."""

    by_tag: dict[int, Row]
    #: (group high byte, element or None for any element) → row, for 50xx/60xx rows
    repeating: dict[tuple[int, int | None], Row]
    private: Row

    def row_for(self, tag: int) -> Row | None:
        """The row governing ``tag`` (private tags: the private row)."""
        if tag in self.by_tag:
            return self.by_tag[tag]
        group, element = tag >> 16, tag & 0xFFFF
        if group % 2 == 1:
            return self.private
        high = group >> 8
        if group & 0xFF <= 0x1E and group % 2 == 0:
            return self.repeating.get((high, element)) or self.repeating.get((high, None))
        return None


def _parse_codes(text: str, where: str) -> tuple[Action, ...]:
    try:
        return tuple(Action(code) for code in text.split("/"))
    except ValueError as exc:
        raise ConfigError(f"unknown action code {text!r}", where=where) from exc


def _parse_row(raw: dict[str, str]) -> tuple[str, Row]:
    where = f"{TABLE_FILE}: {raw.get('tag')}"
    options = {
        option: _parse_codes(raw[option.value], where)[0] for option in Option if raw.get(option.value)
    }
    return raw["tag"], Row(raw["name"], raw["tag"], _parse_codes(raw["basicProfile"], where), options)


def parse_table(rows: list[dict[str, str]]) -> Table:
    """Build a :class:`Table` from the JSON rows."""
    by_tag: dict[int, Row] = {}
    repeating: dict[tuple[int, int | None], Row] = {}
    private: Row | None = None
    for raw in rows:
        text, row = _parse_row(raw)
        if (match := _TAG.fullmatch(text)) is not None:
            by_tag[int(match[1] + match[2], 16)] = row
        elif (match := _REPEATING.fullmatch(text)) is not None:
            element = None if match[2] == "XXXX" else int(match[2], 16)
            repeating[(int(match[1], 16), element)] = row
        elif "ODD" in text.upper():
            private = row
        else:
            raise ConfigError(f"row {text!r} is neither a tag nor a known pattern", where=TABLE_FILE)
    if private is None:
        raise ConfigError("the private-attributes row is missing", where=TABLE_FILE)
    return Table(by_tag, repeating, private)


@lru_cache(maxsize=1)
def load_table() -> Table:
    """The vendored table, parsed once."""
    text = resources.files("segnode.storage").joinpath("data", TABLE_FILE).read_text(encoding="utf-8")
    return parse_table(json.loads(text))


def raw_rows() -> list[dict[str, str]]:
    """The vendored rows as JSON objects (for table-driven tests and docs)."""
    text = resources.files("segnode.storage").joinpath("data", TABLE_FILE).read_text(encoding="utf-8")
    return json.loads(text)
