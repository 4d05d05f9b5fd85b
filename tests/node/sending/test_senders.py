"""A sender per destination (node/sending/): bounded tries, no retry inside a try, no destination waits on another.

Real sockets on loopback: a black hole (accepts TCP, never answers), a closed
port, a peer that hangs up at once, an HTTP peer that answers 503, a
pynetdicom SCP that takes its time, DCMTK ``storescp`` as the healthy
destination, and the node itself (:class:`segnode.node.service.Service`
in-process, as ``segnode serve`` runs it).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from pydicom import dcmread
from segnode.identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from segnode.node.config import NodeConfig
from segnode.node.dispatch import backoff_s
from segnode.node.events import Delivered, Event
from segnode.node.sending.delivery import Courier, DeliveryTask
from segnode.node.sending.queues import DestinationQueue
from segnode.node.sending.sender import Sender, SendResult, sender_for
from segnode.node.service import Service
from segnode.storage.index import (
    Delivery,
    DeliveryState,
    Index,
    InstanceRecord,
    Job,
    JobState,
)

from tests.paths import DATA
from tests.peers import free_port, store_statuses, storescp, storescu, wait_until
from tests.phantoms import thorax_phantom, write_ct_series

pytestmark = pytest.mark.peer
SEG = DATA / "liver_3slice" / "liver_seg_dcmqi.dcm"


# -- hostile peers -------------------------------------------------------------------------------

@dataclass
class BlackHole:
    """Accepts every TCP connection, reads what comes, never answers."""

    port: int
    accepted: list[float] = field(default_factory=list)  # time.time() of each accept
    first_bytes: bytearray = field(default_factory=bytearray)


@contextmanager
def black_hole() -> Iterator[BlackHole]:
    listener = socket.create_server(("127.0.0.1", 0))
    hole = BlackHole(listener.getsockname()[1])
    conns: list[socket.socket] = []

    def drain(conn: socket.socket, keep: bool) -> None:
        while data := _recv(conn):
            if keep and len(hole.first_bytes) < 4096:
                hole.first_bytes.extend(data)

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:  # closed: the test is over
                return
            hole.accepted.append(time.time())
            conns.append(conn)
            threading.Thread(target=drain, args=(conn, len(conns) == 1), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield hole
    finally:
        listener.close()
        for conn in conns:
            conn.close()


def _recv(conn: socket.socket) -> bytes:
    try:
        return conn.recv(65536)
    except OSError:
        return b""


@dataclass
class HangUp:
    """Accepts each TCP connection and closes it at once."""

    port: int
    accepted: list[float] = field(default_factory=list)


@contextmanager
def hang_up_at_once() -> Iterator[HangUp]:
    listener = socket.create_server(("127.0.0.1", 0))
    peer = HangUp(listener.getsockname()[1])

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            peer.accepted.append(time.time())
            conn.close()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield peer
    finally:
        listener.close()


@contextmanager
def http_503() -> Iterator[tuple[int, list[str]]]:
    """An HTTP server answering every POST with 503; yields its port and the paths posted."""
    posted: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            posted.append(self.path)
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1], posted
    finally:
        server.shutdown()
        server.server_close()


def sender(dest: dict, **dispatch: float) -> Sender:
    config = NodeConfig(destinations=[dest], dispatch=dispatch)
    return sender_for(config.destinations[0], calling_ae="SEGNODE", dispatch=config.dispatch)


def stow_dest(port: int) -> dict:
    return {"name": "web", "dicomweb": {"url": f"http://127.0.0.1:{port}/dicom-web"}}


# -- one try, bounded ----------------------------------------------------------------------------

def test_a_dimse_peer_that_never_answers_ends_the_try_within_its_deadline(tmp_path: Path) -> None:
    with black_hole() as hole:
        dimse = sender({"name": "hole", "ae_title": "HOLE", "host": "127.0.0.1", "port": hole.port,
                        "connect_timeout_s": 1, "timeout_s": 1.5})
        started = time.monotonic()
        [result] = dimse.send([SEG])
        took = time.monotonic() - started
        echo = dimse.echo()
        wait_until(lambda: len(hole.first_bytes) >= 74, 5, "the A-ASSOCIATE-RQ")
    assert result.retryable and "no answer to the association request within 1.5 s" in result.message
    assert 1.4 <= took < 1.5 + 3.0, took  # the deadline, not pynetdicom's 30 s nor a hang
    assert echo.retryable and "no answer" in echo.message
    # the request names segnode, not pynetdicom (PS3.7 D.3.3.2)
    assert hole.first_bytes[0] == 0x01  # A-ASSOCIATE-RQ
    assert IMPLEMENTATION_CLASS_UID.encode() in hole.first_bytes
    assert IMPLEMENTATION_VERSION_NAME.encode() in hole.first_bytes


def test_the_attempt_deadline_aborts_an_association_that_takes_too_long(tmp_path: Path) -> None:
    """A peer that answers each C-STORE after 1 s: a try of 2.5 s stores what it can, the rest is retryable."""
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE, evt

    from tests.node.sending.test_dispatch import small_object

    sc = "1.2.840.10008.5.1.4.1.1.7"
    files = [small_object(tmp_path, sc, f"2.25.{n}") for n in range(1, 7)]

    def slow_store(event: evt.Event) -> int:
        time.sleep(1.0)
        return 0x0000

    scp = AE(ae_title="SLOW")
    scp.add_supported_context(sc, ExplicitVRLittleEndian)
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, slow_store)])
    try:
        dimse = sender({"name": "slow", "ae_title": "SLOW", "host": "127.0.0.1", "port": port,
                        "timeout_s": 2, "attempt_timeout_s": 2.5})
        started = time.monotonic()
        results = dimse.send(files)
        took = time.monotonic() - started
    finally:
        server.shutdown()
    assert results[0].ok and not results[-1].ok, [r.message for r in results]
    assert all(r.retryable for r in results if not r.ok)
    assert any("attempt deadline (2.5 s)" in r.message for r in results)
    assert took < 2.5 + 2 + 2.0, took  # the deadline plus at most one wait for a response


def test_stow_to_a_closed_port_is_one_quick_try() -> None:
    """dicomweb-client alone would try five times, waiting 2 + 4 + 8 + 16 s in between."""
    stow = sender(stow_dest(free_port()), connect_timeout_s=2)
    started = time.monotonic()
    [result] = stow.send([SEG])
    took = time.monotonic() - started
    assert result.retryable and "cannot connect" in result.message
    assert took < 2.0, took


def test_stow_makes_one_connection_and_one_request_per_try() -> None:
    with hang_up_at_once() as peer:
        [result] = sender(stow_dest(peer.port)).send([SEG])
        assert result.retryable and "cannot connect" in result.message
        wait_until(lambda: peer.accepted, 5, "the connection")
        assert len(peer.accepted) == 1  # neither urllib3 nor dicomweb-client tried again
    with http_503() as (port, posted):
        [result] = sender(stow_dest(port)).send([SEG])
    assert result.retryable and result.message == "STOW-RS refused with HTTP 503"
    assert posted == ["/dicom-web/studies"]  # one request, not five


def test_deadlines_are_validated_and_a_destination_overrides_the_defaults() -> None:
    from segnode.node.sending.sender import Deadlines

    config = NodeConfig(dispatch={"connect_timeout_s": 4, "timeout_s": 20, "attempt_timeout_s": 100},
                        destinations=[{"name": "a", "ae_title": "A", "host": "h", "port": 1},
                                      {"name": "b", "ae_title": "B", "host": "h", "port": 1, "connect_timeout_s": 1,
                                       "timeout_s": 2, "attempt_timeout_s": 3, "workers": 2}])
    assert Deadlines.of(config.destination("a"), config.dispatch) == Deadlines(4, 20, 100)
    assert Deadlines.of(config.destination("b"), config.dispatch) == Deadlines(1, 2, 3)
    for bad in ({"connect_timeout_s": 0}, {"timeout_s": -1}, {"workers": 0}, {"connect_timeout_s": 301},
                {"retries": 3}):
        with pytest.raises(ValueError):
            NodeConfig(destinations=[{"name": "a", "ae_title": "A", "host": "h", "port": 1, **bad}])
    with pytest.raises(ValueError):
        NodeConfig(dispatch={"attempt_timeout_s": 0})


# -- a sender per destination, through the node --------------------------------------------------

@dataclass(frozen=True)
class Try:
    """One delivery try as the node reported it, and the index's row right after."""

    at: float
    event: Delivered
    row: Delivery


