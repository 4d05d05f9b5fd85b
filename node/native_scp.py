"""A native DICOM upper layer (PS3.8) for the storage hot path: C-ECHO and C-STORE over plain TCP.

The default receiver (``limits.receiver: native``; :func:`node.scp.start_scp` picks it;
with TLS configured the pynetdicom receiver serves instead).  pynetdicom's
DUL/DIMSE machinery (a DUL thread, an association thread, queues and a state
machine per association) caps one association at ~300–430 images/s even when
nothing is stored (measured on 2 cores: 308/s with a no-op handler); here one thread per connection reads PDUs
and answers them in line:

* A-ASSOCIATE-RQ → the same checks, in the same order and with the same
  reasons, as :mod:`node.scp` (allow-list by calling AE and host, called AE,
  ``max_associations``), the same presentation contexts (SOP classes and
  :data:`node.scp.TRANSFER_SYNTAXES`), our maximum PDU length capped as
  there → A-ASSOCIATE-AC or -RJ;
* P-DATA-TF → command fragments are collected (they are small); dataset
  fragments are received with ``recv_into`` straight into one buffer per
  connection (no reassembly copy; past :data:`SPILL_BYTES` the buffer is a
  mapping of an unnamed file in the spool's ``tmp/``, so a large multi-frame
  instance does not hold its size in RAM), and the complete dataset goes to
  :meth:`node.scp.StoreHandler.store`, the one persistence path both
  receivers share (UID checks, size and free-disk limits, self-checked Part 10
  file, overlapped syncs, index row, duplicate policy, events);
* C-STORE-RSP / C-ECHO-RSP with the status it returns; A-RELEASE-RQ →
  A-RELEASE-RP; an A-ABORT, a malformed or oversized PDU, or a timeout
  (``acse_timeout_s`` for the request, ``network_timeout_s`` when idle) closes
  the connection, and a dataset not yet complete is dropped from memory:
  nothing partial is ever written.

For the node's metrics the server offers pynetdicom's ``bind(event, handler)``
for ``EVT_ACCEPTED``, ``EVT_REJECTED`` and ``EVT_DIMSE_SENT`` (C-STORE
responses), called with the attributes those handlers read.
"""

from __future__ import annotations

import logging
import mmap
import os
import socket
import struct
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, BinaryIO

from pydicom.dataset import Dataset
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, evt
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.presentation import DEFAULT_TRANSFER_SYNTAXES
from pynetdicom.sop_class import Verification

from segnode.node.config import NodeConfig
from segnode.node.scp import CT_FAMILY, MAX_CONTROL_PDU, TRANSFER_SYNTAXES, RunningSCP, StoreHandler, StoreRequest

logger = logging.getLogger(__name__)

APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"
ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ, P_DATA, RELEASE_RQ, RELEASE_RP, ABORT = range(1, 8)
C_STORE_RQ, C_ECHO_RQ = 0x0001, 0x0030
NO_DATASET = 0x0101

#: (result, source, reason) of the A-ASSOCIATE-RJs, as node/scp.py and pynetdicom send them.
REJECT_SENDER = (0x01, 0x01, 0x03)
REJECT_CALLED_AE = (0x01, 0x01, 0x07)
REJECT_BUSY = (0x02, 0x03, 0x02)

_PDU = struct.Struct(">BxL")
_PDV = struct.Struct(">LBB")
_ITEM = struct.Struct(">BxH")
_ELEMENT = struct.Struct("<HHL")
_LISTEN_POLL_S = 0.2
#: datasets up to this size are received in memory; larger ones into a file mapping
SPILL_BYTES = 64 << 20


