"""C-STORE/C-ECHO to real DCMTK peers, and the backoff schedule (node/dispatch.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread

from segnode.node.cli import main
from segnode.node.config import NodeConfig
from segnode.node.dispatch import backoff_s, deliver, echo, send_file
from tests.peers import free_port, storescp

pytestmark = pytest.mark.peer


def seg_file() -> Path:
    """dcmqi's liver SEG (a BINARY Segmentation Storage object)."""
    return Path(__file__).parent / "data" / "liver_3slice" / "liver_seg_dcmqi.dcm"


def config_for(port: int, ae: str = "PACS") -> NodeConfig:
    return NodeConfig(destinations=[{"name": "pacs", "ae_title": ae, "host": "127.0.0.1", "port": port}],
                      dispatch={"timeout_s": 10})


def test_backoff_doubles_up_to_the_cap() -> None:
    assert [backoff_s(n, 5, 60) for n in range(1, 7)] == [5, 10, 20, 40, 60, 60]


def test_seg_is_stored_byte_for_byte_by_storescp(tmp_path: Path) -> None:
    path = seg_file()
    with storescp(tmp_path / "pacs") as pacs:
        result = deliver(config_for(pacs.port), "pacs", path)
        assert result.ok, result.message
        [received] = pacs.received()
    original, got = dcmread(path), dcmread(received)
    assert got.SOPInstanceUID == original.SOPInstanceUID and got.PixelData == original.PixelData


def test_nobody_listening_is_retryable() -> None:
    result = send_file(config_for(free_port()).destinations[0], seg_file(), calling_ae="SEGNODE", timeout_s=5)
    assert not result.ok and result.retryable


def test_peer_without_seg_context_is_permanent(tmp_path: Path) -> None:
    with storescp(tmp_path / "ct", ct_only=True) as pacs:
        result = deliver(config_for(pacs.port), "pacs", seg_file())
    assert not result.ok and not result.retryable
    assert "presentation context" in result.message


def test_echo_and_the_echo_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with storescp(tmp_path / "pacs") as pacs:
        assert echo(config_for(pacs.port).destinations[0], calling_ae="SEGNODE").ok
        cfg = tmp_path / "node.yaml"
        cfg.write_text(f"state_dir: {tmp_path / 'state'}\ndestinations:\n"
                       f"  - {{name: pacs, ae_title: PACS, host: 127.0.0.1, port: {pacs.port}}}\n")
        assert main(["echo", "pacs", "--config", str(cfg)]) == 0
        assert "echo succeeded" in capsys.readouterr().out
    assert main(["echo", "nowhere", "--config", str(cfg)]) == 2
    assert "unknown destination 'nowhere'" in capsys.readouterr().err
