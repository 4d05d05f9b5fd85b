"""Group commit: instances arriving together share one sync wave and one index transaction; nothing
acknowledged is lost when the node is killed during it."""

from __future__ import annotations

import signal
import subprocess
import threading
from collections.abc import Iterable, Sequence
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


def _record(sop: str, spool: Spool) -> InstanceRecord:
    path = spool.instance_path(STUDY, SERIES, sop)
    return InstanceRecord(sop, SERIES, STUDY, "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1", "CT",
                          str(path.relative_to(spool.root)), 100, "SCANNER", "SEGNODE", "127.0.0.1")


class _TogetherSpool(Spool):
    """A spool whose writes start together: each waits in :meth:`write` until every writer is writing."""

    together: threading.Barrier | None = None

    def write(self, study_uid: str, series_uid: str, sop_uid: str, parts: Iterable[bytes | memoryview], *,
              self_checking: bool = False) -> Path:
        if self.together is not None:
            self.together.wait(timeout=30)
        return super().write(study_uid, series_uid, sop_uid, parts, self_checking=self_checking)


def _commit_together(committer: GroupCommit, spool: _TogetherSpool, sops: list[str]) -> list[bool | StorageError]:
    """Writers syncing at the same moment (each on its own thread); what each was answered."""
    outcomes: list[bool | StorageError] = [False] * len(sops)
    spool.together = threading.Barrier(len(sops))

    def write(k: int, sop: str) -> None:
        try:
            outcomes[k] = committer.commit((sop.encode() * 10,), _record(sop, spool))
        except StorageError as exc:
            outcomes[k] = exc

    threads = [threading.Thread(target=write, args=item) for item in enumerate(sops)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


def test_writers_arriving_together_share_one_transaction(tmp_path: Path) -> None:
    spool, index = _TogetherSpool(tmp_path / "spool"), Index(tmp_path / "index.sqlite")
    committer = GroupCommit(spool, index, window_s=30.0)  # the leader waits for every writer still syncing
    sops = [f"1.2.3.4.{k}" for k in range(8)]
    outcomes = _commit_together(committer, spool, sops + ["1.2.3.4.0"])  # the last one repeats the first
    assert outcomes.count(True) == 8 and outcomes.count(False) == 1  # one copy new, the other a duplicate
    assert (committer.counters.transactions, committer.counters.rows) == (1, 9)
    assert index.instance_count() == 8 and index.series(SERIES).instance_count == 8
    assert sorted(p.stem for p in spool.root.glob("*/*/*.dcm")) == sorted(sops)


def test_a_lone_writer_waits_for_nobody(tmp_path: Path) -> None:
    spool, index = Spool(tmp_path / "spool"), Index(tmp_path / "index.sqlite")
    committer = GroupCommit(spool, index, window_s=3600.0)  # only writers already syncing are waited for
    for k in range(3):
        assert committer.commit((b"x" * 1000,), _record(f"1.2.3.4.{k}", spool))
    assert committer.counters.transactions == 3 and index.instance_count() == 3


def test_a_failed_write_fails_only_its_writer(tmp_path: Path) -> None:
    spool, index = _TogetherSpool(tmp_path / "spool"), Index(tmp_path / "index.sqlite")
    committer = GroupCommit(spool, index, window_s=30.0)
    spool.series_dir(STUDY, SERIES).parent.mkdir(parents=True)
    (spool.series_dir(STUDY, SERIES) / "1.2.3.4.2.dcm").mkdir(parents=True)  # its name is taken by a folder
    sops = [f"1.2.3.4.{k}" for k in range(4)]
    outcomes = _commit_together(committer, spool, sops)
    assert isinstance(outcomes[2], StorageError)
    assert outcomes[:2] + outcomes[3:] == [True] * 3
    assert not index.has_instance("1.2.3.4.2") and index.instance_count() == 3


class _RefusingIndex(Index):
    """An index whose rows for ``refused`` fail (a constraint the batch trips over)."""

    refused: frozenset[str] = frozenset()

    def record_instances(self, records: Sequence[InstanceRecord]) -> list[bool]:
        if any(r.sop_uid in self.refused for r in records):
            raise StorageError("index: refused row", where=str(self.path))
        return super().record_instances(records)


def test_a_failed_index_row_fails_only_its_writer(tmp_path: Path) -> None:
    spool, index = _TogetherSpool(tmp_path / "spool"), _RefusingIndex(tmp_path / "index.sqlite")
    index.refused = frozenset({"1.2.3.4.1"})
    committer = GroupCommit(spool, index, window_s=30.0)
    outcomes = _commit_together(committer, spool, [f"1.2.3.4.{k}" for k in range(4)])
    assert isinstance(outcomes[1], StorageError)
    assert outcomes[:1] + outcomes[2:] == [True] * 3
    assert index.instance_count() == 3


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
@pytest.mark.parametrize("processes", [1, 2], ids=["one-receiver", "two-receiver-processes"])
def test_kill_9_during_group_commit_loses_nothing_acknowledged(tmp_path: Path, four_series: list[Path],
                                                               processes: int) -> None:
    config = write_node_config(tmp_path / "node.yaml", completion={"quiet_period_s": 3600},
                               limits={"min_free_disk_mb": 1, "receiver_processes": processes})
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
