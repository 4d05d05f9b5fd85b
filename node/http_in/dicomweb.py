"""The node's DICOMweb server (PS3.18): STOW-RS in, WADO-RS of spooled series, remote workers' results.

Standard library HTTP (:class:`http.server.ThreadingHTTPServer`), a listener of
its own (``dicomweb:`` in the node config), apart from the ops API: this one
faces modalities, other nodes and remote workers.  Endpoints:

=======  ===================================================  =====================================
POST     ``/dicomweb/studies``, ``/dicomweb/studies/{study}``  STOW-RS (client token, ``store``)
GET      ``/dicomweb/studies/{study}/series/{series}``         WADO-RS (client token with
                                                               ``retrieve``, or the token of the job
                                                               of that series or of its priors)
GET      ``/dicomweb/studies``, ``.../series``, ``.../metadata``,  QIDO-RS and WADO-RS for viewers
         ``.../frames/{n}``, ``.../bulkdata/{tag}`` ...         (client token with ``retrieve``;
                                                               :mod:`segnode.node.http_in.dicomweb_read`)
POST     ``/remote/v1/jobs/{job_id}/result``                   a remote worker's result (job token)
GET      ``/remote/v1/jobs/{job_id}/priors/{n}/seg|summary``   the node's earlier result on the job's
                                                               prior ``n`` (job token)
GET      ``/healthz``                                          liveness, no token
=======  ===================================================  =====================================

The same guarantees as C-STORE: a client is known by its bearer token
(compared in constant time) and must connect from one of its ``hosts``; the
declared Content-Length is checked before the body is read (no length: 411;
over ``max_body_bytes``: 413), each part against the instance cap, the number
of parts too; every stored part is synced into the spool and its index row
committed (:mod:`segnode.node.http_in.stow`, through :class:`segnode.node.ingest.store.StoreHandler`) before
the response is sent.  A request counts as one association for completion on
evidence: its series are marked released when it ends.
"""

from __future__ import annotations

import hmac
import itertools
import json
import logging
import re
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

from segnode.errors import ConfigError, InputError, SegnodeError
from segnode.node.config import NodeConfig
from segnode.node.config.dicomweb import DicomWebClient, DicomWebConfig, read_secret
from segnode.node.http_in.base import DeadlineHandler, DeadlineHTTPServer, HttpError, RunningHTTP, bearer
from segnode.node.http_in.catalogue import IndexCatalogue
from segnode.node.http_in.dicomweb_read import DicomWebReader
from segnode.node.http_in.multipart import (
    BodyTooLarge,
    ChunkedBody,
    LengthBody,
    MediaType,
    Part,
    encode_parts,
    iter_parts,
    new_boundary,
)
from segnode.node.http_in.stow import StowIngest, store_response
from segnode.node.http_in.wado import WebAnswer
from segnode.node.ingest.guards import PendingGate, PendingSlot
from segnode.node.ingest.store import StoreHandler
from segnode.storage.index import Index
from segnode.storage.spool import Spool
from segnode.uids import is_valid_uid

logger = logging.getLogger(__name__)

_STOW = re.compile(r"/dicomweb/studies(?:/(?P<study>[^/]+))?")
_WADO_SERIES = re.compile(r"/dicomweb/studies/(?P<study>[^/]+)/series/(?P<series>[^/]+)")
_RESULT = re.compile(r"/remote/v1/jobs/(?P<job_id>[0-9]{1,12})/result")
_PRIOR = re.compile(r"/remote/v1/jobs/(?P<job_id>[0-9]{1,12})/priors/(?P<number>[1-9][0-9]{0,2})/(?P<kind>seg|summary)")
DRAIN_LIMIT = 64 * 1024 * 1024  # after a refusal, read at most this much of the body so the client sees the answer


@dataclass(frozen=True)
class JobGrant:
    """What a per-job token allows: that job's series and its priors' series, and posting that attempt's result."""

    job_id: int
    attempt: int
    study_uid: str
    series_uid: str
    current: bool = True  # False: a valid token of an attempt the node no longer waits for
    priors: tuple[tuple[str, str], ...] = ()  # (study, series) of each of the job's priors (``priors_found``)

    def allows(self, study_uid: str, series_uid: str) -> bool:
        """Whether the token may fetch that series: the job's own, or one of its priors'."""
        return (study_uid, series_uid) in ((self.study_uid, self.series_uid), *self.priors)


