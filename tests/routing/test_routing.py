"""Routing rules: every operator, nesting, explanations, real DICOM files, load errors."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset
from pydicom.sequence import Sequence
from segnode.errors import ConfigError
from segnode.routing import Decision, RuleSet, load_rules
from segnode.routing.matcher import Facts, check
from segnode.routing.rules import Condition

from tests.paths import DATA

ASSOC = {"calling_ae": "ER_CT1", "called_ae": "SEGNODE", "sender_host": "10.1.2.3"}


def _ds(**elements: object) -> Dataset:
    ds = Dataset()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    return ds


CT = _ds(
    Modality="CT",
    BodyPartExamined="HEAD",
    ImageType=["ORIGINAL", "PRIMARY", "AXIAL"],
    SliceThickness="2.500",
    SeriesDescription="Brain 2.5 mm",
    ContrastBolusAgent="",
    KVP="120",
    ReferencedImageSequence=Sequence([Dataset()]),
)

# (condition, holds, reason)
CASES = [
    ({"tag": "Modality", "equals": "CT"}, True, "Modality: 'CT' is 'CT'"),
    ({"tag": "Modality", "equals": "ct"}, False, "Modality: 'CT' is not 'ct'"),
    ({"tag": "KVP", "equals": 120}, True, "KVP: 120 is 120"),
    ({"tag": "SliceThickness", "equals": 2.5}, True, "is 2.5"),
    ({"tag": "SliceThickness", "equals": "2.5"}, False, "is not '2.5'"),
    ({"tag": "Modality", "one_of": ["CT", "MR"]}, True, "is one of ['CT', 'MR']"),
    ({"tag": "Modality", "one_of": ["MR"]}, False, "Modality: 'CT' is not one of ['MR']"),
    ({"tag": "SeriesDescription", "regex": "(?i)brain"}, True, "matches regex '(?i)brain'"),
    ({"tag": "SeriesDescription", "regex": "brain"}, False, "does not match regex 'brain'"),
    ({"tag": "SeriesDescription", "regex": "^2.5"}, False, "does not match"),  # search, anchored
    ({"tag": "SeriesDescription", "regex": "2\\.5"}, True, "matches"),
    ({"tag": "SeriesDescription", "glob": "Brain*"}, True, "matches glob 'Brain*'"),
    ({"tag": "SeriesDescription", "glob": "Brain"}, False, "does not match glob"),  # whole value
    ({"tag": "SeriesDescription", "glob": "brain*"}, False, "does not match glob"),  # case
    ({"tag": "0018,0050", "range": [0, 5]}, True, "0018,0050 (SliceThickness): 2.500 is in [0, 5]"),
    ({"tag": "(0018,0050)", "range": [2.5, 2.5]}, True, "is in [2.5, 2.5]"),  # inclusive
    ({"tag": "SliceThickness", "range": [3, None]}, False, "SliceThickness: 2.500 is not in [3, inf]"),
    ({"tag": "SliceThickness", "range": [None, 2.5]}, True, "is in [-inf, 2.5]"),
    ({"tag": "Modality", "range": [0, 5]}, False, "'CT' is not in [0, 5]"),
    ({"tag": "Modality", "present": True}, True, "Modality is present"),
    ({"tag": "ContrastBolusAgent", "present": True}, False, "ContrastBolusAgent is absent"),  # empty
    ({"tag": "ContrastBolusAgent", "absent": True}, True, "ContrastBolusAgent is absent"),
    ({"tag": "PatientAge", "absent": True}, True, "PatientAge is absent"),
    ({"tag": "PatientAge", "present": False}, True, "PatientAge is absent"),
    ({"tag": "Modality", "absent": True}, False, "Modality is present"),
    ({"tag": "PatientAge", "equals": "040Y"}, False, "PatientAge is absent"),
    ({"tag": "ReferencedImageSequence", "present": True}, True, "is present"),
    ({"tag": "ReferencedImageSequence", "equals": "x"}, False, "is a sequence"),
    # multi-valued: any value
    ({"tag": "ImageType", "equals": "AXIAL"}, True, "ImageType: 'AXIAL' is 'AXIAL'"),
    ({"tag": "ImageType", "regex": "LOCALIZER"}, False,
     "ImageType: none of ['ORIGINAL', 'PRIMARY', 'AXIAL'] matches regex 'LOCALIZER'"),
    # association facts
    ({"calling_ae": "ER_CT1"}, True, "calling AE: 'ER_CT1' is 'ER_CT1'"),
    ({"calling_ae": {"glob": "ER_*"}}, True, "matches glob 'ER_*'"),
    ({"calling_ae": {"regex": "^CT"}}, False, "calling AE: 'ER_CT1' does not match regex '^CT'"),
    ({"called_ae": {"one_of": ["SEGNODE", "SEG2"]}}, True, "called AE: 'SEGNODE' is one of"),
    ({"called_ae": "OTHER"}, False, "called AE: 'SEGNODE' is not 'OTHER'"),
    ({"sender_host": "10.0.0.0/8"}, True, "sender host '10.1.2.3' is in 10.0.0.0/8"),
    ({"sender_host": ["10.1.2.3"]}, True, "is in 10.1.2.3"),
    ({"sender_host": ["192.168.0.0/16", "::1", "pacs.local"]}, False,
     "sender host '10.1.2.3' is not in ['192.168.0.0/16', '::1', 'pacs.local']"),
]


@pytest.mark.parametrize(("cond", "holds", "reason"), CASES, ids=[str(c[0]) for c in CASES])
def test_operator(cond: dict, holds: bool, reason: str) -> None:
    got, why = check(Condition.model_validate(cond), Facts(CT, **ASSOC))
    assert got is holds
    assert reason in why


def test_sender_host_forms() -> None:
    by_ip6 = Facts(CT, "A", "B", "::ffff:10.1.2.3")
    assert check(Condition.model_validate({"sender_host": "10.1.0.0/16"}), by_ip6)[0]
    by_name = Facts(CT, "A", "B", "PACS.local")
    assert check(Condition.model_validate({"sender_host": "pacs.local"}), by_name)[0]
    assert not check(Condition.model_validate({"sender_host": "10.0.0.0/8"}), by_name)[0]


NESTED = [
    ({"all": [{"tag": "Modality", "equals": "CT"}, {"tag": "BodyPartExamined", "equals": "CHEST"}]},
     False, "BodyPartExamined: 'HEAD' is not 'CHEST'"),
    ({"all": [{"tag": "Modality", "equals": "CT"}, {"calling_ae": {"glob": "ER*"}}]}, True,
     "Modality: 'CT' is 'CT' and calling AE: 'ER_CT1' matches glob 'ER*'"),
    ({"any": [{"tag": "Modality", "equals": "MR"}, {"tag": "Modality", "equals": "PT"}]}, False,
     "none of any: Modality: 'CT' is not 'MR'; Modality: 'CT' is not 'PT'"),
    ({"any": [{"tag": "Modality", "equals": "MR"}, {"tag": "KVP", "range": [100, 140]}]}, True,
     "KVP: 120 is in [100, 140]"),
    ({"not": {"tag": "ImageType", "equals": "AXIAL"}}, False,
     "excluded by 'not': ImageType: 'AXIAL' is 'AXIAL'"),
    ({"not": {"tag": "ImageType", "equals": "LOCALIZER"}}, True, "not (ImageType: none of"),
    ({"not": {"not": {"tag": "Modality", "equals": "CT"}}}, True, "not (excluded by 'not'"),
    ({"all": [{"any": [{"not": {"tag": "Modality", "equals": "CT"}}, {"called_ae": "SEGNODE"}]},
              {"not": {"all": [{"tag": "KVP", "equals": 120}, {"sender_host": "10.0.0.0/8"}]}}]},
     False, "excluded by 'not': KVP: 120 is 120 and sender host"),
]


@pytest.mark.parametrize(("cond", "holds", "reason"), NESTED, ids=range(len(NESTED)))
def test_nesting(cond: dict, holds: bool, reason: str) -> None:
    got, why = check(Condition.model_validate(cond), Facts(CT, **ASSOC))
    assert got is holds
    assert reason in why


EXAMPLE = """\
rules:
  - name: head-ct-from-er
    match:
      all:
        - {tag: Modality, equals: CT}
        - {tag: BodyPartExamined, one_of: [HEAD, BRAIN]}
        - {calling_ae: {glob: "ER_CT*"}}
        - any: [{tag: SeriesDescription, regex: "(?i)brain"}, {tag: "0018,0050", range: [0, 5]}]
        - not: {tag: ImageType, regex: "LOCALIZER"}
        - {tag: ContrastBolusAgent, absent: true}
    action: {profile: brain, backend: hu_based, destinations: ["@sender", pacs_main], harvest: brain_v1}
  - name: chest
    match: {tag: BodyPartExamined, equals: CHEST}
    action: {profile: lungs, destinations: [pacs_main]}
