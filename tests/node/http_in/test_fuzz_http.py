"""Seeded, bounded fuzz of every HTTP endpoint of the node's two listeners, like the DICOM port's fuzz.

A real node in-process (:class:`segnode.node.service.Service` with its ops side,
the DICOMweb server with a STOW-RS client and a retrieving client, and remote
jobs configured so the workers' endpoints grant real job tokens) takes a few
thousand hostile requests (``tests/http_fuzz.py``): mutated request lines,
headers, bodies, JSON, YAML, forms and multipart bodies built on a valid request
for each endpoint (the ops endpoints read from the running app's route table,
so new routes are fuzzed too), path traversal and encoding tricks, garbage,
oversized declarations, and slow-loris connections.

A case fails the test if the server answers a 5xx it does not mean (500; 501,
503 and 505 are meant), a 4xx without a reason, something that is not HTTP,
keeps a connection open past its deadline, a thread dies, socketserver reports
an error, or a segnode logger records a traceback.  Afterwards the threads and
open descriptors of the process are back where they were, and the node serves
legitimate requests on both listeners (a STOW-RS store among them).
"""

from __future__ import annotations

import gc
import http.client
import logging
import os
import re
import secrets
import socket
import struct
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydicom import dcmread
from segnode.node.config import NodeConfig
from segnode.node.ops.runner import Ops
from segnode.node.service import Service

from tests.http_fuzz import Case, RawRequest, cases, problems, request, send, stow_request
from tests.ops_helpers import STUDY, scripted_index
from tests.paths import DATA
from tests.peers import free_port, wait_until
from tests.traceback_log import TracebackLog

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on mutated instances

SEED = 20261207
CASES = {"ops": 1500, "dicomweb": 1500}
DEADLINE_S = 1.0  # the listeners' header deadline in this test (and the DICOMweb socket timeout, x2)
HANG_S = 20.0
WORKERS = 8
WARM = 300  # cases before the threads and descriptors are counted (see _open_fds)
CT = (DATA / "thorax_cta" / "CT0001.dcm").read_bytes()
SAMPLES = {"job_id": "1", "study_uid": STUDY, "series_uid": f"{STUDY}.1", "file": "overview.png"}


@dataclass
class Node:
    service: Service
    ops: Ops
    ops_token: str
    stow_token: str
    retrieve_token: str
    job_token: str

    @property
    def ops_port(self) -> int:
        assert self.ops.http is not None
        return self.ops.http.port

    @property
    def dicomweb_port(self) -> int:
        assert self.service.dicomweb is not None
        return self.service.dicomweb.port


def _secret(path: Path) -> str:
    token = secrets.token_urlsafe(24)
    path.write_text(token + "\n")
    path.chmod(0o600)
    return token


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    tmp = tmp_path_factory.mktemp("fuzz-node")
    tokens = {name: _secret(tmp / f"{name}.token") for name in ("ops", "ris", "viewer")}
    config = NodeConfig(
        port=0, state_dir=tmp / "state", limits={"min_free_disk_mb": 1},
        completion={"quiet_period_s": 3600, "evidence": False},  # nothing completes: no job runs
        http={"port": 0, "token_file": str(tmp / "ops.token")},
        broker={"url": f"amqp://guest:guest@127.0.0.1:{free_port()}//", "publish_timeout_s": 1},
        dicomweb={"enabled": True, "port": 0, "header_timeout_s": DEADLINE_S, "network_timeout_s": 2 * DEADLINE_S,
                  "max_connections_per_host": 64, "max_body_bytes": 4 * 1024 * 1024, "max_parts": 100,
                  "clients": [{"name": "ris", "token_file": str(tmp / "ris.token"), "ae_title": "RIS"},
                              {"name": "viewer", "token_file": str(tmp / "viewer.token"), "store": False,
                               "retrieve": True}]})
    config.state_dir.mkdir(mode=0o700)
    scripted_index(config.index_path).index.close()  # five series and their jobs: review pages, job API
    _spool_files(config.spool_dir)
    service = Service(config)
    ops = Ops(service)
    service.start()
    ops.start()
    assert service.remote is not None and ops.http is not None
    ops.http.server.header_timeout_s = DEADLINE_S  # type: ignore[attr-defined]
    ops.http.server.network_timeout_s = 2 * DEADLINE_S  # type: ignore[attr-defined]
    try:
        yield Node(service, ops, tokens["ops"], tokens["ris"], tokens["viewer"], service.remote.token(1, 1))
    finally:
        ops.stop()
        service.stop()