class DatasetBuffer:
    """Where one connection's dataset fragments land, grown as a dataset needs.

    In memory up to :data:`SPILL_BYTES`; beyond that in a shared mapping of
    an unnamed file in ``spill_dir`` (allocated up front, so a full disk is an
    error here, not a SIGBUS later), whose pages the kernel may write out and
    reclaim.  :meth:`release` drops the mapping after a large dataset.
    """

    def __init__(self, spill_dir: os.PathLike[str] | str) -> None:
        self.spill_dir = spill_dir
        self.memory = bytearray(1 << 20)
        self.mapping: mmap.mmap | None = None
        self._file: BinaryIO | None = None

    @property
    def spilled(self) -> bool:
        return self.mapping is not None

    def view(self) -> memoryview:
        return memoryview(self.mapping if self.mapping is not None else self.memory)

    def reserve(self, end: int, filled: int) -> None:
        """Room for ``end`` bytes, keeping the first ``filled``."""
        current = self.mapping if self.mapping is not None else self.memory
        if end <= len(current):
            return
        size = max(end, 2 * len(current))
        if size > SPILL_BYTES:
            try:
                self._spill(size, filled)
                return
            except OSError as exc:  # e.g. no room on the spool's disk: receive in memory, as before
                logger.warning("cannot buffer a %d-byte dataset on disk (%s); receiving it in memory", size, exc)
        grown = bytearray(size)
        grown[:filled] = current[:filled]
        self.release()
        self.memory = grown

    def _spill(self, size: int, filled: int) -> None:
        if self.mapping is not None and self._file is not None:
            os.posix_fallocate(self._file.fileno(), 0, size)
            self.mapping.resize(size)
            return
        spill = tempfile.TemporaryFile(dir=self.spill_dir)  # unnamed: gone with the process
        try:
            os.posix_fallocate(spill.fileno(), 0, size)
            mapping = mmap.mmap(spill.fileno(), size)
        except OSError:
            spill.close()
            raise
        mapping[:filled] = memoryview(self.memory)[:filled]
        self.mapping, self._file = mapping, spill
        self.memory = bytearray(1 << 20)

    def release(self) -> None:
        """Drop the file mapping, if any (the next dataset starts in memory)."""
        if self.mapping is not None:
            try:
                self.mapping.close()
            except BufferError:  # a view outlives us (an exception's traceback): collected with it
                pass
            if self._file is not None:
                self._file.close()
            self.mapping = self._file = None


class ProtocolError(Exception):
    """The peer broke PS3.8 (or a limit); the connection is aborted."""


class PeerGone(Exception):
    """The peer closed the connection, aborted, or stayed silent past a timeout."""


# -- PDU encoding and decoding ------------------------------------------------------------


def _item(kind: int, value: bytes) -> bytes:
    return _ITEM.pack(kind, len(value)) + value


def _uid(value: bytes) -> str:
    return value.rstrip(b"\x00 ").decode("ascii", "replace")


@dataclass
class AssociateRequest:
    """The parts of an A-ASSOCIATE-RQ this node acts on."""

    called_ae: str
    calling_ae: str
    contexts: list[tuple[int, str, list[str]]]  # (context ID, abstract syntax, transfer syntaxes)
    raw_called: bytes
    raw_calling: bytes


def parse_associate_rq(body: bytes) -> AssociateRequest:
    """Decode an A-ASSOCIATE-RQ's body (PS3.8 9.3.2); raises :class:`ProtocolError`."""
    if len(body) < 68:
        raise ProtocolError("A-ASSOCIATE-RQ too short")
    raw_called, raw_calling = body[4:20], body[20:36]
    contexts: list[tuple[int, str, list[str]]] = []
    for kind, value in _items(body, 68):
        if kind == 0x20:
            contexts.append(_parse_context(value))
    called, calling = (raw.decode("ascii", "replace").strip() for raw in (raw_called, raw_calling))
    return AssociateRequest(called, calling, contexts, raw_called, raw_calling)


def _items(data: bytes, offset: int) -> list[tuple[int, bytes]]:
    out = []
    while offset < len(data):
        if offset + 4 > len(data):
            raise ProtocolError("truncated item")
        kind, length = _ITEM.unpack_from(data, offset)
        if offset + 4 + length > len(data):
            raise ProtocolError(f"item 0x{kind:02x} longer than its PDU")
        out.append((kind, data[offset + 4:offset + 4 + length]))
        offset += 4 + length
    return out


def _parse_context(value: bytes) -> tuple[int, str, list[str]]:
    if len(value) < 4:
        raise ProtocolError("presentation context item too short")
    abstract, transfers = "", []
    for kind, sub in _items(value, 4):
        if kind == 0x30:
            abstract = _uid(sub)
        elif kind == 0x40:
            transfers.append(_uid(sub))
    return value[0], abstract, transfers


