"""The DICOM SCP: C-ECHO, and C-STORE into the durable spool.

The C-STORE handler writes the bytes the peer sent as a Part 10 file without
decoding and re-encoding them (preamble, file meta from the presentation
context with the dataset's self-check, then the received dataset straight
from pynetdicom's buffer), through :meth:`storage.spool.Spool.write`
(unnamed temporary file, atomic link, data and directory sync), commits the index
row, and only then answers Success (docs/node.md, "Durability").  Only the
five identifying attributes are read, by :mod:`node.dicom_header`.  It never
raises; it answers a named status:

==========  ===========================================================
``0x0000``  stored (or a duplicate SOP Instance UID: first copy kept)
``0xA700``  out of resources: below the free-disk minimum, instance
            larger than ``limits.max_instance_bytes``, or a failed write
``0xC210``  cannot understand: the dataset does not decode
``0xC211``  cannot understand: a Study/Series/SOP Instance UID is missing
            or breaks the UID grammar
``0xC212``  cannot understand: SOP Instance UID differs from the request
==========  ===========================================================

Guards around pynetdicom: a calling AE title or host not in
``allowed_senders`` is rejected at association; a PDU longer than the
negotiated maximum (or an association request over 1 MiB) closes the
connection before it is read into memory, as does a dataset growing past
``max_instance_bytes``; the TLS handshake runs on the connection's own thread
with a timeout, so an idle TLS client never blocks the accept loop.
"""

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
from dataclasses import dataclass, field
from io import BytesIO
from typing import TYPE_CHECKING, Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.sop_class import (
    CTImageStorage,
    EnhancedCTImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
    Verification,
)
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from segnode.errors import InputError, StorageError
from segnode.node.config import NodeConfig
from segnode.node.dicom_header import read_header
from segnode.storage.index import Index, InstanceRecord
from segnode.storage.part10 import dataset_check, file_prefix
from segnode.storage.spool import Spool
from segnode.uids import check_uid

if TYPE_CHECKING:
    from segnode.node.native_scp import NativeServer

logger = logging.getLogger(__name__)

CT_FAMILY = (CTImageStorage, EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage)

#: transfer syntaxes accepted for storage: uncompressed, deflate, and the common compressed ones.
TRANSFER_SYNTAXES = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent)
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE Lossless
)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_DECODE = 0xC210
BAD_UID = 0xC211
UID_MISMATCH = 0xC212

#: largest A-ASSOCIATE-RQ (or other non-data PDU) read before the max PDU is negotiated.
MAX_CONTROL_PDU = 1024 * 1024

_HEADER_TAGS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality")

Listener = Callable[[str, dict[str, Any]], None]


@dataclass
class IngestStats:
    """Counters the ops API and metrics read (updated under ``lock``)."""

    stored: int = 0
    duplicates: int = 0
    refused: int = 0
    bytes_stored: int = 0
    associations_rejected: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **deltas: int) -> None:
        with self.lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)


@dataclass(frozen=True)
class StoreRequest:
    """What storing one instance needs besides its bytes (from pynetdicom or :mod:`node.native_scp`)."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    calling_ae: str
    called_ae: str
    host: str

    @classmethod
    def from_event(cls, event: evt.Event) -> StoreRequest:
        assoc, request = event.assoc, event.request
        return cls(str(request.AffectedSOPClassUID), str(request.AffectedSOPInstanceUID),
                   str(event.context.transfer_syntax), assoc.requestor.ae_title, assoc.acceptor.ae_title,
                   assoc.requestor.address)


#: a C-STORE outcome: the status and, for a refusal, its error comment.
StoreStatus = tuple[int, str | None]


def _status(code: int, comment: str) -> Dataset:
    out = Dataset()
    out.Status = code
    out.ErrorComment = comment[:64]
    return out


def _part10_prefix(request: StoreRequest, check: bytes | None) -> bytes:
    """Preamble, ``DICM`` and the file meta, with the dataset's self-check if given (:mod:`storage.part10`)."""
    return file_prefix(request.sop_class_uid, request.sop_instance_uid, request.transfer_syntax,
                       request.calling_ae.strip(), check)