def _spool_files(spool: Path) -> None:
    """The instances the scripted index names, in the spool (a CT slice with their UIDs)."""
    for k in range(1, 6):
        series = f"{STUDY}.{k}"
        for i in range(2):
            ds = dcmread(DATA / "thorax_cta" / "CT0001.dcm")
            ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY, series
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{series}.{i + 1}"
            path = spool / STUDY / series / f"{i}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(path, enforce_file_format=True)


def concrete(pattern: str) -> str | None:
    """A path the route ``pattern`` matches: named groups filled with samples, optional groups taken."""
    path = re.sub(r"\(\?P<(\w+)>[^)]*\)", lambda m: SAMPLES.get(m[1], "1"), pattern)
    path = re.sub(r"\(([^()?]*)\)\?", r"\1", path).replace("\\.", ".")
    return path if re.fullmatch(pattern, path) else None


def ops_templates(node: Node) -> list[RawRequest]:
    """One valid request per route of the running ops app, with a body where the route takes one."""
    bodies = {"retry": b"", "approve": b'{"reviewer": "r", "comment": "ok"}', "reject": b'{"reviewer": "r"}',
              "decision": b"decision=approve&reviewer=r", "validate": b"rules:\n  - name: x\n"}
    out = []
    for route in node.ops.http.server.app.routes:  # type: ignore[union-attr]
        verb, pattern = route[0], route[1]
        path = concrete(pattern.pattern)
        if path is None:
            continue
        body = next((b for key, b in bodies.items() if path.endswith(key)), b"")
        out.append(request(verb, path, body=body, token=node.ops_token))
    out.append(request("GET", "/api/v1/jobs?state=done&limit=3", token=node.ops_token))
    out.append(request("GET", f"/api/v1/jobs?study={STUDY}", token=node.ops_token))
    return out


def dicomweb_templates(node: Node) -> list[RawRequest]:
    series = f"/dicomweb/studies/{STUDY}/series/{STUDY}.1"
    result_head = b'{"ok": true, "worker": "fuzz"}'
    result = stow_request("/remote/v1/jobs/1/result", node.job_token, [result_head])
    result = result.with_header(b"Content-Type", b"multipart/related; boundary=fuzz-boundary-0001")
    result = RawRequest(result.method, result.target, result.headers,
                        result.body.replace(b"application/dicom", b"application/json", 1))
    return [
        request("GET", "/healthz"),
        request("GET", series, token=node.retrieve_token),
        request("GET", series, token=node.job_token),
        request("GET", f"/dicomweb/studies?StudyInstanceUID={STUDY}", token=node.retrieve_token),
        request("GET", f"/dicomweb/studies/{STUDY}/series", token=node.retrieve_token),
        stow_request("/dicomweb/studies", node.stow_token, [CT]),
        stow_request(f"/dicomweb/studies/{STUDY}", node.stow_token, [CT, CT]),
        result,
    ]


@dataclass
class Findings:
    problems: list[str] = field(default_factory=list)
    tracebacks: list[str] = field(default_factory=list)
    library_tracebacks: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


