"""The HTTP base both listeners share (the ops API, the DICOMweb server): errors, requests, responses.

One :class:`HttpError` answered as ``{"error": message}`` with its status, one
:class:`Request` with bounded query parsing, and :class:`RunningHTTP` for a
server serving in a thread.  Standard library only.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from http import HTTPStatus
from http.server import ThreadingHTTPServer
from typing import Any

MAX_LIMIT = 1000


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
