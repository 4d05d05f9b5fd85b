"""The pynetdicom receiver (with TLS), guarded as the native one is; its handlers call the store path."""

from __future__ import annotations

import logging
import queue
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.fsm import StateMachine
from pynetdicom.pdu_primitives import A_P_ABORT
from pynetdicom.sop_class import (
    Verification,
)
from pynetdicom.transport import (
    AssociationSocket,
    RequestHandler,
    ThreadedAssociationServer,
)
from segnode.node.config import NodeConfig
from segnode.node.dicom_in.pdu import (
    ABORT,
    ABORT_INVALID_PARAMETER,
    ABORT_NOT_SPECIFIED,
    ABORT_UNEXPECTED_PDU,
    ASSOCIATE_AC,
    ASSOCIATE_RJ,
    ASSOCIATE_RQ,
    MAX_CONTROL_PDU,
    P_DATA,
    PDV_HEADER,
    REJECT_BUSY,
    REJECT_NO_REASON,
    REJECT_SENDER,
    RELEASE_RP,
    RELEASE_RQ,
    AssociateRequest,
    ProtocolError,
    Rejection,
    ae_title,
    check_command_set,
    check_control_pdu,
    check_pdvs,
    encode_abort,
    encode_associate_rj,
    parse_associate_rq,
)
from segnode.node.dicom_in.pdu import uid as pdu_uid
from segnode.node.ingest.guards import (
    AcceptWatchdog,
    ListenerHealth,
    PendingGate,
    PendingSlot,
    listener_health,
)
from segnode.storage.index import Index
from segnode.storage.spool import Spool

if TYPE_CHECKING:
    from segnode.node.dicom_in.receiver import NativeServer

from segnode.node.ingest.store import (
    BAD_UID,
    CT_FAMILY,
    SUCCESS,
    TRANSFER_SYNTAXES,
    Listener,
    StoreHandler,
    StoreRequest,
    StoreStatus,
)

logger = logging.getLogger(__name__)


class PynetdicomHandlers:
    """pynetdicom's event handlers around one :class:`StoreHandler`."""

    def __init__(self, store: StoreHandler) -> None:
        self.store_handler = store
        self.config = store.config
        self.stats = store.stats

    def association_ended(self, session: int, *, released: bool) -> None:
        self.store_handler.association_ended(session, released=released)

    def admit(self, calling: str, host: str) -> bool:
        return self.store_handler.admit(calling, host)

    def store(self, request: StoreRequest, dataset: memoryview) -> StoreStatus:
        return self.store_handler.store(request, dataset)

    def on_released(self, event: evt.Event) -> None:
        self.association_ended(id(event.assoc), released=True)

    def on_aborted(self, event: evt.Event) -> None:
        self.association_ended(id(event.assoc), released=False)

    def on_requested(self, event: evt.Event) -> None:
        """Reject at association a calling AE / host that may not send, or one past ``max_associations``.

        pynetdicom counts every connection's thread against its own maximum,
        idle ones not yet associated included; here only established
        associations count (its own maximum is set above ours plus the
        pending cap, see :func:`build_ae`).
        """
        assoc = event.assoc
        if not self.admit(assoc.requestor.primitive.calling_ae_title.strip(), assoc.requestor.address):
            reason = REJECT_SENDER
        elif _established(assoc) >= self.config.limits.max_associations:
            logger.info("rejecting association from %s: max_associations reached", assoc.requestor.address)
            reason = REJECT_BUSY
        else:
            return
        assoc.acse.send_reject(*reason)
        if reason == REJECT_BUSY:
            evt.trigger(assoc, evt.EVT_REJECTED, {})
        assoc.kill()  # as pynetdicom does after its own rejections: lets the DUL send the A-ASSOCIATE-RJ

    def on_echo(self, event: evt.Event) -> int:
        return SUCCESS

    def on_store(self, event: evt.Event) -> int | Dataset:
        """pynetdicom's C-STORE handler: :meth:`store` on the dataset exactly as sent."""
        try:
            request = request_from_event(event)
        except (ValueError, TypeError, AttributeError, UnicodeError) as exc:  # pydicom could not decode a UID
            logger.warning("refusing instance: its C-STORE-RQ does not decode (%s)", exc)
            return _status(BAD_UID, "AffectedSOPClassUID invalid")
        received = event.request.DataSet  # BytesIO holding the dataset exactly as sent
        with received.getbuffer() as dataset:  # a view: the bytes are never copied or decoded
            code, comment = self.store(request, dataset)
        return code if comment is None else _status(code, comment)