class StoreHandler:
    """The SCP's event handlers, bound to one spool and index."""

    def __init__(self, config: NodeConfig, spool: Spool, index: Index, listener: Listener | None = None) -> None:
        self.config = config
        self.spool = spool
        self.index = index
        self.listener = listener
        self.stats = IngestStats()
        self.min_free = config.limits.min_free_disk_mb * 1024 * 1024

    def _notify(self, kind: str, **data: Any) -> None:
        if self.listener is not None:
            self.listener(kind, data)

    def admit(self, calling: str, host: str) -> bool:
        """Whether ``calling`` at ``host`` may send; a refusal is logged, counted and notified."""
        if self.config.sender_for(calling, host) is not None:
            return True
        logger.warning("rejected association from %r at %s: not an allowed sender", calling, host)
        self.stats.add(associations_rejected=1)
        self._notify("association_rejected", calling_ae=calling, host=host)
        return False

    def on_requested(self, event: evt.Event) -> None:
        """Reject at association a calling AE / host that is not allowed to send."""
        assoc = event.assoc
        if not self.admit(assoc.requestor.primitive.calling_ae_title.strip(), assoc.requestor.address):
            assoc.acse.send_reject(0x01, 0x01, 0x03)  # permanent, service user, calling AE not recognised
            assoc.kill()  # as pynetdicom does after its own rejections: lets the DUL send the A-ASSOCIATE-RJ

    def on_echo(self, event: evt.Event) -> int:
        return SUCCESS

    def on_store(self, event: evt.Event) -> int | Dataset:
        """pynetdicom's C-STORE handler: :meth:`store` on the dataset exactly as sent."""
        received = event.request.DataSet  # BytesIO holding the dataset exactly as sent
        with received.getbuffer() as dataset:  # a view: the bytes are never copied or decoded
            code, comment = self.store(StoreRequest.from_event(event), dataset)
        return code if comment is None else _status(code, comment)

    def store(self, request: StoreRequest, dataset: memoryview) -> StoreStatus:
        """Store one instance; always return a status (this is the network boundary).

        A refusal is counted and notified (``instance_refused``: the sender,
        the SOP Instance UID of the request, the status and its comment).
        """
        try:
            code, comment = self._store(request, dataset)
        except StorageError as exc:
            logger.error("store failed: %s", exc)
            code, comment = OUT_OF_RESOURCES, "write failed"
        except Exception as exc:  # boundary: the peer gets a status, the log gets the traceback
            logger.exception("unexpected error storing an instance")
            code, comment = CANNOT_DECODE, f"cannot process: {type(exc).__name__}"[:64]
        if code != SUCCESS:
            self.stats.add(refused=1)
            self._notify("instance_refused", calling_ae=request.calling_ae, host=request.host,
                         sop_uid=request.sop_instance_uid[:64], status=code, reason=comment)
        return code, comment

    def _store(self, request: StoreRequest, dataset: memoryview) -> StoreStatus:
        if dataset.nbytes > self.config.limits.max_instance_bytes:
            return OUT_OF_RESOURCES, "instance larger than the node accepts"
        if self.spool.free_bytes() - dataset.nbytes < self.min_free:
            logger.warning("refusing instance: free disk below the %d MB minimum",
                           self.config.limits.min_free_disk_mb)
            return OUT_OF_RESOURCES, "free disk below the node's minimum"
        uids = _header(request, dataset)
        if uids is None:
            return CANNOT_DECODE, "dataset cannot be decoded"
        try:
            for tag in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
                check_uid(uids.get(tag), tag)
        except InputError as exc:
            logger.warning("refusing instance: %s", exc)
            return BAD_UID, (exc.message.split(" is ")[0] + " invalid")[:64]
        if uids["SOPInstanceUID"] != request.sop_instance_uid:
            return UID_MISMATCH, "SOPInstanceUID differs from the request"
        return self._persist(request, dataset, uids)

    def _persist(self, request: StoreRequest, dataset: memoryview, uids: dict[str, str]) -> StoreStatus:
        sop_uid, study_uid, series_uid = uids["SOPInstanceUID"], uids["StudyInstanceUID"], uids["SeriesInstanceUID"]
        if self.index.has_instance(sop_uid):  # policy keep_first: acknowledge, keep the stored copy
            self.index.touch_duplicate(series_uid)
            self.stats.add(duplicates=1)
            return SUCCESS, None
        prefix = _part10_prefix(request, dataset_check(dataset))
        path = self.spool.write(study_uid, series_uid, sop_uid, (prefix, dataset), self_checking=True)
        size = len(prefix) + dataset.nbytes
        record = InstanceRecord(
            sop_uid=sop_uid, series_uid=series_uid, study_uid=study_uid,
            sop_class_uid=request.sop_class_uid, transfer_syntax_uid=request.transfer_syntax,
            modality=uids.get("Modality") or None,
            path=str(path.relative_to(self.spool.root)), size_bytes=size,
            calling_ae=request.calling_ae, called_ae=request.called_ae, sender_host=request.host,
        )
        if self.index.record_instance(record):
            self.stats.add(stored=1, bytes_stored=size)
            self._notify("instance_stored", sop_uid=sop_uid, series_uid=series_uid, size=size)
        else:
            self.stats.add(duplicates=1)
        return SUCCESS, None


