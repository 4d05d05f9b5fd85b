"""Durability of the spool and the start-up check that re-indexes spooled files without a row."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
from pydicom import dcmread
from segnode.node.config import NodeConfig
from segnode.node.dicom_in.server import start_scp
from segnode.storage.index import Index, JobState
from segnode.storage.recovery import UNKNOWN_HOST, reindex_spool
from segnode.storage.spool import Spool

from tests.paths import DATA
from tests.peers import store_statuses, storescu

THORAX = DATA / "thorax_cta"


@pytest.mark.peer
def test_lost_index_rows_are_recreated_from_the_spool_at_start(tmp_path: Path) -> None:
    cfg = NodeConfig(port=0, state_dir=tmp_path / "state", limits={"min_free_disk_mb": 1})
    spool, index = Spool(cfg.spool_dir), Index(cfg.index_path)
    server = start_scp(cfg, spool, index)
    try:
        files = sorted(THORAX.glob("*.dcm"))[:3]
        assert store_statuses(storescu(server.port, files, calling="CT_SCANNER").stderr) == ["Success"] * 3
    finally:
        server.stop()
    index.close()
    cfg.index_path.unlink()  # as if the last commits never reached the disk
    for leftover in cfg.state_dir.glob("index.sqlite-*"):
        leftover.unlink()
    fresh = Index(cfg.index_path)
    assert reindex_spool(spool, fresh, called_ae="SEGNODE") == 3
    assert reindex_spool(spool, fresh, called_ae="SEGNODE") == 0  # idempotent
    source = dcmread(files[0], stop_before_pixels=True)
    info = fresh.series(source.SeriesInstanceUID)
    assert info is not None and info.instance_count == 3
    assert (info.calling_ae, info.called_ae, info.sender_host) == ("CT_SCANNER", "SEGNODE", UNKNOWN_HOST)
    assert [j.state for j in fresh.jobs()] == [JobState.RECEIVED]
    assert fresh.instance_paths(source.SeriesInstanceUID) == sorted(
        str(p.relative_to(spool.root)) for p in spool.root.glob("*/*/*.dcm"))


def test_a_file_whose_uids_differ_from_its_path_is_left_alone(tmp_path: Path) -> None:
    spool, index = Spool(tmp_path / "spool"), Index(tmp_path / "index.sqlite")
    source = dcmread(THORAX / "CT0001.dcm", stop_before_pixels=True)
    wrong = spool.instance_path(source.StudyInstanceUID, source.SeriesInstanceUID, "1.2.3.4")
    wrong.parent.mkdir(parents=True)
    shutil.copy(THORAX / "CT0001.dcm", wrong)
    assert reindex_spool(spool, index, called_ae="SEGNODE") == 0
    assert wrong.exists() and index.instance_count() == 0


@pytest.fixture(params=["unnamed", "named"])
def spool_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Unnamed temporary files (O_TMPFILE, the default where the file system has them), or named ones."""
    if request.param == "named":
        monkeypatch.setattr("segnode.storage.spool._O_TMPFILE", 0)
    return str(request.param)


def _spool(root: Path, kind: str) -> Spool:
    spool = Spool(root)
    if kind == "unnamed" and not spool._unnamed:
        pytest.skip("this file system makes no unnamed files")
    assert spool._unnamed == (kind == "unnamed")
    return spool


def test_concurrent_writers_into_one_series_all_land_complete(tmp_path: Path, spool_kind: str) -> None:
    spool = _spool(tmp_path / "spool", spool_kind)
    errors: list[BaseException] = []

    def writer(k: int) -> None:
        try:
            for i in range(10):
                spool.write("1.2.3", "1.2.3.4", f"1.2.3.4.{k}.{i}", (bytes([k]) * 1000, bytes([i]) * 24),
                            self_checking=k % 2 == 0)
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    files = sorted(spool.root.glob("1.2.3/1.2.3.4/*.dcm"))
    assert len(files) == 60 and list(spool.tmp.iterdir()) == []
    assert all(f.read_bytes() == bytes([int(f.stem.split(".")[-2])]) * 1000 + bytes([int(f.stem.split(".")[-1])]) * 24
               for f in files)
    assert spool._dir_sync._dirs == {}  # nobody left waiting on a directory sync