def request_from_event(event: evt.Event) -> StoreRequest:
    assoc, request, context = event.assoc, event.request, event.context
    return StoreRequest(str(request.AffectedSOPClassUID or ""), str(request.AffectedSOPInstanceUID or ""),
                        str(context.transfer_syntax), assoc.requestor.ae_title, assoc.acceptor.ae_title,
                        assoc.requestor.address, str(context.abstract_syntax), session=id(assoc))

def _status(code: int, comment: str) -> Dataset:
    out = Dataset()
    out.Status = code
    out.ErrorComment = comment[:64]
    return out

# -- guards around pynetdicom's transport --------------------------------------------


class GuardedSocket(AssociationSocket):
    """An :class:`AssociationSocket` that checks what pynetdicom would decode, with deadlines.

    pynetdicom's DUL reads a 6-byte PDU header, then exactly the length the
    peer declared.  Here the declared length is checked first (the negotiated
    maximum for P-DATA, :data:`MAX_CONTROL_PDU` for the rest), the body is
    checked by :mod:`segnode.node.dicom_in.pdu` before pynetdicom decodes it (an
    A-ASSOCIATE-RQ fully: AE titles, UIDs, contexts → A-ASSOCIATE-RJ with its
    reason; a P-DATA-TF's PDV items, a release's or abort's length → A-ABORT),
    and the P-DATA fragments of one message are summed; past a limit the
    connection is closed (the DUL sees a short read and ends the association).
    Reads have deadlines, as the native receiver's: the A-ASSOCIATE-RQ must be
    whole within ``acse_timeout_s`` of the connection, every later PDU within
    ``network_timeout_s`` of its first byte.  Reads use ``recv_into`` one
    preallocated buffer instead of 4 KiB appends.
    """

    max_pdu: int = 131072
    max_dataset: int = 1 << 30
    network_timeout: float = 60.0
    slot: PendingSlot | None = None  # in the server's gate until the A-ASSOCIATE-RQ is read
    _deadline: float = float("inf")
    _header_next: bool = True
    _pdu_type: int = 0
    _dataset_bytes: int = 0
    _command: bytes = b""  # the command fragments of the message being received
    _associated: bool = False  # pynetdicom has the A-ASSOCIATE-RQ
    _abandoned: bool = False

    def recv(self, nr_bytes: int) -> bytearray:
        data = self._recv_pdu_part(nr_bytes)
        if len(data) < nr_bytes and not self._associated:
            self._abandon()
        return data

    def _recv_pdu_part(self, nr_bytes: int) -> bytearray:
        if self._header_next and nr_bytes == 6:
            if self._associated:
                self._deadline = time.monotonic() + self.network_timeout
            data = self._recv_exact(6)
            if len(data) == 6:
                self._pdu_type, _, length = struct.unpack(">BBL", data)
                limit = self.max_pdu + 6 if self._pdu_type == 0x04 else MAX_CONTROL_PDU
                if length > limit:
                    logger.warning("closing connection: peer declared a %d-byte PDU (limit %d)", length, limit)
                    return self._refuse(encode_abort(ABORT_INVALID_PARAMETER))
                if (self._pdu_type == ASSOCIATE_RQ) == self._associated or self._pdu_type in _NOT_FOR_ACCEPTOR:
                    logger.warning("aborting connection: unexpected PDU type 0x%02x", self._pdu_type)
                    return self._refuse(encode_abort(ABORT_UNEXPECTED_PDU))
                self._header_next = False
            return data
        self._header_next = True
        data = self._recv_exact(nr_bytes)
        if len(data) == nr_bytes:
            return self._checked(data)
        return data

    def _checked(self, body: bytearray) -> bytearray:
        """``body`` if :mod:`segnode.node.dicom_in.pdu` finds it sound, else an empty read after an A-ABORT or -RJ."""
        kind = self._pdu_type
        try:
            if kind == ASSOCIATE_RQ and not self._associated:
                self._release_slot()
                _sound_for_pynetdicom(parse_associate_rq(body))
                self._associated = True  # pynetdicom takes it from here
            elif kind == P_DATA:
                check_pdvs(body)
                self._check_commands(body)
                if not self._count_pdvs(body):
                    logger.warning("closing connection: dataset larger than %d bytes", self.max_dataset)
                    return self._refuse(encode_abort(ABORT_INVALID_PARAMETER))
            elif kind in (RELEASE_RQ, RELEASE_RP, ABORT):
                check_control_pdu(kind, body)
        except Rejection as exc:
            logger.info("rejecting association: %s %s", exc, exc.reason)
            return self._refuse(encode_associate_rj(exc.reason))
        except ProtocolError as exc:
            logger.warning("aborting association: %s", exc)
            return self._refuse(encode_abort(exc.reason))
        return body

    def _check_commands(self, body: bytearray) -> None:
        """Command fragments collected and checked (:func:`segnode.node.dicom_in.pdu.check_command_set`) before pynetdicom
        decodes them: it would raise on its DUL thread (a missing Command Field, a UID it cannot decode)."""
        offset = 0
        while offset < len(body):
            length, _, control = PDV_HEADER.unpack_from(body, offset)
            if control & 0x01:
                self._command += bytes(body[offset + 6:offset + 4 + length])
                if len(self._command) > MAX_CONTROL_PDU:
                    raise ProtocolError("command set too long")
                if control & 0x02:
                    command, self._command = self._command, b""
                    check_command_set(command)
            offset += 4 + length

    def _abandon(self) -> None:
        """The connection ended before pynetdicom saw a request: free its slot and end its thread now.

        pynetdicom's acceptor thread would wait out ``acse_timeout_s`` for a
        request that cannot come (counted against its association maximum);
        an empty primitive tells it none will.
        """
        self._release_slot()
        if not self._abandoned:
            self._abandoned = True
            self.assoc.dul.to_user_queue.put(None)

    def _recv_exact(self, nr_bytes: int) -> bytearray:
        buf = bytearray(nr_bytes)
        view = memoryview(buf)
        got = 0
        sock = self.socket
        while got < nr_bytes and sock is not None:
            remaining = self._deadline - time.monotonic()
            if remaining <= 0:
                logger.info("aborting association: the peer missed its deadline")
                self._refuse(encode_abort(ABORT_NOT_SPECIFIED))
                return buf[:got]
            sock.settimeout(min(remaining, _NO_DEADLINE_S))
            try:
                n = sock.recv_into(view[got:], nr_bytes - got)
            except TimeoutError:
                continue  # the deadline check above decides
            if not n:
                return buf[:got]
            got += n
        return buf

    def _release_slot(self) -> None:
        if self.slot is not None:
            self.slot.release()

    def _count_pdvs(self, body: bytearray) -> bool:
        offset = 0
        while offset + 6 <= len(body):
            item_len = int.from_bytes(body[offset:offset + 4], "big")
            control = body[offset + 5]
            if not control & 0x01:  # a dataset fragment (not a command)
                self._dataset_bytes += item_len - 2
                if self._dataset_bytes > self.max_dataset:
                    return False
                if control & 0x02:  # last fragment of this dataset
                    self._dataset_bytes = 0
            offset += 4 + item_len
        return True

    def _refuse(self, answer: bytes) -> bytearray:
        """Send ``answer`` (an A-ABORT or -RJ) if the peer still reads, close, and read nothing."""
        sock = self.socket
        if sock is not None:
            try:
                sock.settimeout(1.0)
                sock.sendall(answer)
            except OSError:
                pass
        self.close()
        return bytearray()

    # -- the doorbell (see "prompt wake-ups" below) -----------------------------------
    _bell_rx: socket.socket | None = None
    _bell_tx: socket.socket | None = None

    def open_doorbell(self) -> None:
        self._bell_rx, self._bell_tx = socket.socketpair()
        self._bell_rx.setblocking(False)
        self._bell_tx.setblocking(False)

    def ring(self) -> None:
        """Wake :meth:`ready` (called after a primitive is queued for sending)."""
        try:
            if self._bell_tx is not None:
                self._bell_tx.send(b"\x01")
        except (BlockingIOError, OSError):  # full: a wake-up is pending anyway; closed: nobody waits
            pass

    @property
    def ready(self) -> bool:
        """Data to read?  Blocks up to :data:`IDLE_WAIT_S`, or until the doorbell rings."""
        sock, bell = self.socket, self._bell_rx
        if sock is None or not self._is_connected or bell is None:
            time.sleep(0.001)  # as pynetdicom's own loop delay: nothing to wait on
            return bool(AssociationSocket.ready.fget(self))  # type: ignore[attr-defined]
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True
        try:
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            poller.register(bell, select.POLLIN)
            events = dict(poller.poll(IDLE_WAIT_S * 1000))
        except (OSError, ValueError):
            return bool(AssociationSocket.ready.fget(self))  # type: ignore[attr-defined]
        if bell.fileno() in events:
            try:
                bell.recv(4096)
            except BlockingIOError:
                pass
        return sock.fileno() in events

    def close(self) -> None:
        self._release_slot()
        super().close()
        for end in (self._bell_rx, self._bell_tx):
            if end is not None:
                end.close()


