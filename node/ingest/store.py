"""The store path every receiver uses: one instance's bytes → the durable spool and the index.

C-STORE (:mod:`segnode.node.dicom_in`) and STOW-RS (:mod:`segnode.node.http_in.stow`)
hand the dataset exactly as received to :meth:`StoreHandler.store`, which writes
it as a Part 10 file without decoding and re-encoding it (preamble, file meta
from the presentation context with the dataset's self-check, then the received
dataset), through :class:`segnode.storage.group_commit.GroupCommit` (the spool's
unnamed temporary file, atomic link, data and directory syncs, then the index
row, in one transaction with the rows of the instances that arrive at the same
time: group commit), and only then answers Success (docs/node.md,
"Durability").  Only the five identifying attributes are read, by
:mod:`segnode.node.ingest.header` (of a deflated dataset: by
:mod:`segnode.node.ingest.inflate`, from a bounded inflated prefix, the rest
inflated only to be counted against ``limits.max_instance_bytes``,
never held).  It never raises; it answers a named status of
:class:`segnode.node.status.Status` (as a :class:`segnode.node.status.Refusal`,
with the metric reason it is counted under):

==========  ===========================================================
``0x0000``  stored (or a duplicate SOP Instance UID: first copy kept)
``0x0122``  refused, SOP class not supported: the request's SOP class is not
            the accepted context's abstract syntax, or not a storage class
            this node is configured for
``0xA700``  out of resources: below the free-disk minimum (``disk_full``),
            instance (or its inflated dataset) larger than
            ``limits.max_instance_bytes`` (``too_large``), a failed write
            (``write_failed``), or an internal error (``internal_error``:
            logged with its traceback; the comment says so, and the sender
            may retry)
``0xA900``  data set does not match SOP class: the dataset's SOP Class UID
            differs from the request's
``0xC210``  cannot understand: the dataset does not decode, or the structural
            walk (:mod:`segnode.node.ingest.walk`) finds it cut short or
            malformed (the comment says where); nothing is written
``0xC211``  cannot understand: a SOP Class/Instance, Study or Series UID (of
            the request or the dataset) is missing or breaks the UID grammar
``0xC212``  cannot understand: SOP Instance UID differs from the request
==========  ===========================================================

What happens is emitted as typed events (:mod:`segnode.node.events`) into the
handler's sink: :class:`~segnode.node.events.InstanceStored`,
:class:`~segnode.node.events.InstanceRefused` (status, reason, comment) and
:class:`~segnode.node.events.AssociationReleased`.  No transport code here:
the receivers (:mod:`segnode.node.dicom_in.receiver`, STOW-RS) call it.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from io import BytesIO
from typing import NamedTuple, Protocol

from pydicom import dcmread
from pydicom.uid import (
    CTImageStorage,
    EnhancedCTImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
)
from segnode.errors import InputError, StorageError
from segnode.node.config import NodeConfig
from segnode.node.events import (
    AssociationReleased,
    Event,
    EventSink,
    InstanceRefused,
    InstanceStored,
    discard,
)
from segnode.node.ingest.header import read_header
from segnode.node.ingest.inflate import DEFLATED, InflatesTooLarge, inflated_header
from segnode.node.ingest.walk import walk_dataset
from segnode.node.status import Refusal, Status
from segnode.storage.group_commit import GroupCommit
from segnode.storage.index import Index, InstanceRecord
from segnode.storage.part10 import dataset_check, file_prefix
from segnode.storage.spool import Spool
from segnode.uids import check_uid, is_valid_uid

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

#: the refusals of the store path (status, metric reason, Error Comment)
TOO_LARGE = Refusal(Status.OUT_OF_RESOURCES, "instance larger than the node accepts", "too_large")
INFLATES_TOO_LARGE = Refusal(Status.OUT_OF_RESOURCES, "inflated instance larger than the node accepts", "too_large")
DISK_FULL = Refusal(Status.OUT_OF_RESOURCES, "free disk below the node's minimum", "disk_full")
WRITE_FAILED = Refusal(Status.OUT_OF_RESOURCES, "write failed", "write_failed")
CANNOT_DECODE = Refusal(Status.CANNOT_DECODE, "dataset cannot be decoded")
NOT_ON_THIS_CONTEXT = Refusal(Status.SOP_CLASS_NOT_SUPPORTED, "SOP class not accepted on this context")
SOP_CLASS_DIFFERS = Refusal(Status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS, "SOPClassUID differs from the request")
INSTANCE_DIFFERS = Refusal(Status.UID_MISMATCH, "SOPInstanceUID differs from the request")
STUDY_DIFFERS = Refusal(Status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS, "StudyInstanceUID differs from the request's study",
                        "study_mismatch")
NOT_REQUESTED = Refusal(Status.CANNOT_UNDERSTAND, "not of the series this node's C-MOVE asked for", "not_requested")


def internal_error(exc: BaseException) -> Refusal:
    """Our fault, not the sender's: it may retry (the log has the traceback)."""
    return Refusal(Status.OUT_OF_RESOURCES, f"internal error ({type(exc).__name__}), retry later"[:64],
                   "internal_error")


