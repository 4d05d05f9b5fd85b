"""The receiver against real senders (DCMTK and pynetdicom SCUs, raw sockets), and the typed events it emits."""

from __future__ import annotations

import socket
import struct
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, Verification
from segnode.node.config import NodeConfig
from segnode.node.dicom_in.receiver import NativeServer
from segnode.node.dicom_in.server import RunningSCP, start_scp
from segnode.node.events import (
    AssociationAccepted,
    AssociationRejected,
    AssociationReleased,
    Event,
    InstanceRefused,
    InstanceStored,
    RejectionReason,
)
from segnode.node.status import Status
from segnode.storage.index import Index
from segnode.storage.spool import Spool

from tests.paths import DATA
from tests.peers import DCMTK_ENV, store_statuses, storescu

THORAX = DATA / "thorax_cta"
pytestmark = pytest.mark.peer


def make_scp(tmp_path: Path, events: list[Event] | None = None, **config: object) -> tuple[RunningSCP, Spool, Index]:
    limits = {"min_free_disk_mb": 1, **config.pop("limits", {})}  # type: ignore[dict-item]
    cfg = NodeConfig(**{"port": 0, "state_dir": tmp_path / "state", "limits": limits, **config})
    spool, index = Spool(cfg.spool_dir), Index(cfg.index_path)
    running = start_scp(cfg, spool, index, events.append if events is not None else lambda event: None)
    assert isinstance(running.server, NativeServer)
    return running, spool, index


@pytest.fixture
def scp(tmp_path: Path) -> Iterator[tuple[RunningSCP, Spool, Index]]:
    running = make_scp(tmp_path)
    yield running
    running[0].stop()


def echo(port: int, calling: str = "SCANNER") -> int | None:
    ae = AE(calling)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title="SEGNODE")
    if not assoc.is_established:
        return None
    status = assoc.send_c_echo()
    assoc.release()
    return int(status.Status)


def spooled(spool: Spool) -> list[Path]:
    return sorted(spool.root.glob("*/*/*.dcm"))


def stored_files(spool: Spool) -> list[str]:
    """Every file under the state folder but the index's."""
    state = spool.root.parent
    return sorted(p.name for p in state.rglob("*") if p.is_file() and not p.name.startswith("index.sqlite"))