def _header(request: StoreRequest, dataset: memoryview) -> dict[str, str] | None:
    """The identifying attributes, or ``None`` if the dataset does not decode (logged)."""
    try:
        values = read_header(dataset, request.transfer_syntax)
        if values is not None:
            return values
        # big endian, deflate or an unusual element before the UIDs: let pydicom read it
        part10 = _part10_prefix(request, None) + bytes(dataset)
        ds = dcmread(BytesIO(part10), stop_before_pixels=True, specific_tags=list(_HEADER_TAGS))
        return {tag: str(ds.get(tag)) for tag in _HEADER_TAGS if ds.get(tag) is not None}
    except Exception as exc:  # HeaderError, or any of pydicom's many error types: all mean "cannot decode"
        logger.warning("cannot decode instance %s: %s", request.sop_instance_uid, exc)
        return None


# -- guards around pynetdicom's transport --------------------------------------------


class GuardedSocket(AssociationSocket):
    """An :class:`AssociationSocket` that refuses oversized PDUs and datasets.

    pynetdicom's DUL reads a 6-byte PDU header, then exactly the length the
    peer declared.  Here the declared length is checked first (the negotiated
    maximum for P-DATA, :data:`MAX_CONTROL_PDU` for the rest) and the P-DATA
    fragments of one message are summed; past a limit the connection is
    closed (the DUL sees a short read and ends the association).  Reads use
    ``recv_into`` one preallocated buffer instead of 4 KiB appends.
    """

    max_pdu: int = 131072
    max_dataset: int = 1 << 30
    _header_next: bool = True
    _pdu_type: int = 0
    _dataset_bytes: int = 0

    def recv(self, nr_bytes: int) -> bytearray:
        if self._header_next and nr_bytes == 6:
            data = self._recv_exact(6)
            if len(data) == 6:
                self._pdu_type, _, length = struct.unpack(">BBL", data)
                limit = self.max_pdu + 6 if self._pdu_type == 0x04 else MAX_CONTROL_PDU
                if length > limit:
                    logger.warning("closing connection: peer declared a %d-byte PDU (limit %d)", length, limit)
                    return self._refuse()
                self._header_next = False
            return data
        self._header_next = True
        data = self._recv_exact(nr_bytes)
        if self._pdu_type == 0x04 and not self._count_pdvs(data):
            logger.warning("closing connection: dataset larger than %d bytes", self.max_dataset)
            return self._refuse()
        return data

    def _recv_exact(self, nr_bytes: int) -> bytearray:
        buf = bytearray(nr_bytes)
        view = memoryview(buf)
        got = 0
        sock = self.socket
        while got < nr_bytes and sock is not None:
            n = sock.recv_into(view[got:], nr_bytes - got)
            if not n:
                return buf[:got]
            got += n
        return buf

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

    def _refuse(self) -> bytearray:
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
        super().close()
        for end in (self._bell_rx, self._bell_tx):
            if end is not None:
                end.close()


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


