"""The SCP against real senders (DCMTK storescu, a pynetdicom SCU, raw sockets)."""

from __future__ import annotations

import socket
import ssl
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification
from segnode.identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from segnode.node.config import NodeConfig
from segnode.node.dicom_in.server import RunningSCP, server_ssl_context, start_scp
from segnode.storage.index import Index, JobState
from segnode.storage.spool import Spool

from tests.paths import DATA
from tests.peers import store_statuses, storescu, wait_until
from tests.raw_peer import IMPLICIT_LE, VERIFICATION, RawPeer
from tests.tls_pki import Pki

THORAX = DATA / "thorax_cta"
pytestmark = pytest.mark.peer


def make_scp(tmp_path: Path, client: ssl.SSLContext | None = None, pki: Pki | None = None,
             **config: object) -> tuple[RunningSCP, Spool, Index]:
    """The receiver on an ephemeral port; with ``client`` (a client's TLS context), over TLS with ``pki``'s certificates."""
    limits = {"min_free_disk_mb": 1, **config.pop("limits", {})}  # type: ignore[dict-item]
    if client is not None:
        assert pki is not None
        config.setdefault("tls", pki.server_tls(client_ca=True))
    cfg = NodeConfig(**{"port": 0, "state_dir": tmp_path / "state", "limits": limits, **config})
    spool, index = Spool(cfg.spool_dir), Index(cfg.index_path)
    return start_scp(cfg, spool, index), spool, index


@pytest.fixture
def scp(tmp_path: Path) -> Iterator[tuple[RunningSCP, Spool, Index]]:
    running = make_scp(tmp_path)
    yield running
    running[0].stop()


def echo(port: int, calling: str = "SCANNER", tls: ssl.SSLContext | None = None) -> int | None:
    ae = AE(calling)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title="SEGNODE", tls_args=(tls, "localhost") if tls else None)
    if not assoc.is_established:
        return None
    status = assoc.send_c_echo()
    assoc.release()
    return status.Status


def spooled(spool: Spool) -> list[Path]:
    return sorted(spool.root.glob("*/*/*.dcm"))


def test_storescu_series_lands_byte_exact_in_the_spool(scp: tuple[RunningSCP, Spool, Index]) -> None:
    server, spool, index = scp
    result = storescu(server.port, [THORAX])
    assert result.returncode == 0, result.stderr
    assert store_statuses(result.stdout + result.stderr) == ["Success"] * 164
    files = spooled(spool)
    assert len(files) == 164 and index.instance_count() == 164
    for source in sorted(THORAX.glob("*.dcm")):
        original = dcmread(source)
        stored_path = spool.instance_path(original.StudyInstanceUID, original.SeriesInstanceUID,
                                          original.SOPInstanceUID)
        stored = dcmread(stored_path)
        assert stored.PixelData == original.PixelData
        assert stored.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        assert stored.file_meta.SourceApplicationEntityTitle == "SCANNER"
        # byte-exact: everything after the file meta is the dataset the sender read from its file
        raw_source, raw_stored = source.read_bytes(), stored_path.read_bytes()
        assert raw_stored.endswith(raw_source[_dataset_offset(source):])
    row = index._db().execute("SELECT calling_ae, called_ae, sender_host FROM series").fetchone()
    assert tuple(row) == ("SCANNER", "SEGNODE", "127.0.0.1")
    assert [j.state for j in index.jobs()] == [JobState.RECEIVED]
    assert list(spool.tmp.iterdir()) == []
    assert server.handler.stats.stored == 164


def _dataset_offset(path: Path) -> int:
    with path.open("rb") as fp:
        ds = dcmread(fp, stop_before_pixels=True)
        meta_length = int(ds.file_meta.FileMetaInformationGroupLength)
    return 128 + 4 + 12 + meta_length


def test_duplicate_is_acknowledged_and_the_first_copy_kept(scp: tuple[RunningSCP, Spool, Index]) -> None:
    server, spool, index = scp
    first = THORAX / "CT0001.dcm"
    assert store_statuses(storescu(server.port, [first]).stderr) == ["Success"]
    path = spooled(spool)[0]
    before = path.stat().st_mtime_ns
    assert store_statuses(storescu(server.port, [first]).stderr) == ["Success"]
    assert path.stat().st_mtime_ns == before
    assert index.instance_count() == 1
    assert index.series(dcmread(first).SeriesInstanceUID).duplicate_count == 1


