"""The ``sources:`` section, the forced routes and the models named on the command line: strict, with clear errors."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pytest
import yaml
from segnode.errors import ConfigError, InputError
from segnode.node.cli.main import main
from segnode.node.config import NodeConfig, load_config
from segnode.node.config.sources import RetrieveMethod, SourceKind
from segnode.node.sources.open import open_source
from segnode.node.sources.pin import Pin, pin_for
from segnode.node.sources.reprocess import Model
from segnode.node.sources.source import StudyQuery
from segnode.node.sources.web import WebSource

PACS = {"name": "pacs", "ae_title": "PACS", "host": "10.0.0.5", "port": 104}


def write(tmp_path: Path, **config: object) -> Path:
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump({"state_dir": str(tmp_path / "state"), **config}))
    return path


def test_a_dimse_and_a_dicomweb_source_load_with_their_files_beside_the_config(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, sources=[
        {**PACS, "retrieve": "get", "tls": {"ca": "pki/ca.pem"}},
        {"name": "web", "kind": "dicomweb", "url": "https://pacs.example/dicom-web", "token_file": "web.token"}]))
    dimse, web = config.sources
    assert (dimse.kind, dimse.retrieve, dimse.max_results) == (SourceKind.DIMSE, RetrieveMethod.GET, 500)
    assert dimse.tls is not None and dimse.tls.ca == tmp_path / "pki" / "ca.pem"
    assert web.token_file == tmp_path / "web.token"
    assert isinstance(open_source(config, "web"), WebSource)


@pytest.mark.parametrize(("source", "message"), [
    ({"name": "x", "ae_title": "PACS", "host": "h"}, "kind dimse needs ae_title, host and port"),
    ({"name": "x", "kind": "dicomweb", **{k: v for k, v in PACS.items() if k != "name"}}, "kind dicomweb needs url"),
    ({**PACS, "url": "http://h/dicom-web"}, "kind dimse needs ae_title, host and port \\(and no url\\)"),
    ({**PACS, "max_results": 0}, "max_results"),
    ({**PACS, "retrieve": "push"}, "retrieve"),
    ({**PACS, "ae_title": "A\\B"}, "ae_title"),
    ({**PACS, "maxresults": 5}, "maxresults"),  # a typo: unknown keys are errors
])
def test_a_bad_source_is_an_error_naming_the_key(tmp_path: Path, source: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, sources=[source]))


def test_source_names_are_unique(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="source names must be unique: pacs"):
        load_config(write(tmp_path, sources=[PACS, {**PACS, "port": 105}]))


def test_an_unknown_source_names_the_known_ones(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write(tmp_path, sources=[PACS])
    assert main(["fetch", "--config", str(config), "--from", "nope", "--accession", "A"]) == 2
    assert "unknown source 'nope' (known: pacs)" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"unknown source 'x' \(known: none configured\)"):
        open_source(NodeConfig(), "x")


def test_a_query_needs_something_to_look_for() -> None:
    with pytest.raises(InputError, match="needs an accession number, a study UID or a patient ID"):
        StudyQuery()
    assert StudyQuery(patient_id="SECRET-ID").describe() == "the patient ID given"  # never the ID itself
    assert StudyQuery(patient_id="SECRET-ID", modality="CT", since=date(2026, 1, 2)).describe() == (
        "the patient ID given (CT) from 2026-01-02")


def test_forced_routes(tmp_path: Path) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(yaml.safe_dump({"rules": [
        {"name": "liver", "match": {"tag": "Modality", "equals": "CT"}, "action": {"profile": "liver", "destinations": ["pacs"]}},
        {"name": "many", "match": {"tag": "Modality", "equals": "MR"}, "action": {"profiles": ["lungs", "liver"]}}]}))
    config = load_config(write(tmp_path, routes=str(routes), destinations=[PACS]))
    assert pin_for(config, route="liver", profile=None) == Pin("liver", "liver", None, ("pacs",), None, {})
    assert pin_for(config, route=None, profile="lungs") == Pin("--profile lungs", "lungs")
    assert pin_for(config, route=None, profile=None) is None
    with pytest.raises(ConfigError, match="unknown rule 'nope'"):
        pin_for(config, route="nope", profile=None)
    with pytest.raises(ConfigError, match="several profiles"):
        pin_for(config, route="many", profile=None)
    with pytest.raises(ConfigError, match="unknown profile 'kidneyz'"):
        pin_for(config, route=None, profile="kidneyz")


def test_models_on_the_command_line() -> None:
    assert Model.parse("nnunet/2.1") == Model("nnunet", "2.1") and str(Model.parse("nnunet/2.1")) == "nnunet/2.1"
    assert Model.parse("hu_based") == Model("hu_based")
    with pytest.raises(InputError, match="unknown model 'resnet'"):
        Model.parse("resnet")