def _make_prompt(assoc: Association, sock: "GuardedSocket") -> None:
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


class _GuardedRequestHandler(RequestHandler):
    def _create_association(self):  # type: ignore[no-untyped-def]
        assoc = super()._create_association()
        sock = assoc.dul.socket
        sock.__class__ = GuardedSocket  # same object and state; only recv() and ready() differ
        sock.max_pdu = self.server.max_pdu
        sock.max_dataset = self.server.max_dataset
        _make_prompt(assoc, sock)
        return assoc


class SegnodeServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the TLS handshake moved off the accept thread."""

    max_pdu = 131072
    max_dataset = 1 << 30
    handshake_timeout = 10.0
    reuse_port = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["request_handler"] = _GuardedRequestHandler
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        if self.reuse_port:  # receiver processes share the port (node/receivers.py)
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self):  # type: ignore[no-untyped-def]
        assert self.socket is not None
        client, address = self.socket.accept()  # TLS, if any, is set up in process_request_thread
        # small C-STORE responses must not wait for the peer's delayed ACK (Nagle): ~40 ms per image
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return client, address

    def process_request_thread(self, request, client_address):  # type: ignore[no-untyped-def]
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
    ae.maximum_associations = config.limits.max_associations
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

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join(timeout=5)
        if self.ae is not None:
            self.ae.shutdown()


def start_scp(config: NodeConfig, spool: Spool, index: Index, listener: Listener | None = None, *,
              reuse_port: bool = False) -> RunningSCP:
    """Listen on ``config.host:config.port`` in a background thread.

    ``reuse_port``: bind with ``SO_REUSEPORT``, so receiver processes
    (:mod:`node.receivers`) can listen on the same port.  With
    ``limits.receiver: native`` and no TLS, :mod:`node.native_scp` serves.
    """
    handler = StoreHandler(config, spool, index, listener)
    if config.limits.receiver == "native":
        if config.tls is None:
            from segnode.node.native_scp import start_native_scp  # it builds on this module

            return start_native_scp(config, handler, reuse_port=reuse_port)
        logger.info("limits.receiver is 'native', but TLS is configured: the pynetdicom receiver serves "
                    "(the native receiver is plain TCP only)")
    ae = build_ae(config)
    handlers = [
        (evt.EVT_REQUESTED, handler.on_requested),
        (evt.EVT_C_ECHO, handler.on_echo),
        (evt.EVT_C_STORE, handler.on_store),
    ]
    server = ae.make_server((config.host, config.port), evt_handlers=handlers,
                            ssl_context=server_ssl_context(config),
                            server_class=_SharedPortServer if reuse_port else SegnodeServer)
    server.max_pdu = config.limits.max_pdu_bytes
    server.max_dataset = config.limits.max_instance_bytes
    if config.tls is not None:
        server.handshake_timeout = config.tls.handshake_timeout_s
    ae._servers.append(server)  # as AE.start_server does, so AE.shutdown() stops it
    thread = threading.Thread(target=server.serve_forever, name="segnode-scp", daemon=True)
    thread.start()
    logger.info("SCP %s listening on %s:%d", config.ae_title, config.host, server.server_address[1])
    return RunningSCP(server, handler, thread, ae)