class RemoteJobsPort(Protocol):
    """What the server needs of :class:`segnode.node.remote.jobs.RemoteJobs`."""

    def grant(self, token: str) -> JobGrant | None: ...

    def accept_result(self, grant: JobGrant, parts: Iterator[Part]) -> dict[str, Any]: ...

    def fetched(self, grant: JobGrant, worker: str | None) -> None: ...

    def prior_file(self, grant: JobGrant, number: int, kind: str) -> Path | None:
        """The SEG or summary file of the job's prior ``number`` (1-based) when it is the node's earlier result."""
        ...


class DicomWebApp:
    """Requests to actions; the socket side is :class:`_Handler`."""

    def __init__(self, config: DicomWebConfig, *, ae_title: str, handler: StoreHandler, index: Index,
                 spool: Spool, max_instance_bytes: int, remote: RemoteJobsPort | None = None,
                 reader: DicomWebReader | None = None) -> None:
        self.config = config
        self.ae_title = ae_title
        self.store_handler = handler
        self.index = index
        self.spool = spool
        self.max_part = config.max_part_bytes or max_instance_bytes
        self.remote = remote
        self._reader = reader
        self.tokens = [(client, read_secret(client.token_file, f"token of DICOMweb client {client.name}")
                        .encode("utf-8")) for client in config.clients]
        self._sessions = itertools.count(-1, -1)  # negative: never an association's id()
        self.stats_lock = threading.Lock()
        self.stats = {"stow_requests": 0, "stow_instances": 0, "stow_failed": 0, "wado_series": 0, "reads": 0,
                      "results_accepted": 0, "results_ignored": 0, "unauthorized": 0}

    @property
    def reader(self) -> DicomWebReader:
        """The QIDO-RS / WADO-RS side, over this node's index and spool (made on the first read)."""
        if self._reader is None:
            self._reader = DicomWebReader(IndexCatalogue(self.index.path, self.spool.root))
        return self._reader

    def count(self, **deltas: int) -> None:
        with self.stats_lock:
            for name, delta in deltas.items():
                self.stats[name] += delta

    # -- authentication -------------------------------------------------------------
    def client(self, authorization: str | None, host: str) -> DicomWebClient | None:
        token = bearer(authorization)
        if token is None:
            return None
        found = None
        for client, expected in self.tokens:  # every token compared: the time says nothing of which matched
            if hmac.compare_digest(token.encode("utf-8", "replace"), expected):
                found = client
        if found is not None and not found.allows(host):
            logger.warning("DICOMweb client %s refused: %s is not one of its hosts", found.name, host)
            return None
        return found

    def job_grant(self, authorization: str | None) -> JobGrant | None:
        token = bearer(authorization)
        if token is None or self.remote is None or not token.startswith("job."):
            return None
        return self.remote.grant(token)

    # -- STOW-RS ------------------------------------------------------------------------
    def stow(self, client: DicomWebClient, study_uid: str | None, content_type: str | None,
             body: LengthBody, host: str) -> tuple[HTTPStatus, dict[str, Any]]:
        if study_uid is not None and not is_valid_uid(study_uid):
            raise HttpError(HTTPStatus.BAD_REQUEST, "the study in the path is not a valid DICOM UID")
        media = MediaType.parse(content_type)
        if media.value != "multipart/related" or media.params.get("type", "application/dicom").lower() \
                != "application/dicom":
            raise HttpError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                            'send multipart/related; type="application/dicom"')
        session = next(self._sessions)
        ingest = StowIngest(self.store_handler, calling_ae=client.ae_title, called_ae=self.ae_title, host=host,
                            study_uid=study_uid, session=session, author=client.name)
        outcomes = []
        try:
            for part in iter_parts(body, media.params.get("boundary", ""),
                                   max_part_bytes=self.max_part, max_parts=self.config.max_parts):
                outcome = ingest.store(part)
                if not outcome.ok:
                    logger.warning("STOW-RS from %s: instance %s refused (0x%04X): %s", client.name,
                                   outcome.sop_instance_uid or "-", outcome.status, outcome.comment)
                outcomes.append(outcome)
        except InputError as exc:  # what was stored stays stored; the client sends it again (a duplicate)
            self.store_handler.association_ended(session, released=False)
            status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE if isinstance(exc, BodyTooLarge) else HTTPStatus.BAD_REQUEST
            raise HttpError(status, f"{exc.message} ({sum(o.ok for o in outcomes)} stored)") from exc
        self.store_handler.association_ended(session, released=True)
        stored = sum(o.ok for o in outcomes)
        self.count(stow_requests=1, stow_instances=stored, stow_failed=len(outcomes) - stored)
        logger.info("STOW-RS from %s: %d instance(s) stored, %d refused", client.name, stored, len(outcomes) - stored)
        return store_response(outcomes, None)

    # -- WADO-RS ------------------------------------------------------------------------
    def series_files(self, study_uid: str, series_uid: str) -> list[Path]:
        if not (is_valid_uid(study_uid) and is_valid_uid(series_uid)):
            raise HttpError(HTTPStatus.BAD_REQUEST, "study and series must be valid DICOM UIDs")
        info = self.index.series(series_uid)
        if info is None or info.study_uid != study_uid or info.purged_at is not None:
            raise HttpError(HTTPStatus.NOT_FOUND, "no such series on this node")
        root = self.spool.root.resolve()
        paths = [(root / rel).resolve() for rel in self.index.instance_paths(series_uid)]
        if any(root not in p.parents for p in paths):  # rows are written by the node; guard anyway
            raise HttpError(HTTPStatus.INTERNAL_SERVER_ERROR, "an instance path leaves the spool")
        self.count(wado_series=1)
        return paths


