"""Receiver processes sharing the SCP's port: everything lands once, the ops side sees it all."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from pydicom import dcmread
from segnode.node.config import NodeConfig
from segnode.node.events import (
    AssociationAccepted,
    AssociationRejected,
    Event,
    InstanceRefused,
    InstanceStored,
    RejectionReason,
)
from segnode.node.service import Service

from tests.paths import DATA
from tests.peers import store_statuses, storescu, wait_until
from tests.tls_pki import Pki

THORAX = DATA / "thorax_cta"
pytestmark = pytest.mark.peer


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] != "Z"


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_concurrent_senders_spread_over_receiver_processes_and_are_all_counted(tmp_path: Path, pki: Pki,
                                                                               tls: bool) -> None:
    config = NodeConfig(port=0, state_dir=tmp_path / "state",
                        limits={"min_free_disk_mb": 1, "receiver_processes": 3},
                        allowed_senders=[{"ae_title": "SCANNER", "host": "127.0.0.1"}],
                        completion={"quiet_period_s": 3600}, tls=pki.server_tls(client_ca=True) if tls else None)
    extra = pki.storescu_args() if tls else []
    service = Service(config)
    events: list[Event] = []
    service.listeners.append(events.append)  # the receiver processes' events arrive over their pipes, typed
    port = service.start()
    assert service.scp is not None and service.receivers is not None
    pids = service.receivers.pids
    try:
        files = sorted(THORAX.glob("*.dcm"))
        parts = [files[k::6] for k in range(6)]
        results: list[list[str]] = [[] for _ in parts]

        def send(k: int) -> None:
            results[k] = store_statuses(storescu(port, parts[k], extra=extra).stderr)

        threads = [threading.Thread(target=send, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [len(r) for r in results] == [len(p) for p in parts]
        assert all(status == "Success" for r in results for status in r)
        refused = store_statuses(storescu(port, files[:1], calling="INTRUDER", extra=extra).stderr)
        assert refused == []  # rejected at association, by whichever process took it
        assert service.index.instance_count() == len(files)
        stats = service.scp.handler.stats

        def forwarded() -> bool:  # the receivers' stats and events come over their pipes, after the peers' answers
            seen = [type(e) for e in events]
            return (stats.stored >= len(files) and stats.associations_rejected >= 1
                    and seen.count(InstanceStored) >= len(files) and seen.count(AssociationAccepted) >= 6
                    and AssociationRejected in seen)

        wait_until(forwarded, 30, "the receiver processes' stats and events")
        assert (stats.stored, stats.associations_rejected) == (len(files), 1)
        kinds = [type(e) for e in events]
        assert kinds.count(InstanceStored) == len(files) and kinds.count(InstanceRefused) == 0
        assert kinds.count(AssociationAccepted) == 6  # every process's associations seen
        assert [e for e in events if isinstance(e, AssociationRejected)] == [
            AssociationRejected("INTRUDER", "127.0.0.1", RejectionReason.SENDER_NOT_ALLOWED)]
        assert {e.sop_uid for e in events if isinstance(e, InstanceStored)} == {
            str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    finally:
        service.stop()
    assert len(pids) == 2 and not any(_alive(pid) for pid in pids)


def test_receivers_exit_when_the_node_is_killed(tmp_path: Path) -> None:
    import signal

    from tests.peers import start_node, stop_process, wait_until, write_node_config

    config = write_node_config(tmp_path / "node.yaml", limits={"min_free_disk_mb": 1, "receiver_processes": 3})
    node = start_node(config)
    try:
        children = [int(p) for p in Path(f"/proc/{node.proc.pid}/task/{node.proc.pid}/children").read_text().split()]
        receivers = [pid for pid in children if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text()]
        assert len(receivers) == 2
        assert store_statuses(storescu(node.port, sorted(THORAX.glob("*.dcm"))[:4]).stderr) == ["Success"] * 4
    finally:
        node.proc.send_signal(signal.SIGKILL)
        stop_process(node.proc)  # reaps it and closes its pipe
    wait_until(lambda: not any(_alive(pid) for pid in receivers), 10, "the receivers to exit")
