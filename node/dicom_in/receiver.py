"""The node's DICOM receiver (PS3.8 upper layer): C-ECHO and C-STORE, over TCP or TLS.

pynetdicom's DUL/DIMSE machinery (a DUL thread, an association thread, queues
and a state machine per association) caps one association at ~300–430
images/s even when nothing is stored (measured on 2 cores: 308/s with a
no-op handler); here one thread per connection reads PDUs and answers them in
line:

* with ``tls:`` configured, the TLS handshake first, on the connection's own
  thread (never the accept loop's), bounded by ``tls.handshake_timeout_s`` and
  by the association deadline (``acse_timeout_s`` from ``accept()``); TLS 1.2
  or later, our certificate and key, and with ``tls.client_ca`` a client
  certificate signed by it is required (:func:`segnode.node.dicom_in.server.server_ssl_context`);
* A-ASSOCIATE-RQ → decoded and checked by :mod:`segnode.node.dicom_in.pdu` (protocol
  version, AE-title and UID grammar, application context, odd unique context
  IDs), then the allow-list by calling AE and host, the called AE,
  ``max_associations``, the presentation contexts (SOP classes and
  :data:`segnode.node.ingest.store.TRANSFER_SYNTAXES`) → A-ASSOCIATE-AC (with
  segnode's Implementation Class UID and Version Name) or -RJ with its reason;
* P-DATA-TF → command fragments are collected (they are small); dataset
  fragments are received with ``recv_into`` straight into one buffer per
  connection, allocated with its first dataset (no reassembly copy; past
  :data:`SPILL_BYTES` the buffer is a mapping of an unnamed file in the
  spool's ``tmp/``, so a large multi-frame instance does not hold its size in
  RAM), and the complete dataset goes to
  :meth:`segnode.node.ingest.store.StoreHandler.store`, the store path every
  receiver shares (UID and SOP class checks, size, inflated-size and free-disk
  limits, self-checked Part 10 file, overlapped syncs, index row, duplicate
  policy, events);
* from a destination the node asks for Storage Commitment (``commit: true``;
  by calling AE title, after the allow-list), the Storage Commitment Push
  Model context too, with the SCP role it proposes by role selection
  answered; its N-EVENT-REPORT-RQ (the report of a commitment the node asked
  for) goes to the hub's :class:`~segnode.node.commitment.CommitmentBook` and
  is answered with the N-EVENT-REPORT-RSP status it returns (an unknown
  Transaction UID or a broken report: a named failure status, never an abort);
* C-STORE-RSP / C-ECHO-RSP with the status it returns; A-RELEASE-RQ →
  A-RELEASE-RP; an A-ABORT, a malformed or oversized PDU, or a missed
  deadline (handshake and the whole A-ASSOCIATE-RQ within ``acse_timeout_s`` of
  ``accept()``, each later PDU within ``network_timeout_s``) closes the
  connection (with an A-ABORT giving the reason), and a dataset not yet
  complete is dropped from memory: nothing partial is ever written; an
  internal error aborts that association and is logged with its traceback.

The accept loop never ends on an error (:mod:`segnode.node.ingest.guards`: logged, counted,
backed off, visible in ``/readyz``), and connections not yet associated (in
their TLS handshake included) are capped in all and per host before a thread
is started for them.

Association outcomes are emitted as typed events
(:class:`~segnode.node.events.AssociationAccepted`,
:class:`~segnode.node.events.AssociationRejected` with its reason) into the
store handler's sink, beside the instance events the store path emits.
"""

from __future__ import annotations

import logging
import mmap
import os
import socket
import ssl
import tempfile
import threading
import time
from typing import BinaryIO

