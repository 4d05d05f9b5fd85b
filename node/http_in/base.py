"""The HTTP base both listeners share (the ops API, the DICOMweb server): errors, requests, responses.

One :class:`HttpError` answered as ``{"error": message}`` with its status, one
:class:`Request` with bounded query parsing, and :class:`RunningHTTP` for a
server serving in a thread.  Standard library only.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

logger = logging.getLogger(__name__)

MAX_LIMIT = 1000
_LENGTH = re.compile(r"[0-9]{1,15}")  # ASCII digits only: str.isdigit() takes '²', which int() refuses


class HttpError(Exception):
    """An error answered to the client as ``{"error": message}`` with ``status``."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Response:
    status: HTTPStatus
    body: bytes
    content_type: str = "application/json"


def json_response(data: Any, status: HTTPStatus = HTTPStatus.OK) -> Response:
    return Response(status, (json.dumps(data, indent=1, default=str) + "\n").encode("utf-8"))


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    body: bytes
    client: str
    params: dict[str, str]

    def arg(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else default

    def int_arg(self, name: str, default: int, *, lo: int = 1, hi: int = MAX_LIMIT) -> int:
        raw = self.arg(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise HttpError(HTTPStatus.BAD_REQUEST, f"{name} must be an integer, not {raw!r}") from None
        if not lo <= value <= hi:
            raise HttpError(HTTPStatus.BAD_REQUEST, f"{name} must be between {lo} and {hi}")
        return value


@dataclass
class RunningHTTP:
    """An HTTP server serving in a thread (the ops API, the DICOMweb server)."""

    server: ThreadingHTTPServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    @property
    def url(self) -> str:
        host = self.server.server_address[0]
        assert isinstance(host, str)  # an IP address: the server listens on TCP
        return f"http://{'[' + host + ']' if ':' in host else host}:{self.port}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or ``None``."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def content_length(raw: str | None) -> int | None:
    """A Content-Length header's value (``None`` when absent); anything but 1–15 ASCII digits is a 400."""
    if raw is None:
        return None
    if not _LENGTH.fullmatch(raw.strip()):
        raise HttpError(HTTPStatus.BAD_REQUEST, "bad Content-Length")
    return int(raw)


def refuse_http09(handler: BaseHTTPRequestHandler) -> bool:
    """Refuse an HTTP/0.9 request line (``GET /path``, or ``HTTP/0.9``): its answers have no status line.

    Called before the request line is parsed (an error found in the headers
    would be answered the 0.9 way too); answered 400 as HTTP/1.0 and closed.
    ``True`` when refused.
    """
    raw: bytes = getattr(handler, "raw_requestline", b"")  # set by handle_one_request; not in typeshed
    words = raw.split()
    if not (len(words) == 2 or (len(words) == 3 and words[2] == b"HTTP/0.9")):
        return False
    handler.requestline = str(raw, "iso-8859-1").rstrip("\r\n")
    handler.request_version, handler.command = "HTTP/1.0", ""
    handler.close_connection = True
    handler.send_error(HTTPStatus.BAD_REQUEST, "HTTP/1.0 or later required")
    return True


class DeadlineHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server whose connections have deadlines (:class:`DeadlineHandler`)."""

    daemon_threads = True
    header_timeout_s = 10.0  # a request's line and headers, together (a slow-loris peer; an idle keep-alive)
    network_timeout_s = 60.0  # each read or write, the body's included


class DeadlineHandler(BaseHTTPRequestHandler):
    """A request handler that closes a connection whose request line and headers do not arrive in time.

    The socket timeout (``network_timeout_s``) bounds each read and write; a
    timer bounds the request line and headers together, so a peer dribbling a
    byte at a time cannot hold the thread.  A read that times out or a peer that
    goes away mid-request ends the connection quietly (logged, no traceback);
    HTTP/0.9 is refused (:func:`refuse_http09`).
    """

    server: DeadlineHTTPServer
    default_request_version = "HTTP/1.0"  # errors in a request line before its version: with a status line
    _header_timer: threading.Timer | None = None

    def setup(self) -> None:
        self.request.settimeout(self.server.network_timeout_s)
        super().setup()

    def handle_one_request(self) -> None:
        timer = threading.Timer(self.server.header_timeout_s, self._headers_overdue)
        timer.daemon = True
        self._header_timer = timer
        timer.start()
        try:
            super().handle_one_request()
        except (TimeoutError, ConnectionError) as exc:  # a body that stalls, a peer gone
            logger.info("closing HTTP connection from %s: %s", self.client_address[0], str(exc) or type(exc).__name__)
            self.close_connection = True
        finally:
            timer.cancel()

    def parse_request(self) -> bool:
        parsed = not refuse_http09(self) and super().parse_request()
        if self._header_timer is not None:
            self._header_timer.cancel()  # the headers are in: the body has the socket timeout
        return parsed

    def _headers_overdue(self) -> None:
        logger.info("closing HTTP connection from %s: no complete request headers within %g s",
                    self.client_address[0], self.server.header_timeout_s)
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)  # the blocked read returns: the handler ends
        except OSError:
            pass