def negotiate(contexts: list[tuple[int, str, list[str]]],
              supported: dict[str, tuple[str, ...]]) -> list[tuple[int, int, str]]:
    """``(context ID, result, transfer syntax)`` per proposed context, as pynetdicom's acceptor decides.

    Result 0 accepts the first proposed transfer syntax we support, 3 refuses
    an abstract syntax we do not support, 4 one with no transfer syntax we do.
    """
    results = []
    for context_id, abstract, transfers in contexts:
        ours = supported.get(abstract)
        chosen = next((ts for ts in transfers if ours is not None and ts in ours), None)
        if ours is None:
            results.append((context_id, 3, transfers[0] if transfers else ""))
        elif chosen is None:
            results.append((context_id, 4, transfers[0] if transfers else ""))
        else:
            results.append((context_id, 0, chosen))
    return results


def encode_associate_ac(request: AssociateRequest, results: list[tuple[int, int, str]], max_pdu: int) -> bytes:
    """A-ASSOCIATE-AC (PS3.8 9.3.3): the request's AE fields, context results, our user information."""
    body = [struct.pack(">HH", 1, 0), request.raw_called, request.raw_calling, bytes(32),
            _item(0x10, APPLICATION_CONTEXT)]
    for context_id, result, syntax in results:
        body.append(_item(0x21, bytes([context_id, 0, result, 0]) + _item(0x40, syntax.encode("ascii"))))
    user = (_item(0x51, struct.pack(">L", max_pdu)),
            _item(0x52, str(PYNETDICOM_IMPLEMENTATION_UID).encode("ascii")),
            _item(0x55, PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii")))
    body.append(_item(0x50, b"".join(user)))
    payload = b"".join(body)
    return _PDU.pack(ASSOCIATE_AC, len(payload)) + payload


def encode_associate_rj(result: int, source: int, reason: int) -> bytes:
    return _PDU.pack(ASSOCIATE_RJ, 4) + bytes([0, result, source, reason])


RELEASE_RP_PDU = _PDU.pack(RELEASE_RP, 4) + bytes(4)
ABORT_PDU = _PDU.pack(ABORT, 4) + bytes([0, 0, 2, 0])  # source: service provider, reason not specified


# -- DIMSE command sets (implicit VR little endian, group 0000) ---------------------------------


def parse_command(data: bytes | bytearray) -> dict[int, bytes]:
    """The elements of a command set, by element number (group 0000 only)."""
    out, offset = {}, 0
    while offset + 8 <= len(data):
        group, elem, length = _ELEMENT.unpack_from(data, offset)
        offset += 8
        if group != 0 or offset + length > len(data):
            raise ProtocolError("malformed command set")
        out[elem] = bytes(data[offset:offset + length])
        offset += length
    return out


def _us(value: bytes | None) -> int | None:
    return int.from_bytes(value[:2], "little") if value is not None and len(value) >= 2 else None


def _element(elem: int, value: bytes) -> bytes:
    return _ELEMENT.pack(0, elem, len(value)) + value


def encode_response(command_field: int, message_id: int, sop_class: bytes, status: int,
                    comment: str | None = None, sop_instance: bytes | None = None) -> bytes:
    """A C-STORE-RSP / C-ECHO-RSP command set, elements in tag order, with its group length."""
    def pad(value: bytes) -> bytes:
        return value + b"\x00" if len(value) % 2 else value

    elements = [_element(0x0002, pad(sop_class)), _element(0x0100, struct.pack("<H", command_field)),
                _element(0x0120, struct.pack("<H", message_id)), _element(0x0800, struct.pack("<H", NO_DATASET)),
                _element(0x0900, struct.pack("<H", status))]
    if comment:
        raw = comment.encode("ascii", "replace")[:64]
        elements.append(_element(0x0902, raw + b" " if len(raw) % 2 else raw))
    if sop_instance is not None:
        elements.append(_element(0x1000, pad(sop_instance)))
    body = b"".join(elements)
    return _element(0x0000, struct.pack("<L", len(body))) + body


def p_data(context_id: int, command: bytes) -> bytes:
    """One P-DATA-TF carrying a whole command set as its last fragment."""
    pdv = _PDV.pack(len(command) + 2, context_id, 0x03) + command
    return _PDU.pack(P_DATA, len(pdv)) + pdv


# -- one association ---------------------------------------------------------------------------


class _Connection:
    """One accepted connection, served on its own thread from request to release."""

    def __init__(self, server: NativeServer, sock: socket.socket, host: str) -> None:
        self.server, self.sock, self.host = server, sock, host
        self.limits = server.config.limits
        self.header = bytearray(6)
        self.data = DatasetBuffer(server.handler.spool.tmp)  # reused by the connection's datasets
        self.filled = 0
        self.command = bytearray()
        self.contexts: dict[int, tuple[str, str]] = {}  # accepted: context ID -> (abstract, transfer syntax)
        self.calling_ae = ""
        self.pending: dict[int, bytes] | None = None  # command awaiting its dataset
        self.pending_context = 0
        self.entered = False  # counted in the server's open associations

    # -- reading ----------------------------------------------------------------------
    def _recv_into(self, view: memoryview) -> None:
        got, want, sock = 0, len(view), self.sock
        try:
            while got < want:
                n = sock.recv_into(view[got:], want - got)
                if not n:
                    raise PeerGone("connection closed by peer")
                got += n
        except TimeoutError as exc:
            raise PeerGone("timed out") from exc

    def _read_pdu_header(self) -> tuple[int, int]:
        self._recv_into(memoryview(self.header))
        kind, length = _PDU.unpack(self.header)
        return kind, length

    def _read_body(self, length: int) -> bytearray:
        if length > MAX_CONTROL_PDU:
            raise ProtocolError(f"peer declared a {length}-byte PDU (limit {MAX_CONTROL_PDU})")
        body = bytearray(length)
        self._recv_into(memoryview(body))
        return body

    def _send(self, data: bytes) -> None:
        self.sock.sendall(data)

    # -- the association ----------------------------------------------------------------
    def serve(self) -> None:
        try:
            self.sock.settimeout(self.limits.acse_timeout_s)
            if not self._associate():
                return
            self.sock.settimeout(self.limits.network_timeout_s)
            self._serve_messages()
        except ProtocolError as exc:
            logger.warning("aborting association from %s: %s", self.host, exc)
            self._abort()
        except PeerGone as exc:
            logger.info("association from %s ended: %s", self.host, exc)
            if str(exc) == "timed out":
                self._abort()
        except OSError as exc:
            logger.info("association from %s ended: %s", self.host, exc)
        finally:
            self.data.release()

    def _abort(self) -> None:
        try:
            self._send(ABORT_PDU)
        except OSError:
            pass

    def _associate(self) -> bool:
        kind, length = self._read_pdu_header()
        if kind != ASSOCIATE_RQ:
            raise ProtocolError(f"expected A-ASSOCIATE-RQ, got PDU type 0x{kind:02x}")
        request = parse_associate_rq(self._read_body(length))
        self.calling_ae = request.calling_ae
        server = self.server
        if not server.handler.admit(request.calling_ae, self.host):
            self._send(encode_associate_rj(*REJECT_SENDER))
            return False
        reason = None
        if request.called_ae != server.config.ae_title.strip():
            reason = REJECT_CALLED_AE
        elif not server.enter():
            reason = REJECT_BUSY
        if reason is not None:
            logger.info("rejecting association from %r at %s: %s", request.calling_ae, self.host, reason)
            self._send(encode_associate_rj(*reason))
            server.fire_rejected(reason)
            return False
        self.entered = True
        results = negotiate(request.contexts, server.supported)
        self.contexts = {cid: (request_abstract, ts) for (cid, result, ts), (_, request_abstract, _)
                         in zip(results, request.contexts) if result == 0}
        self._send(encode_associate_ac(request, results, self.limits.max_pdu_bytes))
        server.fire(evt.EVT_ACCEPTED, SimpleNamespace(assoc=SimpleNamespace(is_acceptor=True)))
        return True

    def _serve_messages(self) -> None:
        limit = self.limits.max_pdu_bytes + 6
        while True:
            kind, length = self._read_pdu_header()
            if kind == P_DATA:
                if length > limit:
                    raise ProtocolError(f"peer declared a {length}-byte PDU (limit {limit})")
                self._read_pdvs(length)
            elif kind == RELEASE_RQ:
                self._read_body(length)
                self._send(RELEASE_RP_PDU)
                return
            elif kind == ABORT:
                self._read_body(length)
                raise PeerGone("aborted by peer")
            else:
                raise ProtocolError(f"unexpected PDU type 0x{kind:02x}")

    def _read_pdvs(self, length: int) -> None:
        header = memoryview(self.header)
        while length > 0:
            if length < 6:
                raise ProtocolError("truncated PDV")
            self._recv_into(header)
            item_length, context_id, control = _PDV.unpack(self.header)
            size = item_length - 2
            if item_length < 2 or 4 + item_length > length:
                raise ProtocolError("PDV longer than its PDU")
            length -= 4 + item_length
            if context_id not in self.contexts:
                raise ProtocolError(f"PDV on presentation context {context_id}, not accepted")
            if control & 0x01:
                self._read_command(context_id, size, control & 0x02)
            else:
                self._read_dataset(context_id, size, control & 0x02)

    def _read_command(self, context_id: int, size: int, last: int) -> None:
        if len(self.command) + size > MAX_CONTROL_PDU or self.pending is not None:
            raise ProtocolError("command set where a dataset was expected, or too long")
        start = len(self.command)
        self.command.extend(bytes(size))
        self._recv_into(memoryview(self.command)[start:])
        if last:
            command, self.command = parse_command(self.command), bytearray()
            self._on_command(context_id, command)

    def _read_dataset(self, context_id: int, size: int, last: int) -> None:
        if self.pending is None or context_id != self.pending_context:
            raise ProtocolError("dataset fragment without its C-STORE-RQ")
        end = self.filled + size
        if end > self.limits.max_instance_bytes:
            raise ProtocolError(f"dataset larger than {self.limits.max_instance_bytes} bytes")
        self.data.reserve(end, self.filled)
        with self.data.view() as buffer:
            self._recv_into(buffer[self.filled:end])
        self.filled = end
        if last:
            command, self.pending = self.pending, None
            self._store(context_id, command)

    def _on_command(self, context_id: int, command: dict[int, bytes]) -> None:
        field_ = _us(command.get(0x0100))
        message_id = _us(command.get(0x0110))
        if message_id is None:
            raise ProtocolError("command without a Message ID")
        if field_ == C_ECHO_RQ:
            rsp = encode_response(0x8030, message_id, command.get(0x0002, str(Verification).encode()), 0x0000)
            self._send(p_data(context_id, rsp))
        elif field_ == C_STORE_RQ and _us(command.get(0x0800)) != NO_DATASET:
            self.pending, self.pending_context, self.filled = command, context_id, 0
        else:
            raise ProtocolError(f"unsupported DIMSE command 0x{field_ or 0:04x}")

    def _store(self, context_id: int, command: dict[int, bytes]) -> None:
        abstract, transfer_syntax = self.contexts[context_id]
        sop_class = command.get(0x0002, b"")
        sop_instance = command.get(0x1000, b"")
        request = StoreRequest(_uid(sop_class) or abstract, _uid(sop_instance), transfer_syntax,
                               self.calling_ae, self.server.config.ae_title, self.host)
        with self.data.view() as buffer, buffer[:self.filled] as dataset:
            status, comment = self.server.handler.store(request, dataset)
        self.filled = 0
        self.data.release()
        rsp = encode_response(0x8001, _us(command.get(0x0110)) or 0, sop_class, status, comment, sop_instance)
        self._send(p_data(context_id, rsp))
        self.server.fire_store_rsp(status, comment)



# -- the server -------------------------------------------------------------------------------


Handler = Callable[..., Any]


class NativeServer:
    """Accepts connections and serves each on its own thread; pynetdicom-style ``bind`` for metrics."""

    def __init__(self, config: NodeConfig, handler: StoreHandler, *, reuse_port: bool = False) -> None:
        self.config = config
        self.handler = handler
        self.supported: dict[str, tuple[str, ...]] = {
            str(uid): TRANSFER_SYNTAXES for uid in dict.fromkeys((*CT_FAMILY, *config.storage_classes))}
        self.supported[str(Verification)] = tuple(DEFAULT_TRANSFER_SYNTAXES)
        self._handlers: dict[evt.EventType, list[tuple[Handler, list[Any] | None]]] = {}
        self._active = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._connections: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:  # receiver processes share the port (node/receivers.py)
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self.socket.bind((config.host, config.port))
        self.socket.listen(64)
        self.socket.settimeout(_LISTEN_POLL_S)
        self.server_address = self.socket.getsockname()

    # -- events (the subset of pynetdicom's the node binds) --------------------------------------
    def bind(self, event: evt.EventType, handler: Handler, args: list[Any] | None = None) -> None:
        self._handlers.setdefault(event, []).append((handler, args))

    def fire(self, event: evt.EventType, payload: Any) -> None:
        for handler, args in list(self._handlers.get(event, [])):
            try:
                handler(payload, *(args or []))
            except Exception:  # boundary: a metrics handler must not end an association
                logger.exception("event handler for %s failed", event.name)

    def fire_rejected(self, reason: tuple[int, int, int]) -> None:
        primitive = SimpleNamespace(result=reason[0], result_source=reason[1], diagnostic=reason[2])
        self.fire(evt.EVT_REJECTED, SimpleNamespace(
            assoc=SimpleNamespace(is_acceptor=True, acceptor=SimpleNamespace(primitive=primitive))))

    def fire_store_rsp(self, status: int, comment: str | None) -> None:
        if not self._handlers.get(evt.EVT_DIMSE_SENT):
            return
        # a real C_STORE_RSP without its constructor (0.1 ms: a full command set); handlers read command_set only
        rsp = C_STORE_RSP.__new__(C_STORE_RSP)
        rsp.command_set = Dataset()
        rsp.command_set.Status = status
        if comment is not None:
            rsp.command_set.ErrorComment = comment
        self.fire(evt.EVT_DIMSE_SENT, SimpleNamespace(message=rsp, assoc=SimpleNamespace(is_acceptor=True)))

    # -- associations ---------------------------------------------------------------------------
    def enter(self) -> bool:
        """Count one more association, unless ``max_associations`` are already open."""
        with self._lock:
            if self._active >= self.config.limits.max_associations:
                return False
            self._active += 1
            return True

    def serve_forever(self) -> None:
        while not self._stopping.is_set():
            try:
                client, address = self.socket.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stopping.is_set():
                    return
                raise
            client.settimeout(None)
            # small C-STORE responses must not wait for the peer's delayed ACK (Nagle)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            thread = threading.Thread(target=self._serve, args=(client, address[0]),
                                      name="segnode-native-assoc", daemon=True)
            with self._lock:
                self._connections.add(client)
                self._threads.add(thread)
            thread.start()

    def _serve(self, client: socket.socket, host: str) -> None:
        conn = _Connection(self, client, host)
        try:
            conn.serve()
        finally:
            with self._lock:
                if conn.entered:
                    self._active -= 1
                self._connections.discard(client)
                self._threads.discard(threading.current_thread())
            client.close()

    def shutdown(self) -> None:
        """Stop accepting, close open connections, wait for their threads."""
        self._stopping.set()
        self.socket.close()
        with self._lock:
            connections, threads = list(self._connections), list(self._threads)
        for client in connections:
            try:
                client.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in threads:
            thread.join(timeout=5)


def start_native_scp(config: NodeConfig, handler: StoreHandler, *, reuse_port: bool = False) -> RunningSCP:
    """Listen on ``config.host:config.port`` with the native receiver, in a background thread."""
    server = NativeServer(config, handler, reuse_port=reuse_port)
    thread = threading.Thread(target=server.serve_forever, name="segnode-native-scp", daemon=True)
    thread.start()
    logger.info("SCP %s listening on %s:%d (native receiver)", config.ae_title, config.host,
                server.server_address[1])
    return RunningSCP(server, handler, thread)