from pynetdicom.presentation import DEFAULT_TRANSFER_SYNTAXES
from segnode.node.commitment import STORAGE_COMMITMENT, CommitmentBook
from segnode.node.commitment import TRANSFER_SYNTAXES as COMMITMENT_SYNTAXES
from segnode.node.config import NodeConfig
from segnode.node.dicom_in.pdu import (
    ABORT,
    ABORT_NOT_SPECIFIED,
    ABORT_UNEXPECTED_PDU,
    ABORT_UNRECOGNISED_PDU,
    ACCEPTANCE,
    ASSOCIATE_RQ,
    C_ECHO_RQ,
    C_STORE_RQ,
    MAX_CONTROL_PDU,
    N_EVENT_REPORT_RQ,
    N_EVENT_REPORT_RSP,
    NO_DATASET,
    P_DATA,
    PDU_HEADER,
    PDU_TYPES,
    PDV_HEADER,
    REJECT_APPLICATION_CONTEXT,
    REJECT_BUSY,
    REJECT_CALLED_AE,
    REJECT_NO_REASON,
    REJECT_PROTOCOL_VERSION,
    REJECT_SENDER,
    RELEASE_RP_PDU,
    RELEASE_RQ,
    AssociateRequest,
    ContextResult,
    ProtocolError,
    Reason,
    Rejection,
    check_control_pdu,
    encode_abort,
    encode_associate_ac,
    encode_associate_rj,
    encode_response,
    move_originator,
    negotiate,
    network_uid,
    p_data,
    parse_associate_rq,
    parse_command,
    role_item,
    role_selections,
    us,
)
from segnode.node.events import AssociationAccepted, AssociationRejected, RejectionReason
from segnode.node.ingest.guards import AcceptWatchdog, PendingGate, PendingSlot
from segnode.node.ingest.store import (
    CT_FAMILY,
    TRANSFER_SYNTAXES,
    StoreHandler,
    StoreRequest,
)
from segnode.node.status import Status

logger = logging.getLogger(__name__)

#: the Verification SOP Class (PS3.4 A.4), answered with C-ECHO
VERIFICATION = "1.2.840.10008.1.1"

#: the A-ASSOCIATE-RJ reasons this receiver sends, as the events name them
REJECTION_REASONS: dict[Reason, RejectionReason] = {
    REJECT_SENDER: RejectionReason.SENDER_NOT_ALLOWED,
    REJECT_CALLED_AE: RejectionReason.CALLED_AE_UNKNOWN,
    REJECT_BUSY: RejectionReason.TOO_MANY_ASSOCIATIONS,
    REJECT_NO_REASON: RejectionReason.INVALID_REQUEST,
    REJECT_APPLICATION_CONTEXT: RejectionReason.APPLICATION_CONTEXT_UNKNOWN,
    REJECT_PROTOCOL_VERSION: RejectionReason.PROTOCOL_VERSION_UNSUPPORTED,
}

_LISTEN_POLL_S = 0.2
#: datasets up to this size are received in memory; larger ones into a file mapping
SPILL_BYTES = 64 << 20
#: the first in-memory buffer of a connection (grown by doubling), allocated with its first dataset
FIRST_BUFFER = 1 << 20


class DatasetBuffer:
    """Where one connection's dataset fragments land, grown as a dataset needs.

    In memory up to :data:`SPILL_BYTES`; beyond that in a shared mapping of
    an unnamed file in ``spill_dir`` (allocated up front, so a full disk is an
    error here, not a SIGBUS later), whose pages the kernel may write out and
    reclaim.  :meth:`release` drops the mapping after a large dataset.
    """

    def __init__(self, spill_dir: os.PathLike[str] | str) -> None:
        self.spill_dir = spill_dir
        self.memory = bytearray()  # allocated with the first dataset: an idle connection costs nothing
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
        size = max(end, 2 * len(current), FIRST_BUFFER)
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
        self.memory = bytearray()

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


class PeerGone(Exception):
    """The peer closed the connection, aborted, or missed a deadline."""


class _TimedOut(PeerGone):
    """The peer missed a deadline (answered with an A-ABORT)."""


# -- one association ---------------------------------------------------------------------------


