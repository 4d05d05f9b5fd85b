"""C-STORE/C-ECHO to real DCMTK peers (node/sending/dimse.py), and the dispatch policy (node/dispatch.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from segnode.node.cli.main import main
from segnode.node.config import NodeConfig
from segnode.node.dispatch import Summary, backoff_s, next_try_at
from segnode.node.sending.sender import Sender, SendResult, sender_for
from segnode.node.status import Category

from tests.paths import DATA
from tests.peers import free_port, storescp

pytestmark = pytest.mark.peer


def seg_file() -> Path:
    """dcmqi's liver SEG (a BINARY Segmentation Storage object)."""
    return DATA / "liver_3slice" / "liver_seg_dcmqi.dcm"


def config_for(port: int, ae: str = "PACS") -> NodeConfig:
    return NodeConfig(destinations=[{"name": "pacs", "ae_title": ae, "host": "127.0.0.1", "port": port}],
                      dispatch={"timeout_s": 10})


def sender(config: NodeConfig, name: str = "pacs") -> Sender:
    return sender_for(config.destination(name), calling_ae="SEGNODE", dispatch=config.dispatch)


def test_backoff_doubles_up_to_the_cap() -> None:
    assert [backoff_s(n, 5, 60) for n in range(1, 7)] == [5, 10, 20, 40, 60, 60]


def test_next_try_only_after_a_retryable_failure_and_before_max_attempts() -> None:
    policy = NodeConfig(dispatch={"max_attempts": 3, "backoff_initial_s": 5, "backoff_max_s": 60}).dispatch
    assert next_try_at(Category.RETRYABLE, 1, policy, 100.0) == 105.0
    assert next_try_at(Category.RETRYABLE, 2, policy, 100.0) == 110.0
    assert next_try_at(Category.RETRYABLE, 3, policy, 100.0) is None  # the last try: dead-letter
    assert next_try_at(Category.PERMANENT, 1, policy, 100.0) is None
    assert next_try_at(Category.STORED, 1, policy, 100.0) is None


def test_seg_is_stored_byte_for_byte_by_storescp(tmp_path: Path) -> None:
    path = seg_file()
    with storescp(tmp_path / "pacs") as pacs:
        [result] = sender(config_for(pacs.port)).send([path])
        assert result.ok and result.status == 0x0000, result.message
        [received] = pacs.received()
    original, got = dcmread(path), dcmread(received)
    assert got.SOPInstanceUID == original.SOPInstanceUID and got.PixelData == original.PixelData


# pynetdicom 3.0.4 leaks the socket of a refused connection (transport.connect: shutdown() of the unconnected
# socket raises ENOTCONN before close()); the leak is pynetdicom's, reported when the socket is collected
@pytest.mark.filterwarnings("ignore:Exception ignored in. <socket.socket:pytest.PytestUnraisableExceptionWarning")
def test_nobody_listening_is_retryable() -> None:
    [result] = sender(config_for(free_port())).send([seg_file()])
    assert not result.ok and result.retryable and "cannot connect" in result.message


def test_peer_without_seg_context_is_permanent(tmp_path: Path) -> None:
    with storescp(tmp_path / "ct", ct_only=True) as pacs:
        [result] = sender(config_for(pacs.port)).send([seg_file()])
    assert not result.ok and not result.retryable
    assert "presentation context" in result.message


def test_echo_and_the_echo_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with storescp(tmp_path / "pacs") as pacs:
        assert sender(config_for(pacs.port)).echo().ok
        cfg = tmp_path / "node.yaml"
        cfg.write_text(f"state_dir: {tmp_path / 'state'}\ndestinations:\n"
                       f"  - {{name: pacs, ae_title: PACS, host: 127.0.0.1, port: {pacs.port}}}\n")
        assert main(["echo", "pacs", "--config", str(cfg)]) == 0
        assert "echo succeeded" in capsys.readouterr().out
    assert main(["echo", "nowhere", "--config", str(cfg)]) == 2
    assert "unknown destination 'nowhere'" in capsys.readouterr().err


def small_object(folder: Path, sop_class: str, uid: str) -> Path:
    """A minimal Part 10 object of ``sop_class`` (storescp stores what it accepts without checking the IOD)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = sop_class, uid, "OT"
    path = folder / f"{uid}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_several_objects_in_one_association_a_refused_class_fails_alone(tmp_path: Path) -> None:
    sc, rt = "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.481.3"
    files = [small_object(tmp_path, cls, f"2.25.{n}") for n, cls in enumerate((sc, rt, sc), 1)]
    with storescp(tmp_path / "pacs", accept=[sc]) as pacs:
        results = sender(config_for(pacs.port)).send(files)
        stored = sorted(str(dcmread(p).SOPInstanceUID) for p in pacs.received())
    assert [r.ok for r in results] == [True, False, True] and stored == ["2.25.1", "2.25.3"]
    assert not results[1].retryable and "RT Structure Set Storage" in results[1].message
    with storescp(tmp_path / "none", ct_only=True) as pacs:  # no context at all: every object fails for good
        results = sender(config_for(pacs.port)).send(files)
    assert [(r.ok, r.retryable) for r in results] == [(False, False)] * 3


def test_delivery_summary_names_the_kind_of_each_failure() -> None:
    from segnode.node.dispatch import summarise

    ok, dead, busy = SendResult.stored("stored"), SendResult.refused("no context"), SendResult.retry("0xA700")
    assert summarise(["seg", "overlay"], [ok, ok]).ok
    assert summarise(["seg", "rtstruct"], [ok, dead]) == Summary(Category.PERMANENT, "rtstruct: no context")
    assert summarise(["overlay", "overlay", "sr"], [busy, busy, ok], dead=[("rtstruct", "no context")]) == Summary(
        Category.RETRYABLE, "overlay: 0xA700; rtstruct: no context")


def test_what_a_job_encodes_follows_the_route_else_its_destinations() -> None:
    from segnode.node.dispatch import encoded_kinds

    config = NodeConfig(destinations=[
        {"name": "pacs", "ae_title": "P", "host": "h", "port": 1},
        {"name": "tps", "ae_title": "T", "host": "h", "port": 1, "outputs": ["rtstruct"]},
        {"name": "viewer", "ae_title": "V", "host": "h", "port": 1, "outputs": ["overlay", "rtstruct"]}])
    assert encoded_kinds(config, ["sr", "seg"], ["pacs"]) == ("seg", "sr")  # the route decides
    assert encoded_kinds(config, None, ["pacs", "tps"]) == ("seg", "rtstruct")  # no outputs on pacs: seg
    assert encoded_kinds(config, None, ["tps", "viewer"]) == ("rtstruct", "overlay")
    assert encoded_kinds(config, None, []) == ("seg",)