@pytest.fixture
def findings(node: Node, monkeypatch: pytest.MonkeyPatch) -> Iterator[Findings]:
    found = Findings()
    handler = TracebackLog(found)
    logging.getLogger().addHandler(handler)
    previous = threading.excepthook
    monkeypatch.setattr(threading, "excepthook",
                        lambda args: (found.tracebacks.append(f"{args.thread}: {args.exc_value!r}"), previous(args)))
    for server in (node.ops.http.server, node.service.dicomweb.server):  # type: ignore[union-attr]
        monkeypatch.setattr(server, "handle_error", lambda request, address: found.tracebacks.append(
            f"socketserver: {__import__('traceback').format_exc()}"))
    yield found
    logging.getLogger().removeHandler(handler)


def _threads() -> int:
    """Threads of the process but the scheduler's pool (it grows to its bound as scheduled jobs overlap)."""
    return sum(not t.name.startswith("ThreadPoolExecutor-") for t in threading.enumerate())


def _stacks() -> str:
    frames = sys._current_frames()
    return "\n".join(f"--- {t.name}\n" + "".join(traceback.format_stack(frames[t.ident])[-4:])
                     for t in threading.enumerate() if t.ident in frames and t.name.startswith("Thread-"))


def _fd_names() -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.append(f"{fd}:{os.readlink(f'/proc/self/fd/{fd}')}")
        except OSError:
            pass
    return out


def _open_fds(*, sqlite: bool) -> int:
    """Open descriptors on the index (``sqlite``), or all others.

    SQLite keeps the descriptors of a connection closed while another holds a lock
    on the same file (POSIX locks are per process), and reuses them for the next
    connection: their number follows the peak of concurrent connections (one per
    request thread), not the number of requests.  A connection left in a reference
    cycle (a thread's locals, an exception's frames) is closed by the collector: collected first.
    """
    gc.collect()
    return sum(("index.sqlite" in name) == sqlite for name in _fd_names())


def _run(port: int, batch: list[Case], found: Findings) -> None:
    def one(case: Case) -> None:
        answer = send(port, case, HANG_S, time.monotonic, time.sleep)
        wrong = problems(case, answer, DEADLINE_S)
        with found.lock:
            found.problems += wrong
            found.statuses[answer.status or 0] = found.statuses.get(answer.status or 0, 0) + 1

    with ThreadPoolExecutor(WORKERS) as pool:  # each case's input is seeded; only their interleaving varies
        list(pool.map(one, batch))


def _served(node: Node) -> None:
    """Legitimate requests on both listeners, after the fuzz."""
    for port, req in ((node.ops_port, request("GET", "/api/v1/jobs", token=node.ops_token)),
                      (node.dicomweb_port, request("GET", "/healthz"))):
        answer = send(port, Case(-1, "legit", (req.encode(),)), HANG_S, time.monotonic, time.sleep)
        assert answer.status == 200, answer.data[:300]
    conn = http.client.HTTPConnection("127.0.0.1", node.dicomweb_port, timeout=30)
    stow = stow_request("/dicomweb/studies", node.stow_token, [CT])
    conn.request("POST", "/dicomweb/studies", body=stow.body, headers={n.decode(): v.decode() for n, v in stow.headers})
    assert conn.getresponse().status == 200
    conn.close()