class _Connection:
    """One accepted connection, served on its own thread from request to release.

    Every read has a deadline, not a per-``recv`` timeout: the TLS handshake
    (if any) and the whole A-ASSOCIATE-RQ must arrive within
    ``acse_timeout_s`` of ``accept()``, and each later PDU within
    ``network_timeout_s`` of the moment we start waiting for it, so a peer
    dribbling bytes holds a slot no longer than that.  Over TLS a read first
    returns what the TLS layer already decrypted (``SSLSocket.recv_into``
    waits on the socket only when nothing is pending), so a deadline is never
    spent waiting for bytes already received.
    """

    def __init__(self, server: NativeServer, sock: socket.socket, slot: PendingSlot) -> None:
        self.server, self.sock, self.host = server, sock, slot.host
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
        self.slot = slot  # in the server's gate until the A-ASSOCIATE-RQ is read
        self.released = False  # ended with A-RELEASE (completion evidence, node/completion.py)
        self.deadline = time.monotonic() + self.limits.acse_timeout_s

    # -- reading ----------------------------------------------------------------------
    def _recv_into(self, view: memoryview) -> None:
        got, want, sock, deadline = 0, len(view), self.sock, self.deadline
        while got < want:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _TimedOut("deadline passed")
            sock.settimeout(remaining)
            try:
                n = sock.recv_into(view[got:], want - got)
            except TimeoutError as exc:
                raise _TimedOut("deadline passed") from exc
            if not n:
                raise PeerGone("connection closed by peer")
            got += n

    def _read_pdu_header(self) -> tuple[int, int]:
        self._recv_into(memoryview(self.header))
        kind, length = PDU_HEADER.unpack(self.header)
        if kind not in PDU_TYPES:
            raise ProtocolError(f"unknown PDU type 0x{kind:02x}", ABORT_UNRECOGNISED_PDU)
        return kind, length

    def _read_body(self, length: int) -> bytearray:
        if length > MAX_CONTROL_PDU:
            raise ProtocolError(f"peer declared a {length}-byte PDU (limit {MAX_CONTROL_PDU})")
        body = bytearray(length)
        self._recv_into(memoryview(body))
        return body

    def _send(self, data: bytes) -> None:
        self.sock.settimeout(self.limits.network_timeout_s)  # a peer that does not read cannot hold us
        self.sock.sendall(data)

    # -- the association ----------------------------------------------------------------
    def _handshake(self, context: ssl.SSLContext) -> None:
        """TLS on this connection's thread, within the handshake timeout and the association deadline."""
        tls = context.wrap_socket(self.sock, server_side=True, do_handshake_on_connect=False)
        self.sock = tls
        self.server.track(tls)
        remaining = min(self.deadline - time.monotonic(), self.server.handshake_timeout_s)
        if remaining <= 0:  # no A-ABORT: there is no TLS session to send it in
            raise PeerGone("deadline passed before the TLS handshake")
        tls.settimeout(remaining)  # one deadline for the whole handshake (CPython's do_handshake loop keeps it)
        try:
            tls.do_handshake()
        except TimeoutError as exc:
            raise PeerGone("TLS handshake timed out") from exc
        except ssl.SSLError as exc:
            logger.warning("TLS handshake with %s failed: %s", self.host, exc.reason or exc)
            raise PeerGone("TLS handshake failed") from exc

    def serve(self) -> None:
        try:
            if self.server.ssl_context is not None:
                self._handshake(self.server.ssl_context)
            if self._associate():
                self._serve_messages()
        except ProtocolError as exc:
            logger.warning("aborting association from %s: %s", self.host, exc)
            self._abort(exc.reason)
        except _TimedOut:
            logger.info("aborting association from %s: it missed its deadline", self.host)
            self._abort(ABORT_NOT_SPECIFIED)
        except PeerGone as exc:
            logger.info("association from %s ended: %s", self.host, exc)
        except OSError as exc:
            logger.info("association from %s ended: %s", self.host, exc)
        except Exception:  # boundary: our own fault ends this association, not the thread silently
            logger.exception("internal error serving an association from %s; aborting it", self.host)
            self._abort(ABORT_NOT_SPECIFIED)
        finally:
            self.data.release()
            self.server.handler.association_ended(id(self), released=self.released)

    def _abort(self, reason: int) -> None:
        try:
            self._send(encode_abort(reason))
        except OSError:
            pass

    def _associate(self) -> bool:
        try:
            kind, length = self._read_pdu_header()
            if kind != ASSOCIATE_RQ:
                raise ProtocolError(f"expected A-ASSOCIATE-RQ, got PDU type 0x{kind:02x}", ABORT_UNEXPECTED_PDU)
            body = self._read_body(length)
        finally:
            self.slot.release()  # no longer pending, whatever came
        try:
            request = parse_associate_rq(body)
        except Rejection as exc:
            return self._reject(exc.reason, str(exc))
        self.calling_ae = request.calling_ae
        server = self.server
        if not server.handler.admit(request.calling_ae, self.host):
            self._send(encode_associate_rj(REJECT_SENDER))
            server.emit(AssociationRejected(request.calling_ae, self.host, RejectionReason.SENDER_NOT_ALLOWED))
            return False
        if request.called_ae != server.config.ae_title.strip():
            return self._reject(REJECT_CALLED_AE, f"called AE title {request.called_ae!r}")
        if not server.enter():
            return self._reject(REJECT_BUSY, "max_associations reached")
        self.entered = True
        results = negotiate(request.contexts, server.supported_for(request.calling_ae))
        self.contexts = {r.context_id: (r.abstract_syntax, r.transfer_syntax) for r in results
                         if r.result == ACCEPTANCE}
        self._send(encode_associate_ac(request, results, self.limits.max_pdu_bytes, _roles(request, results)))
        server.emit(AssociationAccepted(request.calling_ae, self.host))
        return True

    def _reject(self, reason: Reason, why: str) -> bool:
        logger.info("rejecting association from %s: %s %s", self.host, why, reason)
        self._send(encode_associate_rj(reason))
        self.server.emit(AssociationRejected(self.calling_ae, self.host,
                                             REJECTION_REASONS.get(reason, RejectionReason.OTHER)))
        return False

    def _serve_messages(self) -> None:
        limit = self.limits.max_pdu_bytes + 6
        while True:
            self.deadline = time.monotonic() + self.limits.network_timeout_s
            kind, length = self._read_pdu_header()
            if kind == P_DATA:
                if length > limit:
                    raise ProtocolError(f"peer declared a {length}-byte PDU (limit {limit})")
                self._read_pdvs(length)
            elif kind == RELEASE_RQ:
                check_control_pdu(kind, self._read_body(length))
                self._send(RELEASE_RP_PDU)
                self.released = True
                return
            elif kind == ABORT:
                self._read_body(length)
                raise PeerGone("aborted by peer")
            else:
                raise ProtocolError(f"unexpected PDU type 0x{kind:02x}", ABORT_UNEXPECTED_PDU)

    def _read_pdvs(self, length: int) -> None:
        header = memoryview(self.header)
        if length == 0:
            raise ProtocolError("P-DATA-TF without a PDV")
        while length > 0:
            if length < 6:
                raise ProtocolError("truncated PDV")
            self._recv_into(header)
            item_length, context_id, control = PDV_HEADER.unpack(self.header)
            size = item_length - 2
            if item_length < 2 or 4 + item_length > length or control & 0xFC:
                raise ProtocolError("PDV longer than its PDU or with a reserved control bit")
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
        field_ = us(command.get(0x0100))
        message_id = us(command.get(0x0110))
        if message_id is None:
            raise ProtocolError("command without a Message ID")
        if field_ == C_ECHO_RQ:
            rsp = encode_response(0x8030, message_id, command.get(0x0002, VERIFICATION.encode()),
                                  Status.SUCCESS)
            self._send(p_data(context_id, rsp))
        elif field_ in (C_STORE_RQ, N_EVENT_REPORT_RQ) and us(command.get(0x0800)) != NO_DATASET:
            self.pending, self.pending_context, self.filled = command, context_id, 0
        elif field_ == N_EVENT_REPORT_RQ:
            self._report(context_id, command, None)
        else:
            raise ProtocolError(f"unsupported DIMSE command 0x{field_ or 0:04x}")

    def _store(self, context_id: int, command: dict[int, bytes]) -> None:
        if us(command.get(0x0100)) == N_EVENT_REPORT_RQ:
            with self.data.view() as buffer:
                dataset = bytes(buffer[:self.filled])
            self.filled = 0
            self.data.release()
            self._report(context_id, command, dataset)
            return
        abstract, transfer_syntax = self.contexts[context_id]
        sop_class = command.get(0x0002, b"")
        sop_instance = command.get(0x1000, b"")
        request = StoreRequest(network_uid(sop_class) or abstract, network_uid(sop_instance), transfer_syntax,
                               self.calling_ae, self.server.config.ae_title, self.host, abstract, session=id(self),
                               move_originator=move_originator(command))
        with self.data.view() as buffer, buffer[:self.filled] as dataset:
            status, comment = self.server.handler.store(request, dataset)
        self.filled = 0
        self.data.release()
        rsp = encode_response(0x8001, us(command.get(0x0110)) or 0, sop_class, status, comment, sop_instance)
        self._send(p_data(context_id, rsp))

    def _report(self, context_id: int, command: dict[int, bytes], dataset: bytes | None) -> None:
        """A Storage Commitment report (N-EVENT-REPORT-RQ), answered with what the commitment book says."""
        abstract, transfer_syntax = self.contexts[context_id]
        sop_class, sop_instance = command.get(0x0002, b""), command.get(0x1000, b"")
        event_type = us(command.get(0x1002))
        answer = self.server.commitments.receive(abstract, network_uid(sop_class), network_uid(sop_instance),
                                                 event_type, dataset, transfer_syntax, self.calling_ae)
        if answer.event is not None:
            self.server.handler.emit(answer.event)
        rsp = encode_response(N_EVENT_REPORT_RSP, us(command.get(0x0110)) or 0, sop_class, answer.status,
                              answer.comment, sop_instance, event_type)
        self._send(p_data(context_id, rsp))