def test_writing_an_instance_again_replaces_it_whole(tmp_path: Path, spool_kind: str) -> None:
    spool = _spool(tmp_path / "spool", spool_kind)
    first = spool.write("1.2", "1.2.3", "1.2.3.4", (b"a" * 5000,), self_checking=True)
    again = spool.write("1.2", "1.2.3", "1.2.3.4", (b"b" * 3000,), self_checking=True)
    assert first == again and again.read_bytes() == b"b" * 3000
    assert list(spool.root.rglob("*.dcm")) == [again] and list(spool.tmp.iterdir()) == []
    spool.close()
    assert not spool._ready  # the files opened ahead are closed


def test_a_file_with_the_earlier_crc32_check_still_verifies(tmp_path: Path) -> None:
    import struct
    import zlib

    from segnode.storage.part10 import CHECK_CREATOR_UID, file_prefix, verify

    dataset = (THORAX / "CT0001.dcm").read_bytes()[-200_000:]  # any bytes: verify() reads no element
    old = struct.pack("<4sQL", b"SNC1", len(dataset), zlib.crc32(dataset))
    path = tmp_path / "old.dcm"
    path.write_bytes(file_prefix("1.2.840.10008.5.1.4.1.1.2", "1.2.3", "1.2.840.10008.1.2.1", "CT", old) + dataset)
    assert CHECK_CREATOR_UID.encode() in path.read_bytes()[:400] and verify(path) is True
    path.write_bytes(path.read_bytes()[:-4096] + bytes(4096))
    assert verify(path) is False


def _self_checked(spool: Spool, source: Path) -> tuple[Path, bytes]:
    """Spool ``source`` as the SCP does: hand-made prefix with the self-check, then the dataset."""
    from pydicom.filereader import _read_file_meta_info, read_preamble
    from segnode.storage.part10 import dataset_check, file_prefix

    with source.open("rb") as fp:
        read_preamble(fp, False)
        meta = _read_file_meta_info(fp)
        dataset = fp.read()
    ds = dcmread(source, stop_before_pixels=True)
    prefix = file_prefix(ds.SOPClassUID, ds.SOPInstanceUID, meta.TransferSyntaxUID, "CT_SCANNER",
                         dataset_check(dataset))
    path = spool.write(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, (prefix, dataset),
                       self_checking=True)
    return path, prefix + dataset


def test_an_incomplete_self_checked_file_is_removed_and_a_complete_one_indexed(tmp_path: Path) -> None:
    spool, index = Spool(tmp_path / "spool"), Index(tmp_path / "index.sqlite")
    complete, _ = _self_checked(spool, THORAX / "CT0001.dcm")
    torn, content = _self_checked(spool, THORAX / "CT0002.dcm")
    torn.write_bytes(content[:len(content) // 2])  # renamed before its data sync, then the power went
    zeroed, content = _self_checked(spool, THORAX / "CT0003.dcm")
    zeroed.write_bytes(content[:-4096] + bytes(4096))  # full length, last block never written
    assert reindex_spool(spool, index, called_ae="SEGNODE") == 1
    assert complete.exists() and not torn.exists() and not zeroed.exists()
    assert index.instance_uids() == {dcmread(THORAX / "CT0001.dcm", stop_before_pixels=True).SOPInstanceUID}
    assert dcmread(complete).PixelData == dcmread(THORAX / "CT0001.dcm").PixelData


def test_a_failed_data_sync_after_the_rename_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from segnode.errors import StorageError

    spool = Spool(tmp_path / "spool")

    def broken(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", broken)
    with pytest.raises(StorageError, match="Input/output error"):
        spool.write("1.2", "1.2.3", "1.2.3.4", (b"x" * 1000,), self_checking=True)
    assert list(spool.root.rglob("*.dcm")) == [] and list(spool.tmp.iterdir()) == []


def test_the_state_folder_is_created_for_its_owner_only(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import stat

    from segnode.node.service import Service

    fresh = NodeConfig(port=0, state_dir=tmp_path / "new" / "state")
    Service(fresh).index.close()
    assert stat.S_IMODE(fresh.state_dir.stat().st_mode) == 0o700
    assert not caplog.records

    opened = tmp_path / "opened"
    opened.mkdir(mode=0o755)
    opened.chmod(0o755)
    Service(NodeConfig(port=0, state_dir=opened)).index.close()
    assert any("open to other users (mode 755)" in r.message and r.levelname == "WARNING" for r in caplog.records)