#: PDUs only an association requestor receives (pynetdicom would decode them, and log a traceback)
_NOT_FOR_ACCEPTOR = frozenset({ASSOCIATE_AC, ASSOCIATE_RJ})
#: the longest one ``recv`` waits while no deadline applies (pynetdicom's own timers then decide)
_NO_DEADLINE_S = 3600.0


#: user information sub-items pynetdicom decodes (PS3.7 D.3.3, PS3.8 D.1); it raises on any other
_USER_ITEMS = frozenset(range(0x51, 0x59))


def _sound_for_pynetdicom(request: AssociateRequest) -> None:
    """What pynetdicom decodes of a request, beyond :func:`segnode.node.dicom_in.pdu.parse_associate_rq`, checked first.

    A presentation context UID that breaks the grammar rejects the association
    (pynetdicom would decode it); an unknown user information sub-item, an
    implementation class UID or version name that pynetdicom cannot decode
    aborts it (invalid PDU parameter).
    """
    if any(context.malformed for context in request.contexts):
        raise Rejection("a presentation context UID breaks the UID grammar", REJECT_NO_REASON)
    for kind, value in request.user_items:
        if kind not in _USER_ITEMS:
            raise ProtocolError(f"unknown user information sub-item 0x{kind:02x}")
        if kind == 0x52 and pdu_uid(value) is None:
            raise ProtocolError("implementation class UID breaks the UID grammar")
        if kind == 0x55 and (not 0 < len(value) <= 16 or ae_title(value.ljust(16)) is None):
            raise ProtocolError("implementation version name is not 1-16 characters of the AE repertoire")


