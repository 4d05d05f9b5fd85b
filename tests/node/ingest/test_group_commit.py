"""Group commit: instances arriving together share one sync wave and one index transaction; nothing
acknowledged is lost when the node is killed during it."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest
from pydicom import dcmread
from segnode.errors import StorageError
from segnode.storage.group_commit import GroupCommit
from segnode.storage.index import Index, InstanceRecord
from segnode.storage.spool import Spool

from tests.peers import DCMTK_ENV, node, stop_process, write_node_config
from tests.phantoms import thorax_phantom, write_ct_series

STUDY, SERIES = "1.2.3", "1.2.3.4"


def _record(sop: str, path: Path, root: Path) -> InstanceRecord:
    return InstanceRecord(sop, SERIES, STUDY, "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1", "CT",
                          str(path.relative_to(root)), path.stat().st_size, "SCANNER", "SEGNODE", "127.0.0.1")


def _commit_together(committer: GroupCommit, spool: Spool, sops: list[str],
                     unsyncable: frozenset[str] = frozenset()) -> list[bool | StorageError]:
    """Every writer announces itself first, then places and commits its file: one wave for all."""
    outcomes: list[bool | StorageError] = [False] * len(sops)
    for _ in sops:
        committer.begin()

    def write(k: int, sop: str) -> None:
        placed = spool.place(STUDY, SERIES, sop, (sop.encode() * 100,))
        if sop in unsyncable:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, placed.fd)  # its descriptor now names a device that cannot be synced
            os.close(devnull)
        try:
            outcomes[k] = committer.commit(placed, _record(sop, placed.path, spool.root))
        except StorageError as exc:
            outcomes[k] = exc

    threads = [threading.Thread(target=write, args=item) for item in enumerate(sops)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


def test_writers_arriving_together_share_one_wave_and_one_transaction(tmp_path: Path) -> None:
    spool, index = Spool(tmp_path / "spool"), Index(tmp_path / "index.sqlite")
    committer = GroupCommit(spool, index, window_s=30.0)  # a writer still writing holds the wave back
    sops = [f"1.2.3.4.{k}" for k in range(8)]
    try:
        outcomes = _commit_together(committer, spool, sops + ["1.2.3.4.0"])  # the last one repeats the first
        assert committer.batches == 1
        assert outcomes.count(True) == 8 and outcomes.count(False) == 1  # one copy new, the other a duplicate
        assert index.instance_count() == 8 and index.series(SERIES).instance_count == 8
        assert sorted(p.stem for p in spool.root.glob("*/*/*.dcm")) == sorted(sops)
    finally:
        committer.close()


def test_a_lone_writer_waits_for_nobody(tmp_path: Path) -> None:
    spool, index = Spool(tmp_path / "spool"), Index(tmp_path / "index.sqlite")
    committer = GroupCommit(spool, index, window_s=3600.0)  # only writers already writing are waited for
    try:
        for k in range(3):
            committer.begin()
            placed = spool.place(STUDY, SERIES, f"1.2.3.4.{k}", (b"x" * 1000,))
            assert committer.commit(placed, _record(f"1.2.3.4.{k}", placed.path, spool.root))
        assert committer.batches == 3 and index.instance_count() == 3
    finally:
        committer.close()


def test_a_failed_sync_fails_only_its_writer_and_removes_its_file(tmp_path: Path) -> None:
    spool, index = Spool(tmp_path / "spool"), Index(tmp_path / "index.sqlite")
    committer = GroupCommit(spool, index, window_s=30.0)
    sops = [f"1.2.3.4.{k}" for k in range(4)]
    try:
        outcomes = _commit_together(committer, spool, sops, unsyncable=frozenset({"1.2.3.4.2"}))
    finally:
        committer.close()
    assert committer.batches == 1
    assert isinstance(outcomes[2], StorageError)
    assert outcomes[:2] + outcomes[3:] == [True] * 3
    assert not index.has_instance("1.2.3.4.2") and index.instance_count() == 3
    assert sorted(p.stem for p in spool.root.glob("*/*/*.dcm")) == ["1.2.3.4.0", "1.2.3.4.1", "1.2.3.4.3"]


class _RefusingIndex(Index):
    """An index whose rows for ``refused`` fail (a constraint the batch trips over)."""

    refused: frozenset[str] = frozenset()

    def record_instances(self, records: Sequence[InstanceRecord]) -> list[bool]:
        if any(r.sop_uid in self.refused for r in records):
            raise StorageError("index: refused row", where=str(self.path))
        return super().record_instances(records)


def test_a_failed_index_row_fails_only_its_writer(tmp_path: Path) -> None:
    spool, index = Spool(tmp_path / "spool"), _RefusingIndex(tmp_path / "index.sqlite")
    index.refused = frozenset({"1.2.3.4.1"})
    committer = GroupCommit(spool, index, window_s=30.0)
    sops = [f"1.2.3.4.{k}" for k in range(4)]
    try:
        outcomes = _commit_together(committer, spool, sops)
    finally:
        committer.close()
    assert isinstance(outcomes[1], StorageError)
    assert outcomes[:1] + outcomes[2:] == [True] * 3
    assert index.instance_count() == 3


def test_a_closed_committer_refuses(tmp_path: Path) -> None:
    spool, index = Spool(tmp_path / "spool"), Index(tmp_path / "index.sqlite")
    committer = GroupCommit(spool, index)
    committer.close()
    committer.begin()
    placed = spool.place(STUDY, SERIES, "1.2.3.4.9", (b"x",))
    with pytest.raises(StorageError, match="closed"):
        committer.commit(placed, _record("1.2.3.4.9", placed.path, spool.root))
    os.close(placed.fd)


# -- a real node, concurrent senders, kill -9 ----------------------------------------------------

SENDERS, IMAGES, KILL_AFTER = 4, 120, 150


@pytest.fixture(scope="module")
def four_series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Four synthetic series (64×64 pixels), one per sender."""
    folders = []
    for k in range(SENDERS):
        folder = tmp_path_factory.mktemp(f"series{k}")
        v = thorax_phantom(shape=(IMAGES, 64, 64), spacing=(6.25, 6.25, 0.8)).volume
        write_ct_series(v.hu, folder, v.spacing, v.origin, v.direction)
        folders.append(folder)
    return folders