@pytest.mark.parametrize("target", ["ops", "dicomweb"])
def test_hostile_requests_get_a_4xx_with_a_reason_and_leak_nothing(node: Node, findings: Findings,
                                                                      target: str) -> None:
    templates = ops_templates(node) if target == "ops" else dicomweb_templates(node)
    port = node.ops_port if target == "ops" else node.dicomweb_port
    batch = cases(templates, CASES[target], f"{SEED}-{target}", slow=templates, deadline_s=DEADLINE_S)
    started = time.monotonic()
    _run(port, batch[:WARM], findings)  # warm: what concurrent requests leave open by design is open
    threads, fds, sqlite_fds, named = _threads(), _open_fds(sqlite=False), _open_fds(sqlite=True), _fd_names()
    _run(port, batch[WARM:], findings)
    elapsed = time.monotonic() - started
    print(f"\n[{target}] {len(batch)} cases ({len(templates)} endpoints) in {elapsed:.1f} s; statuses "
          f"{dict(sorted(findings.statuses.items()))}; {findings.library_tracebacks} library tracebacks")
    assert findings.problems == [], "\n".join(findings.problems[:80])
    assert findings.tracebacks == [], "\n".join(findings.tracebacks[:5])
    try:
        wait_until(lambda: _threads() <= threads, 30, f"threads back to {threads}")
    except TimeoutError:
        pytest.fail(f"threads left: {sorted(t.name for t in threading.enumerate())[:40]}\n{_stacks()}")
    try:  # sockets, files, pipes: all closed
        wait_until(lambda: _open_fds(sqlite=False) <= fds, 30, f"open descriptors back to {fds}")
    except TimeoutError:
        pytest.fail(f"descriptors left: {sorted(set(_fd_names()) - set(named))}")
    # SQLite's: a request thread's connection holds the db, -wal and -shm descriptors, and SQLite defers closing
    # them while another connection holds a lock, so their number follows how many requests ran at once (at most
    # WORKERS, whatever the machine's load), never how many ran: a leak would grow with the 1,500 cases
    assert _open_fds(sqlite=True) <= sqlite_fds + 6 * WORKERS, "SQLite descriptors grew past the warm-up's by more " \
        "than concurrency explains"
    _served(node)


# -- what the fuzz found, one regression test each ----------------------------------------------------------


def _exchange(port: int, data: bytes, *, half_close: bool = True) -> bytes:
    answer = send(port, Case(-1, "regression", (data,), half_close=half_close), HANG_S, time.monotonic, time.sleep)
    assert answer.closed_after_s is not None, "the server kept the connection open"
    return answer.data


@pytest.mark.parametrize("target", ["ops", "dicomweb"])
def test_http09_request_lines_get_a_status_line(node: Node, findings: Findings, target: str) -> None:
    """HTTP/0.9 (no version, or HTTP/0.9) was answered without a status line, even its errors."""
    port = node.ops_port if target == "ops" else node.dicomweb_port
    too_many = b"".join(b"X-%d: v\r\n" % k for k in range(120))
    for line in (b"GET /healthz\r\n\r\n", b"GET /healthz HTTP/0.9\r\n" + too_many + b"\r\n",
                 b"GET /healthz HTTP/1.1x\r\n\r\n"):
        assert _exchange(port, line).startswith(b"HTTP/1.1 400 "), line[:30]
    assert findings.tracebacks == []


@pytest.mark.parametrize("target", ["ops", "dicomweb"])
@pytest.mark.parametrize("length", [b"\xb2", b"1\xb9", b"99999999999999999999"])
def test_a_content_length_of_other_digits_is_a_400(node: Node, findings: Findings, target: str,
                                                     length: bytes) -> None:
    """'²' passed str.isdigit() and failed int(): a traceback and no answer."""
    port, path, token = ((node.ops_port, b"/api/v1/jobs/1/retry", node.ops_token) if target == "ops"
                         else (node.dicomweb_port, b"/dicomweb/studies", node.stow_token))
    data = _exchange(port, b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + token.encode()
                     + b"\r\nContent-Type: multipart/related; boundary=b\r\nContent-Length: " + length + b"\r\n\r\n")
    assert data.startswith((b"HTTP/1.1 400 ", b"HTTP/1.1 413 ")), data[:200]
    assert findings.tracebacks == []