# -- HTTP ------------------------------------------------------------------------------------


class _Handler(DeadlineHandler):
    """One connection of the DICOMweb server (deadlines: :class:`segnode.node.http_in.base.DeadlineHandler`)."""

    server: DicomWebHTTPServer
    server_version = "segnode-dicomweb"
    sys_version = ""
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self._guarded(self._get)

    def do_POST(self) -> None:
        self._guarded(self._post)

    def _guarded(self, action: Callable[[str], None]) -> None:
        path = urlsplit(self.path).path
        length = self.headers.get("Content-Length", "")
        chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        declared = int(length) if length.isascii() and length.isdigit() and len(length) < 16 else 0
        self._unread = DRAIN_LIMIT if chunked else declared
        try:
            action(path)
        except HttpError as exc:
            self._refuse(exc.status, exc.message)
        except SegnodeError as exc:  # the index or the spool failed under this request
            logger.error("%s %s failed: %s", self.command, path, exc)
            self._refuse(HTTPStatus.INTERNAL_SERVER_ERROR, str(exc))

    # -- GET ------------------------------------------------------------------------------
    def _get(self, path: str) -> None:
        app = self.server.app
        if path == "/healthz":
            return self._json(HTTPStatus.OK, {"status": "ok"})
        if (prior := _PRIOR.fullmatch(path)) is not None:
            return self._prior_file(prior)
        if not path.startswith("/dicomweb/"):
            raise HttpError(HTTPStatus.NOT_FOUND, "no such endpoint")
        found = _WADO_SERIES.fullmatch(path)
        auth = self.headers.get("Authorization")
        grant = app.job_grant(auth)
        if grant is None or not found:
            return self._read(path)
        else:
            if not grant.allows(found["study"], found["series"]):
                raise HttpError(HTTPStatus.FORBIDDEN, "this job's token is for another series")
            if not grant.current:
                raise HttpError(HTTPStatus.GONE, "the node no longer waits for this attempt of the job")
            assert app.remote is not None
            app.remote.fetched(grant, self.headers.get("X-Segnode-Worker"))
        self._send_files(app.series_files(found["study"], found["series"]))

    def _prior_file(self, found: re.Match[str]) -> None:
        """A reused earlier result of the job's prior (its SEG or summary), for the job's remote worker."""
        app = self.server.app
        grant = self._job_grant(found["job_id"])
        if not grant.current:
            raise HttpError(HTTPStatus.GONE, "the node no longer waits for this attempt of the job")
        assert app.remote is not None  # a grant came from it
        path = app.remote.prior_file(grant, int(found["number"]), found["kind"])
        try:
            data = path.read_bytes() if path is not None else None
        except OSError:  # removed since (housekeeping)
            data = None
        if data is None:
            raise HttpError(HTTPStatus.NOT_FOUND, "the job has no such prior result")
        self._send_answer(WebAnswer.of(data, "application/dicom" if found["kind"] == "seg" else "application/json"))

    def _read(self, path: str) -> None:
        """QIDO-RS / WADO-RS for a client with ``retrieve`` (:mod:`segnode.node.http_in.dicomweb_read`)."""
        app = self.server.app
        client = self._client()
        if not client.retrieve:
            raise HttpError(HTTPStatus.FORBIDDEN, f"client {client.name} may not retrieve")
        answer = app.reader.get(path[len("/dicomweb"):], parse_qs(urlsplit(self.path).query, keep_blank_values=True),
                                accept=self.headers.get("Accept"), base="/dicomweb")
        app.count(reads=1, wado_series=int(bool(_WADO_SERIES.fullmatch(path))))
        self._send_answer(answer)

    def _send_answer(self, answer: WebAnswer) -> None:
        self.send_response(answer.status)
        self.send_header("Content-Type", answer.content_type)
        self.send_header("Content-Length", str(answer.length))
        for name, value in answer.headers.items():
            self.send_header(name, value)
        self.end_headers()
        for chunk in answer.chunks:
            self.wfile.write(chunk)

    def _send_files(self, paths: list[Path]) -> None:
        boundary = new_boundary()
        headers = {"Content-Type": "application/dicom"}
        sizes = [p.stat().st_size for p in paths]
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        per_part = len(f"--{boundary}\r\n{head}\r\n".encode()) + 2
        length = sum(sizes) + per_part * len(paths) + len(f"--{boundary}--\r\n")
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", f'multipart/related; type="application/dicom"; boundary={boundary}')
        self.send_header("Content-Length", str(length))
        self.end_headers()
        for chunk in encode_parts(((headers, p.read_bytes()) for p in paths), boundary):
            self.wfile.write(chunk)

    # -- POST -----------------------------------------------------------------------------
    def _post(self, path: str) -> None:
        app = self.server.app
        stow, result = _STOW.fullmatch(path), _RESULT.fullmatch(path)
        if not stow and not result:
            raise HttpError(HTTPStatus.NOT_FOUND, "no such endpoint")
        if stow:
            client = self._client()
            if not client.store:
                raise HttpError(HTTPStatus.FORBIDDEN, f"client {client.name} may not store")
            body = self._body(app.config.max_body_bytes)
            status, answer = app.stow(client, stow["study"], self.headers.get("Content-Type"), body,
                                      self.client_address[0])
            return self._json(status, answer, content_type="application/dicom+json")
        assert result is not None  # one of the two matched
        grant = self._job_grant(result["job_id"])
        body = self._body(app.config.max_result_bytes)
        media = MediaType.parse(self.headers.get("Content-Type"))
        if media.value != "multipart/related":
            raise HttpError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send the result as multipart/related")
        parts = iter_parts(body, media.params.get("boundary", ""), max_part_bytes=app.config.max_result_bytes,
                           max_parts=app.config.max_parts)
        assert app.remote is not None  # a grant came from it
        try:
            answer = app.remote.accept_result(grant, parts)
        except InputError as exc:
            raise HttpError(HTTPStatus.BAD_REQUEST, exc.message) from exc
        app.count(**{"results_accepted" if answer.get("accepted") else "results_ignored": 1})
        self._json(HTTPStatus.OK, answer)

    def _job_grant(self, job_id: str) -> JobGrant:
        """The grant of the request's job token, which must be job ``job_id``'s (else 401)."""
        grant = self.server.app.job_grant(self.headers.get("Authorization"))
        if grant is None or grant.job_id != int(job_id):
            self.server.app.count(unauthorized=1)
            raise HttpError(HTTPStatus.UNAUTHORIZED, "missing or wrong job token")
        return grant

    def _client(self) -> DicomWebClient:
        client = self.server.app.client(self.headers.get("Authorization"), self.client_address[0])
        if client is None:
            self.server.app.count(unauthorized=1)
            raise HttpError(HTTPStatus.UNAUTHORIZED, "missing or wrong token")
        return client

    def _body(self, limit: int) -> LengthBody:
        """The request body as a stream: Content-Length checked against ``limit`` before reading, chunked while."""
        if self.headers.get("Transfer-Encoding", "").strip().lower() == "chunked":
            return ChunkedBody(self.rfile, limit)
        if self.headers.get("Transfer-Encoding"):
            raise HttpError(HTTPStatus.NOT_IMPLEMENTED, "only the chunked transfer coding is accepted")
        raw = self.headers.get("Content-Length")
        if raw is None:
            raise HttpError(HTTPStatus.LENGTH_REQUIRED, "Content-Length or chunked transfer coding required")
        if not raw.isascii() or not raw.isdigit() or len(raw) > 15:  # isdigit() alone takes '²'; int() does not
            raise HttpError(HTTPStatus.BAD_REQUEST, "bad Content-Length")
        if int(raw) > limit:
            raise HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body larger than {limit} bytes")
        return LengthBody(self.rfile, int(raw))

    # -- answers ----------------------------------------------------------------------------
    def _json(self, status: HTTPStatus, body: Any, content_type: str = "application/json") -> None:
        data = json.dumps(body).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _refuse(self, status: HTTPStatus, message: str) -> None:
        """Answer first, then read (a bounded part of) an unread body, so the client sees the answer."""
        unread = self._unread  # answered first; then the client may still be sending (requests sends it all)
        self.close_connection = True
        try:
            data = json.dumps({"error": message}).encode("utf-8")
            self.send_response(status)
            if status == HTTPStatus.UNAUTHORIZED:
                self.send_header("WWW-Authenticate", 'Bearer realm="segnode-dicomweb"')
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()
            remaining = min(unread, DRAIN_LIMIT)
            while remaining > 0 and (chunk := self.rfile.read(min(remaining, 1 << 20))):
                remaining -= len(chunk)
        except OSError:  # the client went away
            pass

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.client_address[0], format % args)