"""


@pytest.fixture
def example(tmp_path: Path) -> RuleSet:
    path = tmp_path / "routes.yaml"
    path.write_text(EXAMPLE + "  - name: fallback\n    fallback: true\n    action: {profile: liver}\n")
    return load_rules(path, profiles={"brain", "lungs", "liver"}, destinations={"pacs_main"})


def test_real_head_ct_matches_first_rule(example: RuleSet) -> None:
    head = pydicom.dcmread(DATA / "gantry_tilt" / "I210", stop_before_pixels=True)
    assert example.evaluate(head, **ASSOC) == Decision(
        "head-ct-from-er", "brain", "hu_based", ("@sender", "pacs_main"), "brain_v1"
    )
    (trace,) = example.explain(head, **ASSOC)
    assert trace.matched and "BodyPartExamined: 'BRAIN' is one of ['HEAD', 'BRAIN']" in trace.reason


def test_real_files_fall_through_with_reasons(example: RuleSet) -> None:
    head = pydicom.dcmread(DATA / "gantry_tilt" / "I210", stop_before_pixels=True)
    traces = example.explain(head, **{**ASSOC, "calling_ae": "OTHER"})
    assert [(t.rule, t.matched) for t in traces] == [
        ("head-ct-from-er", False), ("chest", False), ("fallback", True)]
    assert traces[0].reason == "calling AE: 'OTHER' does not match glob 'ER_CT*'"
    assert traces[1].reason == "BodyPartExamined: 'BRAIN' is not 'CHEST'"

    chest = pydicom.dcmread(DATA / "thorax_cta" / "CT0001.dcm", stop_before_pixels=True)
    assert example.evaluate(chest, **ASSOC) == Decision("chest", "lungs", None, ("pacs_main",), None)
    mr = pydicom.dcmread(DATA / "edge_cases" / "pydicom" / "MR_small_RLE.dcm", stop_before_pixels=True)
    assert example.explain(mr, **ASSOC)[0].reason == "Modality: 'MR' is not 'CT'"
    assert example.evaluate(mr, **ASSOC).rule == "fallback"


def test_no_match_is_not_routed(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(EXAMPLE)
    rules = load_rules(path)  # no collections: names are not checked
    mr = pydicom.dcmread(DATA / "edge_cases" / "pydicom" / "MR_small_RLE.dcm", stop_before_pixels=True)
    assert rules.evaluate(mr, **ASSOC) is None
    assert [t.matched for t in rules.explain(mr, **ASSOC)] == [False, False]
    empty = tmp_path / "empty.yaml"
    empty.write_text("rules: []\n")
    assert load_rules(empty).evaluate(mr, **ASSOC) is None


def test_default_rules() -> None:
    decision = RuleSet.default().evaluate(Dataset(), calling_ae="", called_ae="", sender_host="")
    assert decision == Decision("fallback", "lungs", None, (), None)


def test_ruleset_is_immutable(example: RuleSet) -> None:
    with pytest.raises(AttributeError):
        example.rules = ()  # type: ignore[misc]
    with pytest.raises(ValueError):
        example.rules[0].action.profile = "x"  # type: ignore[misc]


R = "rules:\n  - name: a\n"
ERRORS = [
    ("unknown keyword", R + "    match: {tag: Modalty, equals: CT}\n    action: {profile: lungs}\n",
     ":3: rules[0].match.tag: unknown DICOM keyword 'Modalty' (did you mean 'Modality'?)"),
    ("bad regex", R + "    match:\n      any:\n        - {tag: Modality, equals: CT}\n"
     "        - {tag: SeriesDescription, regex: '(brain'}\n    action: {profile: lungs}\n",
     ":6: rules[0].match.any[1].regex: invalid regular expression '(brain'"),
    ("no operator", R + "    match: {tag: Modality}\n    action: {profile: lungs}\n",
     ":3: rules[0].match: tag 'Modality' needs exactly one of equals"),
    ("two operators", R + "    match: {tag: Modality, equals: CT, glob: 'C*'}\n    action: {profile: lungs}\n",
     "got ['equals', 'glob']"),
    ("unknown key", R + "    match: {tag: Modality, equal: CT}\n    action: {profile: lungs}\n",
     ":3: rules[0].match.equal: Extra inputs are not permitted"),
    ("operator without tag", R + "    match: {equals: CT}\n    action: {profile: lungs}\n",
     ":3: rules[0].match: 'equals' needs a 'tag'"),
    ("operator on all", R + "    match: {all: [{called_ae: X}], equals: CT}\n    action: {profile: lungs}\n",
     "'equals' applies to a 'tag', not to 'all'"),
    ("two kinds", R + "    match: {tag: Modality, equals: CT, calling_ae: X}\n    action: {profile: lungs}\n",
     "exactly one of tag, calling_ae, called_ae, sender_host, all, any, not; got ['tag', 'calling_ae']"),
    ("empty all", R + "    match: {all: []}\n    action: {profile: lungs}\n",
     ":3: rules[0].match.all: Tuple should have at least 1 item"),
    ("ae operator", R + "    match: {calling_ae: {glb: X}}\n    action: {profile: lungs}\n",
     ":3: rules[0].match.calling_ae.glb: Extra inputs"),
    ("bad range", R + "    match: {tag: SliceThickness, range: [5, 1]}\n    action: {profile: lungs}\n",
     ":3: rules[0].match.range: range low 5 is above high 1"),
    ("open range", R + "    match: {tag: SliceThickness, range: [null, null]}\n    action: {profile: lungs}\n",
     "range needs a low or a high bound"),
    ("bad host", R + "    match:\n      sender_host:\n        - 10.0.0.0/8\n        - 10.1.2.3/8\n"
     "    action: {profile: lungs}\n",
     ":6: rules[0].match.sender_host[1]: '10.1.2.3/8' is not an IP address, CIDR network or host name"),
    ("unknown profile", R + "    match: {tag: Modality, equals: CT}\n    action:\n      profile: lung\n",
     ":5: rules[0].action.profile: unknown profile 'lung'; known: brain, lungs"),
    ("unknown backend", R + "    match: {tag: Modality, equals: CT}\n    action: {profile: lungs, backend: gpu}\n",
     ":4: rules[0].action.backend: Input should be 'hu_based'"),
    ("unknown destination", R + "    match: {tag: Modality, equals: CT}\n    action:\n      profile: lungs\n"
     "      destinations: [pacs, '@sender', pac]\n",
     ":6: rules[0].action.destinations[2]: unknown destination 'pac'; known: pacs"),
    ("unknown special", R + "    match: {tag: Modality, equals: CT}\n    action:\n      profile: lungs\n"
     "      destinations: ['@snder']\n", "unknown special destination '@snder'"),
    ("bad harvest", R + "    match: {tag: Modality, equals: CT}\n    action: {profile: lungs, harvest: '../x'}\n",
     ":4: rules[0].action.harvest: dataset name '../x' must be a letter"),
    ("unknown output kind", R + "    match: {tag: Modality, equals: CT}\n    action:\n      profile: lungs\n"
     "      outputs: [seg, rtstrct]\n",
     ":6: rules[0].action.outputs: unknown output kind(s) rtstrct; choose from seg, rtstruct, overlay, sr"),
    ("no output kind", R + "    match: {tag: Modality, equals: CT}\n    action: {profile: lungs, outputs: []}\n",
     ":4: rules[0].action.outputs: give at least one output kind"),
    ("no match", R + "    action: {profile: lungs}\n", ":2: rules[0]: a rule needs 'match'"),
    ("fallback with match", R + "    fallback: true\n    match: {tag: Modality, equals: CT}\n"
     "    action: {profile: lungs}\n", ":2: rules[0]: a fallback rule has no 'match'"),
    ("fallback not last", "rules:\n  - name: fb\n    fallback: true\n    action: {profile: lungs}\n"
     "  - name: a\n    match: {tag: Modality, equals: CT}\n    action: {profile: lungs}\n",
     ":2: rules[0]: fallback rule 'fb' must be the last rule"),
    ("two fallbacks", "rules:\n  - name: fb\n    fallback: true\n    action: {profile: lungs}\n"
     "  - name: fb2\n    fallback: true\n    action: {profile: lungs}\n", "must be the last rule"),
    ("duplicate name", R + "    match: {tag: Modality, equals: CT}\n    action: {profile: lungs}\n"
     "  - name: a\n    match: {tag: Modality, equals: MR}\n    action: {profile: lungs}\n",
     ":5: rules[1]: duplicate rule name 'a'"),
    ("missing action", R + "    match: {tag: Modality, equals: CT}\n", ":2: rules[0].action: Field required"),
    ("no code", R + "    match: {tag: Modality, equals: !!python/object/apply:os.getpid []}\n"
     "    action: {profile: lungs}\n", ":3: invalid YAML: could not determine a constructor"),
    ("broken yaml", R + "   match: x\n", ":3: invalid YAML"),
    ("empty file", "", "file is empty"),
]


@pytest.mark.parametrize(("text", "message"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_load_error(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_rules(path, profiles=["lungs", "brain"], destinations=["pacs"])
    assert str(err.value).startswith(str(path))
    assert message in str(err.value)
    assert err.value.exit_code == 2


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_rules(tmp_path / "nope.yaml")