def test_a_down_and_a_black_holing_destination_never_delay_a_healthy_one(tmp_path: Path) -> None:
    """The issue's measurement: STOW-RS to a closed port and a DIMSE black hole routed for one series;
    a series for the healthy destination alone arrives as fast as it did with no bad destination (+1 s),
    and the bad deliveries are tried on the backoff schedule until dead-lettered."""
    policy = {"max_attempts": 3, "backoff_initial_s": 0.5, "backoff_max_s": 2.0, "poll_interval_s": 0.2,
              "connect_timeout_s": 1, "timeout_s": 2}
    series = {name: write_series(tmp_path / name) for name in ("baseline", "a", "b")}
    with black_hole() as hole, storescp(tmp_path / "pacs", ae_title="PACS") as pacs:
        routes = tmp_path / "routes.yaml"
        routes.write_text(yaml.safe_dump({"rules": [
            {"name": "everywhere", "match": {"calling_ae": "SCANNER_A"},
             "action": {"profile": "lungs", "destinations": ["down", "hole", "pacs"]}},
            {"name": "pacs-only", "fallback": True, "action": {"profile": "lungs", "destinations": ["pacs"]}}]}))
        config = NodeConfig(port=0, state_dir=tmp_path / "state", routes=routes, dispatch=policy,
                            completion={"quiet_period_s": 1.0, "sweep_interval_s": 0.2, "grace_s": 0.2},
                            limits={"min_free_disk_mb": 1}, destinations=[  # the healthy one last: dispatch order
                                {"name": "down", "dicomweb": {"url": f"http://127.0.0.1:{free_port()}/dicom-web"}},
                                {"name": "hole", "ae_title": "HOLE", "host": "127.0.0.1", "port": hole.port},
                                {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}])
        service = Service(config)
        tries: list[Try] = []

        def record(event: Event) -> None:
            if isinstance(event, Delivered):
                row = next(d for d in service.index.deliveries(event.job_id) if d.destination == event.destination)
                tries.append(Try(time.time(), event, row))

        service.listeners.append(record)
        port = service.start()
        try:
            baseline = send_and_time(service, port, series["baseline"], "SCANNER_B")
            a_sent = time.time()
            assert store_statuses(storescu(port, [series["a"]], calling="SCANNER_A").stderr) == ["Success"] * 12
            job_a = wait_until(lambda: job_in(service, series["a"], JobState.SENDING), 120, "series a sending")
            b = send_and_time(service, port, series["b"], "SCANNER_B")  # while a's tries to down and hole go on
            a = Timing(a_sent, sending_at(service, job_a), delivered_at(service, job_a, "pacs"))
            for name in ("down", "hole"):
                wait_until(lambda: dead(service, job_a, name), 60, f"{name} to be dead-lettered")
            assert wait_until(lambda: job_in(service, series["a"], JobState.DEAD_LETTER), 10, "job a dead-lettered")
        finally:
            service.stop()
        assert len(pacs.received()) == 3  # one SEG for each series
    print(f"\nhealthy destination, dispatch (encoded → stored): baseline {baseline.dispatch_s:.2f} s, "
          f"with down + black hole: series a {a.dispatch_s:.2f} s, series b {b.dispatch_s:.2f} s; "
          f"end to end: baseline {baseline.end_to_end_s:.2f} s, a {a.end_to_end_s:.2f} s, b {b.end_to_end_s:.2f} s")
    assert a.dispatch_s <= baseline.dispatch_s + 1.0 and b.dispatch_s <= baseline.dispatch_s + 1.0
    for name in ("down", "hole"):
        check_schedule([t for t in tries if t.event.job_id == job_a.job_id and t.event.destination == name],
                       max_attempts=3, initial=0.5, cap=2.0, try_s=0.0 if name == "down" else 2.0)
    assert len(hole.accepted) >= 3  # the black hole saw job a's three tries (and job b's none: not routed there)


