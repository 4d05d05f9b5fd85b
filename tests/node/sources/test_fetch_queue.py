"""The fetch requests table and the node's fetch pool, without a PACS: a run is a stand-in that waits to be let go.

The pool with a real PACS, over the ops HTTP API, is tests/node/ops/test_fetch_api.py.
"""

from __future__ import annotations

import threading
from pathlib import Path

from segnode.node.config import NodeConfig
from segnode.node.sources.fetch import FetchReport
from segnode.node.sources.fetch_queue import FetchQueue
from segnode.node.sources.fetch_requests import FetchOrder, FetchRequest, FetchRequests, FetchState
from segnode.storage.index import Index

from tests.peers import wait_until


class HeldQueue(FetchQueue):
    """A pool whose runs find nothing to retrieve, each once its gate opens."""

    gate: threading.Event

    def fetch(self, request: FetchRequest) -> FetchReport:
        self.gate.wait(30)
        return FetchReport(request.order.source, request.order.query().describe(), 1, ())


def held_queue(tmp_path: Path, gate: threading.Event) -> tuple[FetchQueue, Index]:
    config = NodeConfig(port=0, state_dir=tmp_path / "state")
    index = Index(config.index_path)
    queue = HeldQueue(config, index, lambda: None, per_source=2, in_all=3)
    queue.gate = gate
    return queue, index


def order(source: str = "pacs") -> FetchOrder:
    return FetchOrder(source, accession="A1")


def test_the_pool_runs_two_per_source_and_three_in_all_oldest_first(tmp_path: Path) -> None:
    gate = threading.Event()
    queue, index = held_queue(tmp_path, gate)
    queue.start()
    ids = [queue.requests.add(order(s), by="olga", client=None).id for s in ("a", "a", "a", "b", "b")]
    queue.pump()
    states = [queue.requests.get(n).state for n in ids]  # type: ignore[union-attr]
    assert states == [FetchState.RUNNING, FetchState.RUNNING, FetchState.QUEUED, FetchState.RUNNING,
                      FetchState.QUEUED]
    gate.set()
    wait_until(lambda: all(r.state is FetchState.DONE for r in queue.requests.recent(10)), 30, "every run")
    queue.stop()
    assert queue.join(30)
    index.close()


def test_a_run_that_ends_after_the_stop_records_nothing_and_runs_again(tmp_path: Path) -> None:
    gate = threading.Event()
    queue, index = held_queue(tmp_path, gate)
    queue.start()
    request = queue.requests.add(order(), by="olga", client="127.0.0.1")
    queue.pump()
    queue.stop()
    gate.set()
    assert queue.join(30)
    assert queue.requests.get(request.id).state is FetchState.RUNNING  # type: ignore[union-attr]
    again, second = held_queue(tmp_path, gate)
    again.start()
    done = wait_until(lambda: (r := again.requests.get(request.id)) is not None and r.state is FetchState.DONE
                      and r, 30, "the run again")
    assert (done.attempt, done.by, done.error, done.report["studies"]) == (2, "olga", None, 1)
    again.stop()
    assert again.join(30)
    index.close()
    second.close()


def test_only_the_latest_run_records_its_outcome(tmp_path: Path) -> None:
    requests = FetchRequests(tmp_path / "retrievals.sqlite")
    request = requests.add(order(), by="olga", client=None)
    assert requests.start(request.id) == 1
    assert requests.start(request.id) is None  # running already
    assert requests.requeue_interrupted() == 1
    assert requests.start(request.id) == 2
    assert not requests.finish(request.id, 1, report=None, error="stale")
    assert requests.finish(request.id, 2, report={"ok": True}, error=None)
    stored = requests.get(request.id)
    assert stored is not None and (stored.state, stored.report, stored.error) == (FetchState.DONE, {"ok": True}, None)
    assert requests.recent(5)[0].order == order()  # the order as asked, read back