def _acknowledged(log: list[str]) -> list[str]:
    """Files ``storescu -v`` got a Success for."""
    done, current = [], None
    for line in log:
        if "Sending file:" in line:
            current = line.split("Sending file:", 1)[1].strip()
        elif "Received Store Response (Success)" in line and current:
            done.append(current)
    return done


@pytest.mark.peer
def test_kill_9_during_group_commit_loses_nothing_acknowledged(tmp_path: Path, four_series: list[Path]) -> None:
    config = write_node_config(tmp_path / "node.yaml", completion={"quiet_period_s": 3600})
    logs: list[list[str]] = [[] for _ in four_series]
    successes = [0]
    lock = threading.Lock()
    with node(config) as n:

        def send(k: int) -> None:
            with subprocess.Popen(["storescu", "-v", "-nh", "-aet", "SCANNER", "-aec", "SEGNODE", "+sd",
                                   "127.0.0.1", str(n.port), str(four_series[k])], env=DCMTK_ENV, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as sender:
                assert sender.stdout is not None
                for line in sender.stdout:
                    logs[k].append(line)
                    if "Received Store Response (Success)" in line:
                        with lock:
                            successes[0] += 1
                            if successes[0] == KILL_AFTER:  # mid-stream, while the four share waves
                                n.proc.send_signal(signal.SIGKILL)

        threads = [threading.Thread(target=send, args=(k,)) for k in range(SENDERS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stop_process(n.proc)
    acked = [path for log in logs for path in _acknowledged(log)]
    assert KILL_AFTER <= len(acked) < SENDERS * IMAGES  # killed mid-stream
    uids = [str(dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in acked]
    killed = Index(n.state_dir / "index.sqlite")  # as the kill left it: each row was committed before its answer
    assert [uid for uid in uids if not killed.has_instance(uid)] == []
    killed.close()
    with node(config) as again:  # the start-up check runs; the index and spool are what survived
        index = Index(again.state_dir / "index.sqlite")
        spool = again.state_dir / "spool"
        for path in acked:
            ds = dcmread(path, stop_before_pixels=True)
            stored = spool / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
            assert dcmread(stored).SOPInstanceUID == ds.SOPInstanceUID, path
            assert index.has_instance(ds.SOPInstanceUID), path