def check_schedule(tries: list[Try], *, max_attempts: int, initial: float, cap: float, try_s: float) -> None:
    """Each try recorded with the next one due ``backoff_s(n)`` later; the next try made at that time, not before;
    dead after ``max_attempts``."""
    assert [t.row.attempts for t in tries] == list(range(1, max_attempts + 1))
    assert [t.row.state for t in tries] == [DeliveryState.PENDING] * (max_attempts - 1) + [DeliveryState.DEAD]
    for before, after in zip(tries, tries[1:]):
        wait = before.row.next_attempt_at - before.at
        assert backoff_s(before.row.attempts, initial, cap) - 0.5 <= wait <= backoff_s(before.row.attempts, initial,
                                                                                       cap), wait
        started = after.at - try_s  # a try to the black hole lasts its response deadline
        assert before.row.next_attempt_at - 0.3 <= started <= before.row.next_attempt_at + 0.2 + 1.5, (
            started - before.row.next_attempt_at)


@dataclass(frozen=True)
class Timing:
    sent: float  # storescu started
    sending: float  # the job's result accepted, deliveries due
    stored: float  # the healthy destination's delivery done

    @property
    def dispatch_s(self) -> float:
        return self.stored - self.sending

    @property
    def end_to_end_s(self) -> float:
        return self.stored - self.sent


