"""The DICOMweb listener's guards against hostile connections: caps on open connections, and a
deadline for a request's line and headers (a slow-loris peer cannot hold a thread)."""

from __future__ import annotations

import socket
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

from segnode.node.config.dicomweb import DicomWebConfig
from segnode.node.http_in.dicomweb import DicomWebApp, start_dicomweb

from tests.peers import wait_until


@contextmanager
def listener(**settings: object) -> Iterator[tuple[int, DicomWebApp]]:
    config = DicomWebConfig(enabled=True, port=0, **settings)  # type: ignore[arg-type]
    app = DicomWebApp(config, ae_title="SEGNODE", handler=None, index=None, spool=None,  # type: ignore[arg-type]
                      max_instance_bytes=1 << 20)
    running = start_dicomweb(app)
    try:
        yield running.port, running.server  # type: ignore[misc]
    finally:
        running.stop()


def healthz(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as resp:
        return resp.status


def closed_by_peer(sock: socket.socket) -> bytes:
    """What the server sent before closing (reads until EOF; the socket's timeout bounds each read)."""
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


def test_connections_over_the_per_host_cap_get_503_and_the_slots_come_back() -> None:
    with listener(max_connections_per_host=2, header_timeout_s=60) as (port, server):
        idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
        wait_until(lambda: server.gate.pending == 2, 10, "two connections held")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as third:
            answer = closed_by_peer(third)
        assert answer.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 5" in answer
        assert server.gate.refused == 1
        for sock in idle:
            sock.close()
        wait_until(lambda: server.gate.pending == 0, 10, "the held connections released")
        assert healthz(port) == 200


def test_a_request_dribbled_past_the_header_deadline_is_closed_and_frees_its_slot() -> None:
    with listener(header_timeout_s=0.5, network_timeout_s=60) as (port, server):
        with socket.create_connection(("127.0.0.1", port), timeout=30) as slow:
            slow.sendall(b"GET /heal")  # and nothing more: each read would wait 60 s, the whole 0.5 s
            assert closed_by_peer(slow) == b""
        wait_until(lambda: server.gate.pending == 0, 10, "the slot released")
        with socket.create_connection(("127.0.0.1", port), timeout=30) as idle:  # keep-alive idling too
            idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert closed_by_peer(idle).startswith(b"HTTP/1.1 200 ")  # answered, then closed when idle
        assert healthz(port) == 200