def test_unknown_calling_ae_or_host_and_wrong_called_ae_are_rejected(tmp_path: Path) -> None:
    server, spool, _ = make_scp(tmp_path, allowed_senders=[{"ae_title": "SCANNER", "host": "127.0.0.1"},
                                                          {"ae_title": "FAR", "host": "10.0.0.0/8"}])
    try:
        intruder = storescu(server.port, [THORAX / "CT0001.dcm"], calling="INTRUDER")
        assert intruder.returncode != 0
        assert "Association Rejected" in intruder.stderr
        assert "Calling AE Title Not Recognized" in intruder.stderr
        wrong_host = storescu(server.port, [THORAX / "CT0001.dcm"], calling="FAR")
        assert "Association Rejected" in wrong_host.stderr
        wrong_called = storescu(server.port, [THORAX / "CT0001.dcm"], called="SOMEONE")
        assert "Called AE Title Not Recognized" in wrong_called.stderr
        assert spooled(spool) == []
        assert server.handler.stats.associations_rejected == 2
        assert echo(server.port, "SCANNER") == 0x0000
    finally:
        server.stop()


@pytest.mark.parametrize("tag, value", [
    ("SOPInstanceUID", ".."), ("SOPInstanceUID", "1.2/../../x"), ("StudyInstanceUID", "../../etc"),
    ("SeriesInstanceUID", "1.2.3/4"), ("SeriesInstanceUID", ""), ("SOPInstanceUID", "1.02.3"),
])
def test_hostile_uids_never_touch_a_path(scp: tuple[RunningSCP, Spool, Index], tag: str, value: str) -> None:
    server, spool, index = scp
    ds = dcmread(THORAX / "CT0001.dcm")
    ae = AE("SCANNER")
    ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", server.port, ae_title="SEGNODE")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # pydicom warns about the invalid UI value we send
        setattr(ds, tag, value)
        status = assoc.send_c_store(ds)
    assoc.release()
    assert status.Status == 0xC211
    assert tag in status.ErrorComment
    state = spool.root.parent
    assert sorted(p.name for p in state.rglob("*") if p.is_file() and not p.name.startswith("index.sqlite")) == []
    assert index.instance_count() == 0


def test_below_free_disk_minimum_sender_gets_a700_and_nothing_remains(tmp_path: Path) -> None:
    server, spool, index = make_scp(tmp_path, limits={"min_free_disk_mb": 1 << 40})
    try:
        result = storescu(server.port, [THORAX / "CT0001.dcm", THORAX / "CT0002.dcm"])
        assert store_statuses(result.stderr) == ["Refused: OutOfResources"] * 2
        assert spooled(spool) == [] and list(spool.tmp.iterdir()) == []
        assert index.instance_count() == 0 and index.jobs() == []
    finally:
        server.stop()