# -- prompt wake-ups instead of pynetdicom's 1 ms polling ----------------------------------
#
# pynetdicom runs two polling loops per association.  The DUL thread checks its
# outgoing queue and the socket, and sleeps ``_run_loop_delay`` (1 ms) whenever
# neither had work; the association thread sleeps 1 ms and then looks for a
# complete DIMSE message.  Every C-STORE therefore waits on both sleeps, and
# one association leaves the CPU idle much of the time (measured on 2 cores:
# 0.6–0.8 of them busy; a delay of 0 busy-spins).  Here both loops block instead, and are
# woken by the thing they wait for:
#
# * the DUL's loop delay is 0, and :meth:`GuardedSocket.ready` (called once per
#   idle loop) blocks in ``poll`` on the connection *and* a doorbell socket
#   pair, for at most :data:`IDLE_WAIT_S`; putting a primitive on the DUL's
#   outgoing queue (a C-STORE response, a release) rings that doorbell;
# * the association thread's non-blocking ``get_msg`` waits on an Event, for
#   at most :data:`IDLE_WAIT_S`, that rings when the DIMSE layer queues a
#   complete message or the DUL queues a release or abort for the user;
# * and after serving a message that thread serves the next one of a burst
#   directly (:class:`_PromptAssociation`) instead of going round pynetdicom's
#   loop, which sleeps 1 ms first.
#
# What nothing rings (ARTIM and idle timers, a local kill) is seen within
# IDLE_WAIT_S, as before within 1 ms.  No pynetdicom code is copied or
# changed: these are its documented queues and its socket's ``ready`` hook.