def test_c_echo_with_echoscu(scp: tuple[RunningSCP, Spool, Index]) -> None:
    server, _, _ = scp
    result = subprocess.run(["echoscu", "-v", "-aet", "SCANNER", "-aec", "SEGNODE", "127.0.0.1", str(server.port)],
                            env=DCMTK_ENV, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "Received Echo Response (Success)" in result.stdout + result.stderr


def test_what_happens_is_emitted_as_typed_events(tmp_path: Path) -> None:
    """Associations accepted, rejected with their reason, released; instances stored, refused with their status."""
    events: list[Event] = []
    server, _, _ = make_scp(tmp_path, events, allowed_senders=[{"ae_title": "SCANNER", "host": "127.0.0.1"}])
    no_study = dcmread(THORAX / "CT0002.dcm")
    del no_study.StudyInstanceUID
    no_study.save_as(tmp_path / "no_study.dcm")
    try:
        assert "Association Rejected" in storescu(server.port, [THORAX / "CT0001.dcm"], calling="INTRUDER").stderr
        assert "Called AE Title Not Recognized" in storescu(server.port, [THORAX / "CT0001.dcm"],
                                                            called="SOMEONE").stderr
        sent = storescu(server.port, [THORAX / "CT0001.dcm", tmp_path / "no_study.dcm"])
        assert store_statuses(sent.stderr)[0] == "Success"
    finally:
        server.stop()
    first = dcmread(THORAX / "CT0001.dcm")
    [path] = spooled(Spool(tmp_path / "state" / "spool"))
    stored = [e for e in events if isinstance(e, InstanceStored)]
    assert [type(e) for e in events] == [AssociationRejected, AssociationRejected, AssociationAccepted,
                                         InstanceStored, InstanceRefused, AssociationReleased]
    assert events[:3] == [AssociationRejected("INTRUDER", "127.0.0.1", RejectionReason.SENDER_NOT_ALLOWED),
                          AssociationRejected("SCANNER", "127.0.0.1", RejectionReason.CALLED_AE_UNKNOWN),
                          AssociationAccepted("SCANNER", "127.0.0.1")]
    assert (stored[0].sop_uid, stored[0].series_uid, stored[0].size) == (
        first.SOPInstanceUID, first.SeriesInstanceUID, path.stat().st_size)
    refused = events[4]
    assert isinstance(refused, InstanceRefused)
    assert (refused.status, refused.reason, refused.sop_uid) == (Status.INVALID_UID, "invalid_uid",
                                                                 no_study.SOPInstanceUID)
    assert refused.comment is not None and "StudyInstanceUID" in refused.comment
    assert events[5] == AssociationReleased((first.SeriesInstanceUID,))


def test_pynetdicom_scu_proposing_several_contexts(scp: tuple[RunningSCP, Spool, Index]) -> None:
    server, spool, index = scp
    ae = AE("SCANNER")
    ae.add_requested_context(Verification)
    ae.add_requested_context(MRImageStorage)  # not a class this node stores: refused context
    ae.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2.4.201"])  # HTJ2K only: no common syntax
    ae.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    assoc = ae.associate("127.0.0.1", server.port, ae_title="SEGNODE")
    assert assoc.is_established
    results = {(cx.abstract_syntax, cx.context_id): cx.result for cx in assoc.rejected_contexts}
    assert {cx.abstract_syntax for cx in assoc.accepted_contexts} == {Verification, CTImageStorage}
    assert sorted(results.values()) == [3, 4]
    assert assoc.acceptor.maximum_length == 131072
    assert assoc.send_c_echo().Status == 0x0000
    for path in sorted(THORAX.glob("*.dcm"))[:3]:
        assert assoc.send_c_store(dcmread(path)).Status == 0x0000
    assoc.release()
    assert index.instance_count() == 3 and len(spooled(spool)) == 3


def test_four_concurrent_storescu_associations(scp: tuple[RunningSCP, Spool, Index]) -> None:
    server, spool, index = scp
    files = sorted(THORAX.glob("*.dcm"))
    chunks = [files[k::4] for k in range(4)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda chunk: storescu(server.port, chunk), chunks))
    for chunk, result in zip(chunks, results):
        assert result.returncode == 0, result.stderr
        assert store_statuses(result.stderr) == ["Success"] * len(chunk)
    assert index.instance_count() == 164 and len(spooled(spool)) == 164


def test_abort_mid_dataset_writes_nothing(scp: tuple[RunningSCP, Spool, Index]) -> None:
    server, spool, index = scp
    ae = AE("SCANNER")
    ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", server.port, ae_title="SEGNODE")
    assert assoc.is_established
    context_id = assoc.accepted_contexts[0].context_id
    sock = assoc.dul.socket.socket
    rq = _c_store_rq(CTImageStorage, "1.2.3.4")
    pdv = (len(rq) + 2).to_bytes(4, "big") + bytes([context_id, 0x03]) + rq
    sock.sendall(b"\x04\x00" + len(pdv).to_bytes(4, "big") + pdv)
    half = b"\x08\x00\x16\x00" * 100
    pdv = (len(half) + 2).to_bytes(4, "big") + bytes([context_id, 0x00]) + half
    sock.sendall(b"\x04\x00" + len(pdv).to_bytes(4, "big") + pdv)
    assoc.abort()
    assert echo(server.port) == 0x0000
    assert stored_files(spool) == [] and index.instance_count() == 0


def _c_store_rq(sop_class: str, sop_instance: str) -> bytes:
    """A C-STORE-RQ command set (implicit VR little endian) announcing a dataset."""
    def element(elem: int, value: bytes) -> bytes:
        value = value + b"\x00" if len(value) % 2 else value
        return struct.pack("<HHL", 0, elem, len(value)) + value

    body = b"".join((element(0x0002, sop_class.encode()), element(0x0100, struct.pack("<H", 0x0001)),
                     element(0x0110, struct.pack("<H", 1)), element(0x0700, struct.pack("<H", 0)),
                     element(0x0800, struct.pack("<H", 0)), element(0x1000, sop_instance.encode())))
    return element(0x0000, struct.pack("<L", len(body))) + body