def test_failed_write_leaves_nothing_half_written(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")

    def parts() -> Iterator[bytes]:
        yield b"x" * 1000
        raise OSError(28, "No space left on device")

    from segnode.errors import StorageError

    with pytest.raises(StorageError, match="No space left"):
        spool.write("1.2", "1.2.3", "1.2.3.4", parts())
    assert list(spool.root.rglob("*.dcm")) == [] and list(spool.tmp.iterdir()) == []


def test_instance_over_the_size_limit_is_cut_off_and_node_keeps_running(tmp_path: Path) -> None:
    server, spool, _ = make_scp(tmp_path, limits={"min_free_disk_mb": 1, "max_instance_bytes": 4096})
    try:
        result = storescu(server.port, [THORAX / "CT0001.dcm"])
        assert "Success" not in store_statuses(result.stderr)
        assert spooled(spool) == []
        assert echo(server.port) == 0x0000
    finally:
        server.stop()


EDGE_CLASSES = ["MRImageStorage", "EnhancedMRImageStorage", "RTPlanStorage", "RTDoseStorage",
                "SecondaryCaptureImageStorage", "UltrasoundImageStorage", "EnhancedCTImageStorage"]


def test_edge_case_files_get_a_clear_status_and_the_node_keeps_running(tmp_path: Path) -> None:
    server, spool, index = make_scp(tmp_path, storage_classes=EDGE_CLASSES)
    try:
        outcomes = {}
        for path in sorted((DATA / "edge_cases").rglob("*.dcm")):
            result = storescu(server.port, [path], extra=["-R"])  # -R: propose the file's own syntax
            statuses = store_statuses(result.stderr)
            assert "Abort" not in result.stderr, f"{path.name}: {result.stderr}"
            outcomes[path.name] = statuses[0] if statuses else "not sent (storescu cannot read it)"
        assert echo(server.port) == 0x0000
        sent = {name: o for name, o in outcomes.items() if not o.startswith("not sent")}
        assert len(sent) >= 6, outcomes  # storescu itself cannot read or transcode the rest
        for name, outcome in sent.items():
            assert outcome == "Success" or outcome.startswith(("Error: CannotUnderstand", "Refused")), \
                f"{name}: {outcome}"
        acknowledged = {dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in spooled(spool)}
        assert index.instance_count() == len(acknowledged) > 0
    finally:
        server.stop()


def test_oversized_pdu_declaration_closes_only_that_connection(scp: tuple[RunningSCP, Spool, Index]) -> None:
    server, _, _ = scp
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(bytes([0x01, 0x00]) + (0x7FFFFFF0).to_bytes(4, "big") + b"\x00" * 64)
        reply = sock.recv(10)  # closed without reading 2 GiB: at once, or after an A-ABORT PDU
        assert reply == b"" or reply[:1] == b"\x07"
    assert echo(server.port) == 0x0000


# -- TLS: the same receiver, with the handshake on the connection's thread ------------------------------


def test_storescu_and_pynetdicom_over_tls_with_a_client_certificate(tmp_path: Path, pki: Pki) -> None:
    server, spool, index = make_scp(tmp_path, pki.client_context(), pki)
    try:
        files = [THORAX / "CT0001.dcm", THORAX / "CT0002.dcm"]
        result = storescu(server.port, files, extra=pki.storescu_args())
        assert store_statuses(result.stdout + result.stderr) == ["Success"] * 2, result.stderr
        assert echo(server.port, tls=pki.client_context()) == 0x0000
        stored = spooled(spool)
        assert len(stored) == 2 and index.instance_count() == 2
        for source in files:
            original = dcmread(source)
            path = spool.instance_path(original.StudyInstanceUID, original.SeriesInstanceUID, original.SOPInstanceUID)
            assert path.read_bytes().endswith(source.read_bytes()[_dataset_offset(source):])
    finally:
        server.stop()


def test_a_client_without_a_certificate_our_ca_signed_is_refused(tmp_path: Path, pki: Pki) -> None:
    server, spool, _ = make_scp(tmp_path, pki.client_context(), pki)
    try:
        assert echo(server.port, tls=pki.client_context("rogue")) is None  # a certificate signed by nobody we trust
        assert echo(server.port, tls=pki.client_context(None)) is None  # no certificate at all
        rogue = storescu(server.port, [THORAX / "CT0001.dcm"], extra=pki.storescu_args("rogue"))
        assert rogue.returncode != 0 and store_statuses(rogue.stderr) == []
        with RawPeer(server.port) as plain:  # plain DICOM on a TLS port: closed, never associated
            assert plain.associate([(1, VERIFICATION, [IMPLICIT_LE])]) is None
        assert spooled(spool) == []
        wait_until(lambda: server.health().pending == 0, 10, "the refused connections to be dropped")
        assert echo(server.port, tls=pki.client_context()) == 0x0000  # and it still serves
    finally:
        server.stop()


def test_the_server_context_is_tls_1_2_or_later_and_checks_client_certificates(tmp_path: Path, pki: Pki) -> None:
    with_ca = server_ssl_context(NodeConfig(state_dir=tmp_path, tls=pki.server_tls(client_ca=True)))
    without = server_ssl_context(NodeConfig(state_dir=tmp_path, tls=pki.server_tls()))
    assert with_ca is not None and without is not None
    assert with_ca.minimum_version is ssl.TLSVersion.TLSv1_2 and without.minimum_version is ssl.TLSVersion.TLSv1_2
    assert with_ca.verify_mode is ssl.CERT_REQUIRED and without.verify_mode is ssl.CERT_NONE
    assert server_ssl_context(NodeConfig(state_dir=tmp_path)) is None


def test_idle_tls_clients_do_not_block_others_and_are_dropped_at_the_association_deadline(
        tmp_path: Path, pki: Pki) -> None:
    """A connection that never says hello holds its own thread and pending slot, until ``acse_timeout_s``."""
    server, _, _ = make_scp(tmp_path, tls=pki.server_tls(handshake_timeout_s=30),
                            limits={"min_free_disk_mb": 1, "acse_timeout_s": 2})
    client = pki.client_context(None)
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as idle:  # connects, never says hello
            idle.settimeout(10)  # the handshake timeout alone (30 s) would outlast this
            wait_until(lambda: server.health().pending == 1, 10, "the idle connection to be pending")
            assert echo(server.port, tls=client) == 0x0000  # served meanwhile
            assert idle.recv(10) == b""  # closed by the receiver: the handshake is under the association deadline
        wait_until(lambda: server.health().pending == 0, 10, "the idle connection to be dropped")
    finally:
        server.stop()


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_the_associate_ac_names_segnode(tmp_path: Path, pki: Pki, tls: bool) -> None:
    """segnode's own Implementation Class UID and Version Name (segnode.identity), as a pynetdicom SCU reads them."""
    client = pki.client_context() if tls else None
    server, _, _ = make_scp(tmp_path, client, pki)
    try:
        ae = AE("SCANNER")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", server.port, ae_title="SEGNODE",
                             tls_args=(client, "localhost") if client else None)
        assert assoc.is_established
        assert (assoc.acceptor.implementation_class_uid, assoc.acceptor.implementation_version_name) == (
            IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME)
        assoc.release()
    finally:
        server.stop()
