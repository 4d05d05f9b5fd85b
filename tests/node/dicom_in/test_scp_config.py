"""Node config validation and the serve/status/jobs commands' errors (node/config/__init__.py, node/cli/serve.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from segnode.errors import ConfigError
from segnode.node.cli.main import main
from segnode.node.config import NodeConfig, load_config


def test_embedded_defaults() -> None:
    config = load_config(None, state_dir=Path("/tmp/x"))
    assert (config.ae_title, config.host, config.port) == ("SEGNODE", "127.0.0.1", 11112)
    assert config.completion.quiet_period_s == 10 and config.routes is None
    assert config.sender_for("ANY", "127.0.0.1") is not None and config.sender_for("ANY", "10.1.2.3") is None
    assert config.index_path == Path("/tmp/x/index.sqlite")


def test_errors_name_file_line_and_key(tmp_path: Path) -> None:
    path = tmp_path / "node.yaml"
    path.write_text("ae_title: SEGNODE\nlimits:\n  max_pdu_bytes: 10\n  max_asociations: 3\n"
                    "allowed_senders:\n  - {ae_title: CT1, host: not-an-ip}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    assert f"{path}:3: limits.max_pdu_bytes" in text
    assert f"{path}:4: limits.max_asociations: Extra inputs are not permitted" in text
    assert "not an IP address or CIDR network" in text


def test_destination_outputs_are_validated_with_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "node.yaml"
    path.write_text("destinations:\n  - name: pacs\n    ae_title: PACS\n    host: 127.0.0.1\n    port: 104\n"
                    "    outputs: [rtstruct, overlays]\n")
    with pytest.raises(ConfigError, match=rf"{path}:6: destinations\[0\].outputs: unknown output kind\(s\) overlays"):
        load_config(path)
    path.write_text("destinations:\n  - {name: pacs, ae_title: PACS, host: 127.0.0.1, port: 104, outputs: overlay}\n")
    [dest] = load_config(path).destinations
    assert dest.outputs == ("overlay",) and dest.takes(("seg", "rtstruct", "overlay")) == ("overlay",)
    assert NodeConfig(destinations=[{"name": "a", "ae_title": "A", "host": "h", "port": 1}]).destinations[0].takes(
        ("seg", "sr")) == ("seg", "sr")  # no outputs: whatever the job encodes


def test_unknown_sender_destination_and_duplicate_names_are_refused() -> None:
    with pytest.raises(ValueError, match="unique"):
        NodeConfig(destinations=[{"name": "a", "ae_title": "A", "host": "h", "port": 1}] * 2)
    with pytest.raises(ValueError, match="unknown destination 'pacs'"):
        NodeConfig(allowed_senders=[{"ae_title": "CT", "destination": "pacs"}])


def test_relative_paths_follow_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "node.yaml"
    path.write_text("state_dir: state\nroutes: routes.yaml\n")
    config = load_config(path)
    assert config.state_dir == tmp_path / "state" and config.routes == tmp_path / "routes.yaml"


def test_status_without_an_index_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--state-dir", str(tmp_path / "none")]) == 5
    assert "the node has not run with this state directory" in capsys.readouterr().err


def test_bad_config_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "node.yaml"
    path.write_text("port: 99999\n")
    assert main(["serve", "--config", str(path)]) == 2
    assert "port" in capsys.readouterr().err


def test_the_removed_receiver_key_is_a_clear_error(tmp_path: Path) -> None:
    """``limits.receiver`` chose the pynetdicom receiver or the native one; there is one receiver now."""
    path = tmp_path / "node.yaml"
    path.write_text("limits:\n  max_associations: 4\n  receiver: native\n")
    with pytest.raises(ConfigError, match=rf"{path}:2: limits: limits.receiver was removed: the node has one receiver"):
        load_config(path)
    path.write_text("limits:\n  max_associations: 4\n")
    assert load_config(path).limits.max_associations == 4
