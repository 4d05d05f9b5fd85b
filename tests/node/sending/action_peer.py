"""A scripted PACS at the byte level (no pynetdicom): it stores CT and answers each N-ACTION with a chosen status.

Built from the node's own PDU codec (:mod:`segnode.node.dicom_in.pdu`): it
accepts CT Image Storage and the Storage Commitment Push Model, answers every
C-STORE-RQ with success and the n-th N-ACTION-RQ with ``answers[n]`` (status,
Error Comment), and records what it was asked.  It never sends an
N-EVENT-REPORT: a commitment it accepts stays waiting.
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass, field
from io import BytesIO
from types import TracebackType
from typing import Self

from pydicom import Dataset
from pydicom.filereader import read_dataset
from segnode.node.commitment import STORAGE_COMMITMENT
from segnode.node.dicom_in.pdu import (
    PDU_HEADER,
    PDV_HEADER,
    RELEASE_RP_PDU,
    encode_associate_ac,
    encode_response,
    negotiate,
    p_data,
    parse_associate_rq,
    parse_command,
    us,
)

CT = "1.2.840.10008.5.1.4.1.1.2"
IMPLICIT_LE, EXPLICIT_LE = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1"
C_STORE_RQ, N_ACTION_RQ = 0x0001, 0x0130
NO_DATASET = 0x0101


@dataclass
class ActionPeer:
    """The scripted PACS; ``answers``: one (status, Error Comment) per N-ACTION, in order (then success)."""

    answers: list[tuple[int, str | None]]
    stored: list[str] = field(default_factory=list)  # Affected SOP Instance UIDs of the C-STOREs
    actions: list[Dataset] = field(default_factory=list)  # each N-ACTION's Action Information
    associations: int = 0

    def __post_init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.getsockname()[1])

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._server.shutdown(socket.SHUT_RDWR)  # wakes the accept() waiting on its thread
        self._server.close()
        self._thread.join(5)
        assert not self._thread.is_alive(), "the scripted PACS did not stop"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:  # closed by __exit__
                return
            with conn:
                conn.settimeout(10)
                self.associations += 1
                try:
                    self._association(conn)
                except OSError:  # the node aborted or closed: the next association is served
                    pass

    def _association(self, conn: socket.socket) -> None:
        kind, body = _read_pdu(conn)
        request = parse_associate_rq(body)
        results = negotiate(request.contexts, {CT: (EXPLICIT_LE, IMPLICIT_LE),
                                               STORAGE_COMMITMENT: (EXPLICIT_LE, IMPLICIT_LE)})
        syntaxes = {r.context_id: r.transfer_syntax for r in results}
        conn.sendall(encode_associate_ac(request, results, 16384))
        command, data = bytearray(), bytearray()
        while True:
            kind, body = _read_pdu(conn)
            if kind != 0x04:  # A-RELEASE-RQ (answered with A-RELEASE-RP) or an A-ABORT: the association ends
                if kind == 0x05:
                    conn.sendall(RELEASE_RP_PDU)
                return
            for context_id, control, fragment in _pdvs(body):
                (command if control & 0x01 else data).extend(fragment)
                if control & 0x02 and self._complete(conn, context_id, syntaxes[context_id], command, data):
                    command, data = bytearray(), bytearray()

    def _complete(self, conn: socket.socket, context_id: int, syntax: str, command: bytearray,
                  data: bytearray) -> bool:
        """Answer a message once its command (and its dataset, when it has one) is whole."""
        elements = parse_command(command)
        if us(elements.get(0x0800)) != NO_DATASET and not data:
            return False  # the command is whole; its dataset follows
        field_, message_id = us(elements.get(0x0100)), us(elements.get(0x0110)) or 0
        if field_ == C_STORE_RQ:
            self.stored.append(elements[0x1000].rstrip(b"\x00 ").decode())
            answer = encode_response(0x8001, message_id, elements[0x0002], 0x0000,
                                     sop_instance=elements[0x1000])
        else:
            assert field_ == N_ACTION_RQ, field_
            self.actions.append(read_dataset(BytesIO(bytes(data)), syntax == IMPLICIT_LE, True))
            status, comment = self.answers.pop(0) if self.answers else (0x0000, None)
            answer = encode_response(0x8130, message_id, elements[0x0003], status, comment,
                                     sop_instance=elements[0x1001])
        conn.sendall(p_data(context_id, answer))
        return True


def _read_pdu(conn: socket.socket) -> tuple[int, bytes]:
    kind, length = PDU_HEADER.unpack(_exact(conn, PDU_HEADER.size))
    return kind, _exact(conn, length)


def _exact(conn: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = conn.recv(n - len(out))
        if not chunk:
            raise ConnectionError("the node closed the connection")
        out.extend(chunk)
    return bytes(out)


def _pdvs(body: bytes) -> list[tuple[int, int, bytes]]:
    """(context ID, control header, fragment) of each PDV of a P-DATA-TF."""
    out, offset = [], 0
    while offset < len(body):
        length, context_id, control = PDV_HEADER.unpack_from(body, offset)
        out.append((context_id, control, body[offset + 6:offset + 4 + length]))
        offset += 4 + length
    return out