#: longest a loop waits when nothing rings it (timers, kill flags are checked this often).
IDLE_WAIT_S = 0.05


class _RingingQueue(queue.Queue):  # type: ignore[type-arg]
    """A queue that calls ``ring()`` after each ``put``."""

    def __init__(self, ring: Callable[[], None]) -> None:
        super().__init__()
        self._ring = ring

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._ring()


class _PromptDIMSE(DIMSEServiceProvider):
    """DIMSE provider whose non-blocking ``get_msg`` waits (briefly) for a message to be rung in."""

    _bell: threading.Event

    def get_msg(self, block: bool = False):  # type: ignore[no-untyped-def]
        if not block:
            self._bell.clear()
            if self.msg_queue.empty() and self.dul.to_user_queue.empty():
                self._bell.wait(IDLE_WAIT_S)
        return super().get_msg(block)


class _PromptAssociation(Association):
    """Serves the messages of a burst back to back (see "prompt wake-ups" above).

    pynetdicom's acceptor loop sleeps 1 ms before each look for a message
    (measured here: 3.4 ms on average under load); after serving one C-STORE
    this waits, on the DIMSE doorbell, for the next and serves it at once.  It
    returns to pynetdicom's loop (which handles release, abort, timers) when
    nothing arrives within :data:`IDLE_WAIT_S`, or as soon as the DUL queues
    a release or abort for the user.
    """

    def _serve_request(self, msg, context_id):  # type: ignore[no-untyped-def]
        super()._serve_request(msg, context_id)
        if threading.current_thread() is not self:  # e.g. pynetdicom's N-EVENT-REPORT side threads
            return
        while not self._kill and self.is_established and self.dul.to_user_queue.empty():
            context_id, msg = self.dimse.get_msg(block=False)  # waits for the doorbell
            if msg is None:
                return
            super()._serve_request(msg, context_id)


class _TolerantStateMachine(StateMachine):
    """pynetdicom's DUL state machine, with the boundary its DUL thread lacks.

    pynetdicom's actions run on its DUL thread, and an exception there ends
    the thread with a traceback while the connection stays open: an event
    its table lacks (``InvalidEventError``: e.g. the A-ASSOCIATE-AC our side
    queues after the peer's next, broken PDU has moved the machine to Sta13),
    or a P-DATA whose command set pydicom cannot decode (``AttributeError``,
    ``TypeError`` from DT-2).  Here the peer gets an A-ABORT, the connection is
    closed, the association is told (an A-P-ABORT primitive), what our side
    had queued is dropped, and the machine goes idle; the reason is logged.
    """

    def do_action(self, event: str) -> None:
        try:
            super().do_action(event)
        except Exception as exc:  # boundary of pynetdicom's DUL thread: the peer's bytes broke an action
            logger.warning("aborting association: upper-layer event %s in state %s failed (%s: %s)", event,
                           self.current_state, type(exc).__name__, str(exc)[:200])
            self._end()

    def _end(self) -> None:
        dul = self.dul
        sock = dul.socket
        if isinstance(sock, GuardedSocket):
            sock._refuse(encode_abort(ABORT_NOT_SPECIFIED))
        elif sock is not None:
            sock.close()
        with dul.to_provider_queue.mutex:
            dul.to_provider_queue.queue.clear()
        if self.current_state != "Sta1":
            abort = A_P_ABORT()
            abort.provider_reason = 0x00
            dul.to_user_queue.put(abort)
        self.current_state = "Sta1"


def _make_prompt(assoc: Association, sock: GuardedSocket) -> None:
    """Switch one new (not yet started) association from polling to wake-ups."""
    bell = threading.Event()
    assoc.__class__ = _PromptAssociation  # same object and state; only _serve_request() differs
    assoc.dimse.__class__ = _PromptDIMSE  # same object and state; only get_msg() waits instead of polling
    assoc.dimse._bell = bell
    assoc.dimse.msg_queue = _RingingQueue(bell.set)
    assoc.dul.to_user_queue = _RingingQueue(bell.set)
    sock.open_doorbell()
    assoc.dul.to_provider_queue = _RingingQueue(sock.ring)
    assoc.dul._run_loop_delay = 0  # the loop now blocks in GuardedSocket.ready() instead
    assoc.dul.state_machine.__class__ = _TolerantStateMachine  # same object and state; only do_action() differs