def invalid_uid(what: str) -> Refusal:
    return Refusal(Status.INVALID_UID, f"{what} invalid"[:64])


_HEADER_TAGS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality")


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
    """What storing one instance needs besides its bytes (from either receiver)."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    calling_ae: str
    called_ae: str
    host: str
    abstract_syntax: str  # of the presentation context the instance came on
    session: int = 0  # which association (its object's id): completion on evidence needs its release
    study_uid: str | None = None  # STOW-RS to /studies/{study}: the study every instance must belong to
    author: str | None = None  # who stored it (logged-in user or DICOMweb client): a correction's author
    #: the C-STORE's Move Originator AE Title and Message ID (a C-MOVE sub-operation), else None
    move_originator: tuple[str, int] | None = None


#: Segmentation Storage and Label Map Segmentation Storage: a SEG may be a correction (node/corrections.py)
SEG_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7"})


class CorrectionHook(Protocol):
    """Checks a SEG as a correction before it is stored (:class:`segnode.node.corrections.Corrections`)."""

    def stored_seg(self, part10: bytes, author: str) -> Refusal | None: ...


class StoreStatus(NamedTuple):
    """A C-STORE outcome: the status and, for a refusal, its Error Comment."""

    status: Status
    comment: str | None


STORED = StoreStatus(Status.SUCCESS, None)




def _part10_prefix(request: StoreRequest, check: bytes | None) -> bytes:
    """Preamble, ``DICM`` and the file meta, with the dataset's self-check if given (:mod:`segnode.storage.part10`)."""
    return file_prefix(request.sop_class_uid, request.sop_instance_uid, request.transfer_syntax,
                       request.calling_ae.strip(), check)




