"""A remote worker rides out a node that restarts: it fetches and posts again, and gives up in one line.

Found by the soak (bench/soak.py): the node killed while a worker fetched a
series failed the Celery task with a traceback in the worker's log.  The node
here is a fake (a unit test of the worker's side); the soak runs the real one.
"""

from __future__ import annotations

import io
import logging
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from segnode.node.http_in.multipart import encode_parts
from segnode.node.ops.logs import PeerGoneFilter
from segnode.node.remote.worker import WorkerSettings, fetch_series, handle, post_result, with_retries

STUDY, SERIES = generate_uid(), generate_uid()


def part10(sop_uid: str) -> bytes:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", sop_uid
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = io.BytesIO()
    pydicom.dcmwrite(out, ds, enforce_file_format=True)
    return out.getvalue()


class FlakyNode(BaseHTTPRequestHandler):
    """Breaks off its first WADO-RS answer, answers 503 to its first result POST, then serves."""

    gets: list[str]
    posts: list[int]
    body: bytes
    boundary = "segnode-test-boundary"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.gets.append(self.path)
        self.send_response(200)
        self.send_header("Content-Type", f'multipart/related; type="application/dicom"; boundary={self.boundary}')
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        if len(self.gets) == 1:  # the node is killed half-way through its answer
            self.wfile.write(self.body[: len(self.body) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self.wfile.write(self.body)

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.posts.append(len(self.posts))
        status, answer = (503, b"starting") if len(self.posts) == 1 else (200, b'{"accepted": true, "state": "done"}')
        self.send_response(status)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)


@pytest.fixture
def flaky_node() -> Iterator[tuple[str, type[FlakyNode]]]:
    sop = generate_uid()
    handler = type("Node", (FlakyNode,), {"gets": [], "posts": [], "sop": sop, "body": b"".join(
        encode_parts([({"Content-Type": "application/dicom"}, part10(sop))], FlakyNode.boundary))})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def worker_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="segnode.node.remote.worker")
    return caplog


def test_a_node_that_breaks_off_its_answer_is_fetched_from_again(
        tmp_path: Path, flaky_node: tuple[str, type[FlakyNode]], worker_log: pytest.LogCaptureFixture) -> None:
    base, node = flaky_node
    settings = WorkerSettings(state_dir=tmp_path, name="w", retry_s=30, http_timeout_s=10)
    folder = tmp_path / "input"
    folder.mkdir()
    session = requests.Session()
    assert with_retries(7, "fetch the series", settings,
                        lambda: fetch_series(session, base, STUDY, SERIES, folder, settings)) is True
    assert len(node.gets) == 2
    assert [p.name for p in folder.iterdir()] == [f"{node.sop}.dcm"]  # type: ignore[attr-defined]
    assert pydicom.dcmread(folder / f"{node.sop}.dcm").SOPInstanceUID == node.sop  # type: ignore[attr-defined]
    warnings = [r for r in worker_log.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "job 7: could not fetch the series" in warnings[0].getMessage()
    assert not any(r.exc_info for r in worker_log.records)


def test_a_node_answering_503_gets_the_result_again(
        tmp_path: Path, flaky_node: tuple[str, type[FlakyNode]], worker_log: pytest.LogCaptureFixture) -> None:
    base, node = flaky_node
    settings = WorkerSettings(state_dir=tmp_path, name="w", retry_s=30, http_timeout_s=10)
    out = tmp_path / "out"
    out.mkdir()
    (out / "seg.dcm").write_bytes(b"result")
    outcome = with_retries(7, "post the result", settings,
                           lambda: post_result(requests.Session(), base, 7, {"ok": True}, out, settings))
    assert outcome == "done" and node.posts == [0, 1]
    assert "job 7: could not post the result (NodeNotAnswering: HTTP 503)" in worker_log.text


def test_a_node_that_stays_down_is_given_up_in_one_line(tmp_path: Path, worker_log: pytest.LogCaptureFixture) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # nothing listens there once closed
    settings = WorkerSettings(state_dir=tmp_path, name="w", retry_s=1.5, http_timeout_s=2)
    message = {"job_id": 3, "attempt": 2, "study_uid": STUDY, "series_uid": SERIES, "token": "job.3.2.x",
               "node_url": f"http://127.0.0.1:{port}", "spec": {}}
    assert handle(message, settings) == "failed"
    errors = [r.getMessage() for r in worker_log.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith("job 3 attempt 2 given up on this worker: job 3: could not "
                                                     "fetch the series within 2 s"), errors
    assert not any(r.exc_info for r in worker_log.records)
    assert list((tmp_path / "jobs").iterdir()) == []  # nothing of the job is kept


def _logged(name: str, exc: BaseException, gone: PeerGoneFilter) -> str:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(gone)
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    try:
        try:
            raise exc
        except type(exc):
            logger.critical("Couldn't ack %r, reason:%r", 4, exc, exc_info=True)
    finally:
        logger.removeHandler(handler)
    return out.getvalue()


def test_broker_resets_keep_their_line_not_their_traceback() -> None:
    gone = PeerGoneFilter((OSError,), ("celery", "kombu", "amqp"))
    kept = _logged("celery.worker.request", ConnectionResetError(104, "Connection reset by peer"), gone)
    assert "Couldn't ack 4, reason:ConnectionResetError(104, 'Connection reset by peer')" in kept
    assert "Traceback" not in kept
    assert "Traceback" in _logged("celery.app.trace", ValueError("a bug"), gone)  # not a reset: the traceback stays
    assert "Traceback" in _logged("segnode.node.remote.worker", OSError("disk"), gone)  # not the broker's library