@pytest.mark.parametrize("job_id", ["\u00b2", "1\u00b9", "99999999999999999999999"])
def test_a_job_id_of_other_digits_or_past_sqlite_is_a_400(node: Node, findings: Findings, job_id: str) -> None:
    data = _exchange(node.ops_port, f"GET /api/v1/jobs/{job_id} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                     f"{node.ops_token}\r\n\r\n".encode("latin-1"))
    assert data.startswith(b"HTTP/1.1 400 "), data[:200]
    assert findings.tracebacks == []


def test_bodies_nested_too_deeply_or_not_utf8_are_refused_with_a_reason(node: Node, findings: Findings) -> None:
    """json.loads and PyYAML raise RecursionError (not ValueError) on deep nesting; a rules file may not be UTF-8."""
    def post(path: str, body: bytes, token: str, port: int, ctype: str = "application/json") -> bytes:
        return _exchange(port, f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: "
                         f"{ctype}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)

    deep = b"[" * 100000 + b"]" * 100000
    assert post("/api/v1/jobs/1/approve", deep, node.ops_token, node.ops_port).startswith(b"HTTP/1.1 400 ")
    for rules in (b"[" * 50000, b"\xff\xfe rules"):
        answer = post("/api/v1/routes/validate", rules, node.ops_token, node.ops_port)
        assert answer.startswith(b"HTTP/1.1 200 ") and b'"valid": false' in answer, answer[:300]
    result = stow_request("/remote/v1/jobs/1/result", node.job_token, [deep]).body.replace(
        b"application/dicom", b"application/json", 1)
    answer = post("/remote/v1/jobs/1/result", result, node.job_token, node.dicomweb_port,
                  "multipart/related; boundary=fuzz-boundary-0001")
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:300]
    assert findings.tracebacks == []


@pytest.mark.parametrize("token", ["job.\u00b2.1.mac", "job.1.\u00b9.mac"])
def test_a_job_token_of_other_digits_is_a_401(node: Node, findings: Findings, token: str) -> None:
    data = _exchange(node.dicomweb_port, f"POST /remote/v1/jobs/1/result HTTP/1.1\r\nHost: x\r\nAuthorization: "
                     f"Bearer {token}\r\nContent-Length: 0\r\n\r\n".encode("latin-1"))
    assert data.startswith(b"HTTP/1.1 401 "), data[:200]
    assert findings.tracebacks == []


@pytest.mark.parametrize("shape", ["dribble", "stalled-body"])
def test_the_ops_server_drops_a_slow_request_at_its_deadline(node: Node, findings: Findings, shape: str) -> None:
    """The ops server had no deadline at all: a slow-loris peer held a thread for ever."""
    head = f"POST /api/v1/jobs/1/retry HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {node.ops_token}\r\n".encode()
    chunks = (tuple(head[i:i + 1] for i in range(12)) if shape == "dribble"
              else (head + b"Content-Length: 1000\r\n\r\n" + b"x" * 10,))
    answer = send(node.ops_port, Case(-1, shape, chunks, pause_s=DEADLINE_S / 3, half_close=False), HANG_S,
                  time.monotonic, time.sleep)
    assert answer.closed_after_s is not None and answer.closed_after_s < 4 * DEADLINE_S + 2
    assert findings.tracebacks == []


@pytest.mark.parametrize("target", ["ops", "dicomweb"])
def test_a_client_that_resets_mid_request_leaves_no_traceback(node: Node, findings: Findings, target: str) -> None:
    """A reset read (or a write to a client gone) reached socketserver's handle_error: a traceback on stderr."""
    port = node.ops_port if target == "ops" else node.dicomweb_port
    gate = threading.Event()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # headers unfinished: the server waits in a read
        gate.wait(0.3)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
    _served(node)
    assert findings.tracebacks == []


def test_an_ops_body_shorter_than_its_content_length_is_a_400(node: Node, findings: Findings) -> None:
    """The ops server handed a truncated body to the handler (a rules file cut short could validate)."""
    rules = b"rules:\n  - name: x\n"
    data = _exchange(node.ops_port, f"POST /api/v1/routes/validate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                     f"{node.ops_token}\r\nContent-Length: {len(rules) + 100}\r\n\r\n".encode() + rules)
    assert data.startswith(b"HTTP/1.1 400 ") and b"ended before its Content-Length" in data, data[:300]
    assert findings.tracebacks == []