def _established(assoc: Association) -> int:
    """Established acceptor associations of ``assoc``'s AE (the one asking included)."""
    others = [a for a in assoc.ae.active_associations if a.is_acceptor and a.is_established and a is not assoc]
    return len(others)


class _GuardedRequestHandler(RequestHandler):
    def _create_association(self):  # type: ignore[no-untyped-def]
        assoc = super()._create_association()
        server = self.server
        sock = assoc.dul.socket
        sock.__class__ = GuardedSocket  # same object and state; only recv(), ready() and close() differ
        sock.max_pdu = server.max_pdu
        sock.max_dataset = server.max_dataset
        sock.network_timeout = server.network_timeout
        sock._deadline = time.monotonic() + server.acse_timeout
        sock.slot = server.take_slot()
        _make_prompt(assoc, sock)
        return assoc


class SegnodeServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, guarded as the native receiver is (:mod:`segnode.node.ingest.guards`).

    The TLS handshake runs on the connection's thread, not the accept
    thread; an ``accept()`` or thread-start failure is logged, counted and
    backed off (socketserver would spin on EMFILE, or print a traceback);
    connections not yet associated are capped by a :class:`PendingGate`
    before a thread is started for them.
    """

    max_pdu = 131072
    max_dataset = 1 << 30
    acse_timeout = 30.0
    network_timeout = 60.0
    handshake_timeout = 10.0
    reuse_port = False
    request_queue_size = 128  # socketserver's listen() backlog (its default, 5, drops bursts of connections)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["request_handler"] = _GuardedRequestHandler
        self.watchdog = AcceptWatchdog()
        self.gate = PendingGate(64, 16)
        self._slots: dict[int, PendingSlot] = {}  # by the accepted socket's file descriptor
        self._local = threading.local()
        self._accept_failed = False
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        if self.reuse_port:  # receiver processes share the port (node/dicom_in/processes.py)
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def service_actions(self) -> None:
        """Once per turn of socketserver's loop: a turn without a failed accept() is a healthy one."""
        if self._accept_failed:
            self._accept_failed = False
        else:
            self.watchdog.beat()

    def get_request(self):  # type: ignore[no-untyped-def]
        assert self.socket is not None
        try:
            client, address = self.socket.accept()  # TLS, if any, is set up in process_request_thread
        except OSError as exc:  # socketserver skips the request; without a pause it would spin on EMFILE
            self._accept_failed = True
            time.sleep(self.watchdog.failed("accept()", exc))
            raise
        # small C-STORE responses must not wait for the peer's delayed ACK (Nagle): ~40 ms per image
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return client, address

    def verify_request(self, request, client_address):  # type: ignore[no-untyped-def]
        slot = self.gate.admit(client_address[0])
        if slot is None:
            return False  # socketserver closes it: no thread, no association
        self._slots[request.fileno()] = slot
        return True

    def process_request(self, request, client_address):  # type: ignore[no-untyped-def]
        try:
            super().process_request(request, client_address)
        except RuntimeError as exc:  # "can't start new thread"
            self._accept_failed = True
            self._drop_slot(request)
            self.shutdown_request(request)
            time.sleep(self.watchdog.failed("starting a connection thread", exc))

    def _drop_slot(self, request: socket.socket) -> None:
        slot = self._slots.pop(request.fileno(), None)
        if slot is not None:
            slot.release()

    def take_slot(self) -> PendingSlot | None:
        """The pending slot of the connection this thread serves (handed to its :class:`GuardedSocket`)."""
        slot, self._local.slot = getattr(self._local, "slot", None), None
        return slot

    def process_request_thread(self, request, client_address):  # type: ignore[no-untyped-def]
        self._local.slot = slot = self._slots.pop(request.fileno(), None)
        try:
            if self.ssl_context is not None:
                try:
                    request.settimeout(self.handshake_timeout)
                    request = self.ssl_context.wrap_socket(request, server_side=True)
                    request.settimeout(None)
                except (OSError, ssl.SSLError) as exc:
                    logger.warning("TLS handshake with %s failed: %s", client_address[0], exc)
                    self.shutdown_request(request)
                    return
            super().process_request_thread(request, client_address)
        finally:
            if slot is not None and self._local.slot is slot:  # no association took it: handshake failed
                slot.release()
            self._local.slot = None