def write_series(folder: Path) -> Path:
    v = thorax_phantom(shape=(12, 64, 64), spacing=(6.25, 6.25, 5.0)).volume
    write_ct_series(v.hu, folder, v.spacing, v.origin, v.direction)
    return folder


def series_uid(folder: Path) -> str:
    return str(dcmread(next(folder.iterdir()), stop_before_pixels=True).SeriesInstanceUID)


def job_in(service: Service, folder: Path, state: JobState) -> Job | None:
    uid = series_uid(folder)
    return next((j for j in service.index.jobs() if j.series_uid == uid and j.state is state), None)


def sending_at(service: Service, job: Job) -> float:
    return next(t for t, state, _ in service.index.events(job.job_id) if state is JobState.SENDING)


def delivered_at(service: Service, job: Job, name: str) -> float:
    def done() -> float | None:
        row = next(d for d in service.index.deliveries(job.job_id) if d.destination == name)
        return row.delivered_at if row.state is DeliveryState.DONE else None

    return float(wait_until(done, 120, f"job {job.job_id} delivered to {name}"))


def dead(service: Service, job: Job, name: str) -> bool:
    return any(d.destination == name and d.state is DeliveryState.DEAD for d in service.index.deliveries(job.job_id))


def send_and_time(service: Service, port: int, folder: Path, calling: str) -> Timing:
    sent = time.time()
    assert store_statuses(storescu(port, [folder], calling=calling).stderr) == ["Success"] * 12
    job = wait_until(lambda: job_in(service, folder, JobState.DONE) or job_in(service, folder, JobState.SENDING),
                     120, f"{folder.name} sending")
    return Timing(sent, sending_at(service, job), delivered_at(service, job, "pacs"))


# -- the queues and the courier, with a scripted sender ------------------------------------------

class Scripted:
    """A :class:`Sender` that answers from a script and can be held (a destination that hangs)."""

    def __init__(self, *answers: list[SendResult]) -> None:
        self.answers = list(answers)
        self.calls: list[list[str]] = []
        self.release = threading.Event()
        self.release.set()

    def send(self, paths: Sequence[Path]) -> list[SendResult]:
        self.calls.append([str(p) for p in paths])
        self.release.wait(30)
        return self.answers.pop(0)

    def echo(self) -> SendResult:
        return SendResult.stored("echo")


def sending_job(index: Index, destinations: tuple[str, ...], uids: tuple[str, ...]) -> int:
    index.record_instance(InstanceRecord(
        sop_uid="1.1", series_uid="1.2.3", study_uid="1.2", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax_uid="1.2.840.10008.1.2.1", modality="CT", path="1.2/1.2.3/1.1.dcm", size_bytes=10,
        calling_ae="SCANNER", called_ae="SEGNODE", sender_host="127.0.0.1"))
    job_id = index.jobs()[0].job_id
    index.mark_complete(job_id, rule="r", profile="lungs", backend=None, destinations=destinations)
    index.claim_next()
    outputs = [{"kind": "seg", "path": f"{u}.dcm", "sop_class_uid": "1.2.840.10008.5.1.4.1.1.66.4",
                "sop_instance_uid": u, "series_instance_uid": "9"} for u in uids]
    index.mark_encoded(job_id, seg_path=f"{uids[0]}.dcm", seg_series_uid="9", seg_sop_uid=uids[0], backend_used="b",
                       model_version="1", outputs=outputs, result_dir="/results/job-1")
    return job_id