#: what a connection over the caps gets before it is closed
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 5\r\nContent-Length: 0\r\n"
         b"Connection: close\r\n\r\n")


#: what socketserver hands a server for each request (a TCP server's: the connection's socket)
_Request = socket.socket | tuple[bytes, socket.socket]


def _socket_of(request: _Request) -> socket.socket:
    return request if isinstance(request, socket.socket) else request[1]


class DicomWebHTTPServer(DeadlineHTTPServer):
    """Threads per connection, capped in all and per client host (:class:`segnode.node.ingest.guards.PendingGate`)."""

    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], app: DicomWebApp) -> None:
        self.app = app
        self.header_timeout_s = app.config.header_timeout_s
        self.network_timeout_s = app.config.network_timeout_s
        self.gate = PendingGate(app.config.max_connections, app.config.max_connections_per_host, what="open")
        self._slots: dict[int, PendingSlot] = {}  # by the accepted socket's file descriptor
        super().__init__(address, _Handler)

    def verify_request(self, request: _Request, client_address: tuple[str, int]) -> bool:
        sock = _socket_of(request)
        slot = self.gate.admit(client_address[0])
        if slot is None:  # socketserver closes it: no thread
            try:
                sock.setblocking(False)
                sock.send(_BUSY)
            except OSError:
                pass
            return False
        self._slots[sock.fileno()] = slot
        return True

    def process_request(self, request: _Request, client_address: tuple[str, int]) -> None:
        try:
            super().process_request(request, client_address)
        except RuntimeError:  # "can't start new thread"
            self._release(request)
            self.shutdown_request(request)

    def process_request_thread(self, request: _Request, client_address: tuple[str, int]) -> None:
        slot = self._slots.pop(_socket_of(request).fileno(), None)
        try:
            super().process_request_thread(request, client_address)
        finally:
            if slot is not None:
                slot.release()

    def _release(self, request: _Request) -> None:
        slot = self._slots.pop(_socket_of(request).fileno(), None)
        if slot is not None:
            slot.release()


@dataclass
class RunningDicomWeb(RunningHTTP):
    """The DICOMweb server serving in a thread, with its application (counters for metrics)."""

    app: DicomWebApp


def start_dicomweb(app: DicomWebApp) -> RunningDicomWeb:
    """Listen on ``dicomweb.host:port`` in a thread."""
    config = app.config
    try:
        server = DicomWebHTTPServer((config.host, config.port), app)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {config.host}:{config.port}: {exc.strerror}", where="dicomweb") from exc
    thread = threading.Thread(target=server.serve_forever, name="segnode-dicomweb", daemon=True)
    thread.start()
    running = RunningDicomWeb(server, thread, app)
    logger.info("DICOMweb on %s (%d client(s))", running.url, len(config.clients))
    return running


def start_for_node(config: NodeConfig, handler: StoreHandler, index: Index, spool: Spool,
                   remote: RemoteJobsPort | None) -> RunningDicomWeb:
    """The node's DICOMweb server: the same store path and index as its DICOM listener."""
    app = DicomWebApp(config.dicomweb, ae_title=config.ae_title, handler=handler, index=index, spool=spool,
                      max_instance_bytes=config.limits.max_instance_bytes, remote=remote)
    return start_dicomweb(app)