class _SharedPortServer(SegnodeServer):
    reuse_port = True


def server_ssl_context(config: NodeConfig) -> ssl.SSLContext | None:
    if config.tls is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(config.tls.cert), str(config.tls.key))
    if config.tls.client_ca is not None:
        ctx.load_verify_locations(str(config.tls.client_ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def build_ae(config: NodeConfig) -> AE:
    """An AE with our presentation contexts and limits (not yet listening)."""
    ae = AE(ae_title=config.ae_title)
    # pynetdicom counts connections not yet associated too; StoreHandler.on_requested enforces ours
    ae.maximum_associations = config.limits.max_associations + config.limits.max_pending_connections
    ae.maximum_pdu_size = config.limits.max_pdu_bytes
    ae.acse_timeout = config.limits.acse_timeout_s
    ae.network_timeout = config.limits.network_timeout_s
    ae.dimse_timeout = config.limits.network_timeout_s
    ae.require_called_aet = True
    for uid in dict.fromkeys((*CT_FAMILY, *config.storage_classes)):
        ae.add_supported_context(uid, list(TRANSFER_SYNTAXES))
    ae.add_supported_context(Verification)
    return ae


@dataclass
class RunningSCP:
    """A listening SCP, either receiver; ``stop()`` closes the port and waits for the accept thread."""

    server: SegnodeServer | NativeServer
    handler: StoreHandler
    thread: threading.Thread
    ae: AE | None = None  # the pynetdicom receiver's application entity

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def health(self) -> ListenerHealth:
        """The accept loop's watchdog (``/readyz``, metrics)."""
        return listener_health(self.server.watchdog, self.server.gate, self.thread.is_alive())

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join(timeout=5)
        if self.ae is not None:
            self.ae.shutdown()


def start_scp(config: NodeConfig, spool: Spool, index: Index, listener: Listener | None = None, *,
              reuse_port: bool = False) -> RunningSCP:
    """Listen on ``config.host:config.port`` in a background thread.

    ``reuse_port``: bind with ``SO_REUSEPORT``, so receiver processes
    (:mod:`segnode.node.dicom_in.processes`) can listen on the same port.  With
    ``limits.receiver: native`` and no TLS, :mod:`segnode.node.dicom_in.receiver` serves.
    """
    store = StoreHandler(config, spool, index, listener)
    handler = PynetdicomHandlers(store)
    if config.limits.receiver == "native":
        if config.tls is None:
            from segnode.node.dicom_in.receiver import (
                start_native_scp,  # it builds on this module
            )

            return start_native_scp(config, store, reuse_port=reuse_port)
        logger.info("limits.receiver is 'native', but TLS is configured: the pynetdicom receiver serves "
                    "(the native receiver is plain TCP only)")
    ae = build_ae(config)
    handlers = [
        (evt.EVT_REQUESTED, handler.on_requested),
        (evt.EVT_C_ECHO, handler.on_echo),
        (evt.EVT_C_STORE, handler.on_store),
        (evt.EVT_RELEASED, handler.on_released),
        (evt.EVT_ABORTED, handler.on_aborted),
        (evt.EVT_CONN_CLOSE, handler.on_aborted),  # closed without release: no evidence (a no-op after one)
    ]
    server = ae.make_server((config.host, config.port), evt_handlers=handlers,
                            ssl_context=server_ssl_context(config),
                            server_class=_SharedPortServer if reuse_port else SegnodeServer)
    limits = config.limits
    server.max_pdu = limits.max_pdu_bytes
    server.max_dataset = limits.max_instance_bytes
    server.acse_timeout, server.network_timeout = limits.acse_timeout_s, limits.network_timeout_s
    server.gate = PendingGate(limits.max_pending_connections, limits.max_pending_per_host)
    if config.tls is not None:
        server.handshake_timeout = config.tls.handshake_timeout_s
    ae._servers.append(server)  # as AE.start_server does, so AE.shutdown() stops it
    thread = threading.Thread(target=server.serve_forever, name="segnode-scp", daemon=True)
    thread.start()
    logger.info("SCP %s listening on %s:%d", config.ae_title, config.host, server.server_address[1])
    return RunningSCP(server, store, thread, ae)