class StoreHandler:
    """The store path, bound to one spool and index; what happens goes to ``events``."""

    def __init__(self, config: NodeConfig, spool: Spool, index: Index, events: EventSink = discard) -> None:
        self.config = config
        self.spool = spool
        self.index = index
        self.events = events
        self.stats = IngestStats()
        self.min_free = config.limits.min_free_disk_mb * 1024 * 1024
        self.storage_classes = frozenset(map(str, (*CT_FAMILY, *config.storage_classes)))
        self.committer = GroupCommit(spool, index)  # instances arriving together share syncs and a transaction
        self._sessions: dict[int, set[str]] = {}  # association → series it stored (or re-sent) instances of
        self._sessions_lock = threading.Lock()
        self.corrections: CorrectionHook | None = None  # set by the service: a stored SEG may correct a job

    def association_ended(self, session: int, *, released: bool) -> None:
        """An association ended: with an A-RELEASE, its series are marked released (completion evidence).

        An aborted or broken association gives no evidence; its series wait for the quiet period.
        """
        with self._sessions_lock:
            series = self._sessions.pop(session, set())
        if not released or not series:
            return
        try:
            self.index.mark_released(sorted(series))
        except StorageError as exc:  # the quiet period still completes them
            logger.error("could not record the release of %d series: %s", len(series), exc)
            return
        self.emit(AssociationReleased(tuple(sorted(series))))

    def _stored_in(self, session: int, series_uid: str) -> None:
        with self._sessions_lock:
            self._sessions.setdefault(session, set()).add(series_uid)

    def emit(self, event: Event) -> None:
        """``event`` into the sink (a failing sink is logged: it never changes what a sender is answered)."""
        try:
            self.events(event)
        except Exception:  # boundary: a failing metrics or audit sink must not change what the sender is answered
            logger.exception("event sink failed on %s", type(event).__name__)

    def admit(self, calling: str, host: str) -> bool:
        """Whether ``calling`` at ``host`` may send; a refusal is logged and counted (the receiver emits it)."""
        if self.config.sender_for(calling, host) is not None:
            return True
        logger.warning("rejected association from %r at %s: not an allowed sender", calling, host)
        self.stats.add(associations_rejected=1)
        return False

    def store(self, request: StoreRequest, dataset: memoryview) -> StoreStatus:
        """Store one instance; always return a status (this is the network boundary).

        A refusal is counted and emitted (:class:`~segnode.node.events.InstanceRefused`:
        the sender, the SOP Instance UID of the request, the status, its reason and comment).
        """
        try:
            refusal = self._store(request, dataset)
        except StorageError as exc:
            logger.error("store failed: %s", exc)
            refusal = WRITE_FAILED
        except Exception as exc:  # boundary: our fault, not the sender's; it may retry, the log has the traceback
            logger.exception("internal error storing instance %s", request.sop_instance_uid[:64])
            refusal = internal_error(exc)
        if refusal is None:
            return STORED
        self.stats.add(refused=1)
        self.emit(InstanceRefused(refusal.status, refusal.reason, refusal.comment, request.calling_ae,
                                    request.host, request.sop_instance_uid[:64]))
        return StoreStatus(refusal.status, refusal.comment)

    def _store(self, request: StoreRequest, dataset: memoryview) -> Refusal | None:
        limit = self.config.limits.max_instance_bytes
        if dataset.nbytes > limit:
            return TOO_LARGE
        if self.spool.free_bytes() - dataset.nbytes < self.min_free:
            logger.warning("refusing instance: free disk below the %d MB minimum",
                           self.config.limits.min_free_disk_mb)
            return DISK_FULL
        refusal = self._check_request(request)
        if refusal is not None:
            return refusal
        try:
            uids = _header(request, dataset, limit)
        except InflatesTooLarge:
            logger.warning("refusing instance %s: its deflated dataset inflates past %d bytes",
                           request.sop_instance_uid, limit)
            return INFLATES_TOO_LARGE
        fault = walk_dataset(dataset, request.transfer_syntax, request.sop_class_uid, inflate_limit=limit)
        if fault is not None:  # cut short or malformed: refused before anything is written
            logger.warning("refusing instance %s: %s", request.sop_instance_uid, fault)
            return Refusal(Status.CANNOT_DECODE, fault)
        if uids is None:
            return CANNOT_DECODE
        refusal = self._check_dataset(request, uids) or self._correction(request, dataset, uids)
        if refusal is None:
            self._persist(request, dataset, uids)
        return refusal

    def _correction(self, request: StoreRequest, dataset: memoryview, uids: dict[str, str]) -> Refusal | None:
        """A SEG new to the node is checked as a correction (taken, or refused with the reason) before it is stored."""
        if (self.corrections is None or request.sop_class_uid not in SEG_CLASSES
                or self.index.has_instance(uids["SOPInstanceUID"])):
            return None
        part10 = _part10_prefix(request, None) + bytes(dataset)
        return self.corrections.stored_seg(part10, request.author or request.calling_ae.strip())

    def _check_request(self, request: StoreRequest) -> Refusal | None:
        """The command's UIDs, and its SOP class against its context and the classes this node stores."""
        for value, what in ((request.sop_class_uid, "AffectedSOPClassUID"),
                            (request.sop_instance_uid, "AffectedSOPInstanceUID")):
            if not is_valid_uid(value):
                logger.warning("refusing instance: %s %r breaks the UID grammar", what, value[:80])
                return invalid_uid(what)
        if request.sop_class_uid != request.abstract_syntax or request.sop_class_uid not in self.storage_classes:
            logger.warning("refusing instance %s: SOP class %s on a %s context", request.sop_instance_uid,
                           request.sop_class_uid, request.abstract_syntax)
            return NOT_ON_THIS_CONTEXT
        return None

    def _check_dataset(self, request: StoreRequest, uids: dict[str, str]) -> Refusal | None:
        try:
            for tag in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
                check_uid(uids.get(tag), tag)
        except InputError as exc:
            logger.warning("refusing instance: %s", exc)
            return invalid_uid(exc.message.split(" is ")[0])
        if uids["SOPClassUID"] != request.sop_class_uid:
            return SOP_CLASS_DIFFERS
        if uids["SOPInstanceUID"] != request.sop_instance_uid:
            return INSTANCE_DIFFERS
        if request.study_uid is not None and uids["StudyInstanceUID"] != request.study_uid:
            return STUDY_DIFFERS
        return self._check_move(request, uids)

    def _check_move(self, request: StoreRequest, uids: dict[str, str]) -> Refusal | None:
        """A sub-operation of a C-MOVE the node asked for stores only the series asked for (Index.expect_move)."""
        if request.move_originator is None or request.move_originator[0].strip() != self.config.ae_title:
            return None  # a push, or a move another AE asked the peer for
        expected = self.index.expected_move(request.move_originator[1])
        if expected != (uids["StudyInstanceUID"], uids["SeriesInstanceUID"]):
            logger.warning("refusing instance %s from %s: not of a series the node's C-MOVE %d asked for",
                           request.sop_instance_uid, request.calling_ae, request.move_originator[1])
            return NOT_REQUESTED
        return None

    def _persist(self, request: StoreRequest, dataset: memoryview, uids: dict[str, str]) -> None:
        """Spool and index the instance (a duplicate SOP Instance UID: acknowledged, first copy kept)."""
        sop_uid, study_uid, series_uid = uids["SOPInstanceUID"], uids["StudyInstanceUID"], uids["SeriesInstanceUID"]
        self._stored_in(request.session, series_uid)
        if self.index.holds_instance(sop_uid):  # policy keep_first: acknowledge, keep the stored copy
            self.index.touch_duplicate(series_uid)
            self.stats.add(duplicates=1)
            return None
        prefix = _part10_prefix(request, dataset_check(dataset))
        size = len(prefix) + dataset.nbytes
        path = self.spool.instance_path(study_uid, series_uid, sop_uid)
        record = InstanceRecord(
            sop_uid=sop_uid, series_uid=series_uid, study_uid=study_uid,
            sop_class_uid=request.sop_class_uid, transfer_syntax_uid=request.transfer_syntax,
            modality=uids.get("Modality") or None,
            path=str(path.relative_to(self.spool.root)), size_bytes=size,
            calling_ae=request.calling_ae, called_ae=request.called_ae, sender_host=request.host,
        )
        if self.committer.commit((prefix, dataset), record):  # durable and indexed (group commit) before the answer
            self.stats.add(stored=1, bytes_stored=size)
            self.emit(InstanceStored(sop_uid, series_uid, size))
        else:
            self.stats.add(duplicates=1)


def _header(request: StoreRequest, dataset: memoryview, limit: int) -> dict[str, str] | None:
    """The identifying attributes, or ``None`` if the dataset does not decode (logged)."""
    try:
        if request.transfer_syntax == DEFLATED:
            return inflated_header(dataset, limit)
        values = read_header(dataset, request.transfer_syntax)
        if values is not None:
            return values
        # big endian or an unusual element before the UIDs: let pydicom read it
        part10 = _part10_prefix(request, None) + bytes(dataset)
        ds = dcmread(BytesIO(part10), stop_before_pixels=True, specific_tags=list(_HEADER_TAGS))
        return {tag: str(ds.get(tag)) for tag in _HEADER_TAGS if ds.get(tag) is not None}
    except InflatesTooLarge:
        raise
    except Exception as exc:  # HeaderError, zlib.error, or any of pydicom's many error types: "cannot decode"
        logger.warning("cannot decode instance %s: %s", request.sop_instance_uid, exc)
        return None