def _roles(request: AssociateRequest, results: list[ContextResult]) -> tuple[bytes, ...]:
    """Answers to the role selections of accepted Storage Commitment contexts: the peer may act as its SCP."""
    proposed = role_selections(request.user_items).get(STORAGE_COMMITMENT)
    accepted = any(r.result == ACCEPTANCE and r.abstract_syntax == STORAGE_COMMITMENT for r in results)
    if proposed is None or not accepted:
        return ()
    return (role_item(STORAGE_COMMITMENT, 0, 1 if proposed[1] else 0),)


# -- the server -------------------------------------------------------------------------------


class NativeServer:
    """Accepts connections and serves each on its own thread (TLS, if ``ssl_context``, on that thread too)."""

    def __init__(self, config: NodeConfig, handler: StoreHandler, *, reuse_port: bool = False,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.config = config
        self.handler = handler
        self.ssl_context = ssl_context
        self.handshake_timeout_s = config.tls.handshake_timeout_s if config.tls is not None else 0.0
        self.supported: dict[str, tuple[str, ...]] = {
            str(uid): TRANSFER_SYNTAXES for uid in dict.fromkeys((*CT_FAMILY, *config.storage_classes))}
        self.supported[VERIFICATION] = tuple(DEFAULT_TRANSFER_SYNTAXES)
        self.commitments = CommitmentBook(handler.index, config)  # reports of commitments the node asked for
        self._with_commitment = {**self.supported, STORAGE_COMMITMENT: COMMITMENT_SYNTAXES}
        self._active = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._connections: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self.watchdog = AcceptWatchdog()
        limits = config.limits
        self.gate = PendingGate(limits.max_pending_connections, limits.max_pending_per_host)
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:  # receiver processes share the port (node/dicom_in/processes.py)
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self.socket.bind((config.host, config.port))
        self.socket.listen(128)
        self.socket.settimeout(_LISTEN_POLL_S)
        self.server_address = self.socket.getsockname()

    def supported_for(self, calling_ae: str) -> dict[str, tuple[str, ...]]:
        """The contexts offered to ``calling_ae``: Storage Commitment only to a destination asked for it."""
        return self._with_commitment if self.commitments.is_peer(calling_ae) else self.supported

    def emit(self, event: AssociationAccepted | AssociationRejected) -> None:
        """An association event, into the store handler's sink (a failing sink never ends an association)."""
        self.handler.emit(event)

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
            self._accept_one()

    def _accept_one(self) -> None:
        """Accept and start one connection; any failure is logged, counted and backed off, never fatal."""
        try:
            client, address = self.socket.accept()
        except TimeoutError:
            self.watchdog.beat()
            return
        except OSError as exc:  # EMFILE, ENFILE, ENOBUFS, ECONNABORTED...; or the socket closed by shutdown()
            if not self._stopping.is_set():
                self._stopping.wait(self.watchdog.failed("accept()", exc))
            return
        slot = self.gate.admit(address[0])
        if slot is None:
            client.close()  # refused cheaply: no thread, no buffer
            return
        try:
            self._start(client, slot)
        except (OSError, RuntimeError) as exc:  # "can't start new thread", setsockopt on a reset socket
            slot.release()
            client.close()
            self._stopping.wait(self.watchdog.failed("starting a connection thread", exc))
            return
        self.watchdog.beat()

    def _start(self, client: socket.socket, slot: PendingSlot) -> None:
        # small C-STORE responses must not wait for the peer's delayed ACK (Nagle)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = _Connection(self, client, slot)
        thread = threading.Thread(target=self._serve, args=(conn,), name="segnode-native-assoc", daemon=True)
        with self._lock:
            self._connections.add(client)
            self._threads.add(thread)
        try:
            thread.start()
        except RuntimeError:
            with self._lock:
                self._connections.discard(client)
                self._threads.discard(thread)
            raise

    def track(self, client: socket.socket) -> None:
        """``client`` (a connection's TLS socket, once wrapped) is what :meth:`shutdown` closes."""
        with self._lock:
            self._connections.add(client)

    def _serve(self, conn: _Connection) -> None:
        raw = conn.sock  # wrapping it for TLS detaches it
        try:
            conn.serve()
        finally:
            conn.slot.release()
            with self._lock:
                if conn.entered:
                    self._active -= 1
                self._connections.discard(raw)
                self._connections.discard(conn.sock)
                self._threads.discard(threading.current_thread())
            conn.sock.close()

    def shutdown(self) -> None:
        """Stop accepting, close open connections, wait for their threads."""
        self._stopping.set()
        self.socket.close()
        with self._lock:
            connections, threads = list(self._connections), list(self._threads)
        for client in connections:
            try:  # the TCP socket's own shutdown: its thread's blocked read returns (SSLSocket's would drop TLS state)
                socket.socket.shutdown(client, socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in threads:
            thread.join(timeout=5)