def queue_for(name: str, sender: Scripted, index: Index, events: list[Event]) -> DestinationQueue:
    policy = NodeConfig(dispatch={"max_attempts": 3, "backoff_initial_s": 5, "backoff_max_s": 60}).dispatch
    return DestinationQueue(Courier(name, sender, index, policy, events.append))


def test_a_hanging_destination_holds_only_its_own_queue(tmp_path: Path) -> None:
    index = Index(tmp_path / "index.sqlite")
    job_id = sending_job(index, ("hangs", "fine"), ("5.1",))
    events: list[Event] = []
    hangs, fine = Scripted([SendResult.stored("ok")]), Scripted([SendResult.stored("ok")])
    hangs.release.clear()
    queues = [queue_for("hangs", hangs, index, events), queue_for("fine", fine, index, events)]
    for q in queues:
        q.start()
    try:
        for q in queues:
            assert q.put(DeliveryTask(job_id, q.destination, 0))
        wait_until(lambda: fine.calls and events, 10, "the fine destination's try")
        assert events == [Delivered(job_id, "fine", True, "stored 1 object(s)")]
        assert hangs.calls == [["/results/job-1/5.1.dcm"]]  # in flight, held
        assert not queues[0].put(DeliveryTask(job_id, "hangs", 0))  # found due again while in flight: left alone
        assert index.job(job_id).state is JobState.SENDING  # type: ignore[union-attr]
        hangs.release.set()
        wait_until(lambda: len(events) == 2, 10, "the held try to end")
        assert index.job(job_id).state is JobState.DONE  # type: ignore[union-attr]
        assert fine.calls == hangs.calls == [["/results/job-1/5.1.dcm"]]  # each sent once
        assert queues[0].put(DeliveryTask(job_id, "hangs", 0))  # a stale task (tried since): not sent again
        wait_until(lambda: queues[0].in_hand() == 0, 10, "the stale task to be dropped")
        assert len(hangs.calls) == 1
    finally:
        for q in queues:
            q.stop()


def test_a_retry_resends_only_what_was_not_stored_on_the_backoff_schedule(tmp_path: Path) -> None:
    index = Index(tmp_path / "index.sqlite")
    job_id = sending_job(index, ("pacs",), ("5.1", "5.2", "5.3"))
    events: list[Event] = []
    pacs = Scripted([SendResult.stored("ok"), SendResult.retry("0xA700", 0xA700), SendResult.refused("no context")],
                    [SendResult.stored("ok")])
    queue = queue_for("pacs", pacs, index, events)
    queue.start()
    try:
        before = time.time()
        queue.put(DeliveryTask(job_id, "pacs", 0))
        wait_until(lambda: events, 10, "the first try")
        [row] = index.deliveries(job_id)
        assert row.state is DeliveryState.PENDING and row.attempts == 1
        assert before + 5 <= row.next_attempt_at <= time.time() + 5  # backoff_s(1) = 5 s
        assert {o.sop_instance_uid: o.state for o in index.delivery_objects(job_id)} == {
            "5.1": DeliveryState.DONE, "5.2": DeliveryState.PENDING, "5.3": DeliveryState.DEAD}
        assert queue.put(DeliveryTask(job_id, "pacs", 0))  # found due before that try, handed over late: dropped
        wait_until(lambda: queue.in_hand() == 0, 10, "the stale task to be dropped")
        assert len(pacs.calls) == 1  # a retry is never sent before its time
        queue.put(DeliveryTask(job_id, "pacs", 1))  # as the poll hands it over once due
        wait_until(lambda: len(events) == 2, 10, "the second try")
    finally:
        queue.stop()
    folder = "/results/job-1/"
    assert pacs.calls == [[folder + "5.1.dcm", folder + "5.2.dcm", folder + "5.3.dcm"], [folder + "5.2.dcm"]]
    [row] = index.deliveries(job_id)
    assert row.state is DeliveryState.DEAD and row.attempts == 2  # 5.3 was refused for good
    assert index.job(job_id).state is JobState.DEAD_LETTER  # type: ignore[union-attr]
