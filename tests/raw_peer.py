"""A scripted DICOM peer at the byte level, for hostile and broken senders (as pynetdicom's tests/parrot.py).

Builds PDUs from parts that may be wrong on purpose (bytes where a UID or
an AE title goes), sends them on a plain socket and reads what comes back
PDU by PDU, so a test can say exactly what the receiver answered: an
A-ASSOCIATE-AC/-RJ, a C-STORE-RSP status, an A-ABORT, or a closed socket.
"""

from __future__ import annotations

import socket
import ssl
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Self

from segnode.node.dicom_in.pdu import (
    APPLICATION_CONTEXT,
    PDU_HEADER,
    PDV_HEADER,
    parse_command,
)

VERIFICATION = "1.2.840.10008.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
DEFLATED = "1.2.840.10008.1.2.1.99"

Text = str | bytes


def _b(value: Text) -> bytes:
    return value.encode("latin-1") if isinstance(value, str) else value


def item(kind: int, value: bytes) -> bytes:
    return struct.pack(">BxH", kind, len(value)) + value


def pdu(kind: int, body: bytes) -> bytes:
    return PDU_HEADER.pack(kind, len(body)) + body


def associate_rq(contexts: Sequence[tuple[int, Text, Sequence[Text]]], *, called: Text = "SEGNODE",
                 calling: Text = "SCANNER", max_pdu: int = 16384, version: int = 1,
                 application_context: Text = APPLICATION_CONTEXT) -> bytes:
    """An A-ASSOCIATE-RQ proposing ``(context ID, abstract syntax, transfer syntaxes)``."""
    body = [struct.pack(">HH", version, 0), _b(called).ljust(16, b" ")[:16], _b(calling).ljust(16, b" ")[:16],
            bytes(32), item(0x10, _b(application_context))]
    for context_id, abstract, transfers in contexts:
        sub = item(0x30, _b(abstract)) + b"".join(item(0x40, _b(ts)) for ts in transfers)
        body.append(item(0x20, bytes([context_id, 0, 0, 0]) + sub))
    user = item(0x51, struct.pack(">L", max_pdu)) + item(0x52, b"1.2.826.0.1.3680043.9.3811.0")
    body.append(item(0x50, user))
    return pdu(0x01, b"".join(body))


def _element(elem: int, value: bytes) -> bytes:
    value = value + b"\x00" if len(value) % 2 else value
    return struct.pack("<HHL", 0, elem, len(value)) + value


def command_set(field: int, message_id: int, sop_class: Text, sop_instance: Text | None = None) -> bytes:
    """A C-ECHO-RQ (no instance) or C-STORE-RQ command set, implicit VR little endian."""
    parts = [_element(0x0002, _b(sop_class)), _element(0x0100, struct.pack("<H", field)),
             _element(0x0110, struct.pack("<H", message_id))]
    if sop_instance is None:
        parts.append(_element(0x0800, struct.pack("<H", 0x0101)))
    else:
        parts += [_element(0x0700, struct.pack("<H", 0)), _element(0x0800, struct.pack("<H", 0)),
                  _element(0x1000, _b(sop_instance))]
    body = b"".join(parts)
    return _element(0x0000, struct.pack("<L", len(body))) + body


def p_data(context_id: int, control: int, data: bytes) -> bytes:
    return pdu(0x04, PDV_HEADER.pack(len(data) + 2, context_id, control) + data)


def c_echo(context_id: int, message_id: int = 1) -> bytes:
    return p_data(context_id, 0x03, command_set(0x0030, message_id, VERIFICATION))


def c_store(context_id: int, sop_class: Text, sop_instance: Text, dataset: bytes, *, message_id: int = 1,
            fragment: int = 16000) -> bytes:
    """The C-STORE-RQ command and its dataset in fragments of ``fragment`` bytes."""
    out = [p_data(context_id, 0x03, command_set(0x0001, message_id, sop_class, sop_instance))]
    pieces = [dataset[k:k + fragment] for k in range(0, len(dataset), fragment)] or [b""]
    for k, piece in enumerate(pieces):
        out.append(p_data(context_id, 0x02 if k == len(pieces) - 1 else 0x00, piece))
    return b"".join(out)


RELEASE_RQ = pdu(0x05, bytes(4))
ABORT_RQ = pdu(0x07, bytes(4))


@dataclass(frozen=True)
class Reply:
    """One PDU the receiver sent."""

    kind: int
    body: bytes

    @property
    def command(self) -> dict[int, bytes]:
        """The command set of a P-DATA-TF carrying one whole command PDV."""
        assert self.kind == 0x04, self
        return parse_command(self.body[6:])

    @property
    def status(self) -> int:
        return int.from_bytes(self.command[0x0900], "little")

    @property
    def reject_reason(self) -> tuple[int, int, int]:
        assert self.kind == 0x03, self
        return self.body[1], self.body[2], self.body[3]

    @property
    def abort_reason(self) -> tuple[int, int]:
        assert self.kind == 0x07, self
        return self.body[2], self.body[3]

    def context_results(self) -> dict[int, int]:
        """An A-ASSOCIATE-AC's result per presentation context ID."""
        assert self.kind == 0x02, self
        offset, out = 68, {}
        while offset + 4 <= len(self.body):
            kind, length = struct.unpack_from(">BxH", self.body, offset)
            if kind == 0x21:
                out[self.body[offset + 4]] = self.body[offset + 6]
            offset += 4 + length
        return out


class RawPeer:
    """A TCP connection to the receiver (over TLS with ``tls``, a client context), read PDU by PDU."""

    def __init__(self, port: int, timeout: float = 10.0, tls: ssl.SSLContext | None = None) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock = tls.wrap_socket(sock, server_hostname="localhost") if tls is not None else sock

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def half_close(self) -> None:
        """Say we have sent everything (TCP's own shutdown: over TLS, reading the answers goes on)."""
        socket.socket.shutdown(self.sock, socket.SHUT_WR)

    def _exact(self, n: int) -> bytes | None:
        data = bytearray()
        while len(data) < n:
            try:
                chunk = self.sock.recv(n - len(data))
            except ConnectionResetError:
                return None
            if not chunk:
                return None
            data += chunk
        return bytes(data)

    def read(self) -> Reply | None:
        """The next PDU, or ``None`` once the receiver has closed the connection."""
        header = self._exact(6)
        if header is None:
            return None
        kind, length = PDU_HEADER.unpack(header)
        body = self._exact(length)
        return None if body is None else Reply(kind, body)

    def replies(self) -> list[Reply]:
        """Everything until the receiver closes the connection."""
        out = []
        while (reply := self.read()) is not None:
            out.append(reply)
        return out

    def associate(self, contexts: Iterable[tuple[int, Text, Sequence[Text]]] = ((1, VERIFICATION, (IMPLICIT_LE,)),),
                  **kwargs: object) -> Reply | None:
        self.send(associate_rq(list(contexts), **kwargs))  # type: ignore[arg-type]
        return self.read()