def test_malformed_and_oversized_pdus_close_only_that_connection(scp: tuple[RunningSCP, Spool, Index]) -> None:
    server, spool, _ = scp
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(bytes([0x01, 0x00]) + (0x7FFFFFF0).to_bytes(4, "big") + b"\x00" * 64)
        assert sock.recv(10) == bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 2, 6])  # A-ABORT: invalid PDU parameter value
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(bytes([0x09, 0x00, 0, 0, 0, 2, 0, 0]))  # no such PDU type
        assert sock.recv(10) == bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 2, 1])  # A-ABORT: unrecognised PDU
    assert echo(server.port) == 0x0000
    assert stored_files(spool) == []


def test_a_dataset_past_the_spill_size_is_buffered_in_a_file_mapping(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from segnode.node.dicom_in import receiver as native_scp
    from segnode.node.dicom_in.receiver import DatasetBuffer

    monkeypatch.setattr(native_scp, "SPILL_BYTES", 3 << 20)
    buffer = DatasetBuffer(tmp_path)
    assert len(buffer.view()) == 0  # nothing allocated before a dataset arrives
    content = os.urandom(10 << 20)
    filled = 0
    for step in (1 << 20, 2 << 20, 4 << 20, 10 << 20):  # in memory, then a mapping, then a larger one
        buffer.reserve(step, filled)
        with buffer.view() as view:
            view[filled:step] = content[filled:step]
        filled = step
        assert buffer.spilled == (step > 2 << 20)
        with buffer.view() as view:
            assert view[:filled] == content[:filled]
    assert list(tmp_path.iterdir()) == []  # the file behind the mapping has no name
    buffer.release()
    assert not buffer.spilled and len(buffer.view()) == 0  # the next dataset allocates what it needs


def test_a_large_instance_received_through_the_spill_path_is_stored_whole(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np
    from segnode.node.dicom_in import receiver as native_scp

    monkeypatch.setattr(native_scp, "SPILL_BYTES", 1 << 20)
    spilled: list[int] = []
    reserve = native_scp.DatasetBuffer.reserve

    def watched(self: native_scp.DatasetBuffer, end: int, filled: int) -> None:
        reserve(self, end, filled)
        if self.spilled:
            spilled.append(end)

    monkeypatch.setattr(native_scp.DatasetBuffer, "reserve", watched)
    big = dcmread(THORAX / "CT0001.dcm")
    big.Rows = big.Columns = 1536  # 4.5 MB of pixels
    big.PixelData = np.random.default_rng(1).integers(0, 4000, (1536, 1536), dtype=np.uint16).tobytes()
    big.save_as(tmp_path / "big.dcm")
    server, spool, _ = make_scp(tmp_path)
    try:
        sent = storescu(server.port, [tmp_path / "big.dcm", THORAX / "CT0002.dcm"], calling="SCANNER")
        assert store_statuses(sent.stdout + sent.stderr) == ["Success", "Success"], sent.stderr
    finally:
        server.stop()
    assert spilled  # the 4.5 MB dataset went through the file mapping
    stored = {dcmread(p).SOPInstanceUID: p for p in spooled(spool)}
    assert dcmread(stored[big.SOPInstanceUID]).PixelData == big.PixelData
    assert dcmread(stored[dcmread(THORAX / "CT0002.dcm").SOPInstanceUID]).PixelData == dcmread(
        THORAX / "CT0002.dcm").PixelData
    assert list(spool.tmp.iterdir()) == []


def test_an_internal_error_outside_the_store_path_aborts_that_association_only(
        scp: tuple[RunningSCP, Spool, Index], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 12, case 8: our fault is logged with its traceback and answered with an A-ABORT, never silence."""
    from segnode.node.dicom_in import receiver as native_scp

    from tests.raw_peer import RawPeer

    server, _, _ = scp

    def broken(*args: object) -> None:
        raise RuntimeError("a bug of ours")

    monkeypatch.setattr(native_scp, "negotiate", broken)
    with RawPeer(server.port) as peer:
        reply = peer.associate()
        assert reply is not None and reply.kind == 0x07 and reply.abort_reason == (2, 0)
    assert any("internal error serving an association" in r.getMessage() and r.exc_info for r in caplog.records)
    monkeypatch.undo()
    assert echo(server.port) == 0x0000
