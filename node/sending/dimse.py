"""C-STORE of a job's files, and C-ECHO, to a DIMSE destination (pynetdicom as SCU, public API only).

All objects of one delivery go in one association, each with its own result,
so that a retry re-sends only what was not stored; files are sent as stored,
without decoding.  The association proposes one presentation context per
(SOP class, transfer syntax) of the files; a file whose context the
destination refuses fails permanently on its own, the others are still sent.

Every try is bounded (:class:`~segnode.node.sending.sender.Deadlines`): the
TCP connect by ``connect_s``, each wait for the peer (A-ASSOCIATE-AC, a
C-STORE response, any PDU) by ``response_s``, and the whole try by
``attempt_s``, after which the association is aborted and what was not
stored is retryable.  A peer that accepts TCP and never answers therefore
ends the try after ``connect_s + response_s`` at most.  The A-ASSOCIATE-RQ
carries segnode's own Implementation Class UID and Version Name
(:mod:`segnode.identity`).

What is worth retrying: no connection, a timeout, a transient association
rejection, an abort, and a status the table (:mod:`segnode.node.status`)
calls retryable (``0xA7xx``, out of resources).  A permanent rejection, no
accepted presentation context for the object's SOP class, or any other
failure status is not.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from pydicom import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID
from pynetdicom import AE, evt
from pynetdicom.association import Association
from segnode.errors import DispatchError
from segnode.identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from segnode.node.association import close_unestablished
from segnode.node.config import Destination
from segnode.node.sending.sender import Deadlines, SendResult
from segnode.node.status import Category, category

logger = logging.getLogger(__name__)

#: A-ASSOCIATE-RJ result 1: rejected permanently (PS3.8 9.3.4)
_REJECTED_PERMANENT = 0x01
#: the Verification SOP Class (PS3.4 A.4), for C-ECHO
_VERIFICATION = "1.2.840.10008.1.1"


class DimseSender:
    """C-STORE/C-ECHO to one DIMSE destination (``ae_title``, ``host``, ``port``, optional ``tls``)."""

    def __init__(self, dest: Destination, *, calling_ae: str, deadlines: Deadlines) -> None:
        if dest.ae_title is None or dest.host is None or dest.port is None:
            raise DispatchError("destination has no ae_title/host/port", where=dest.name)
        self.name = dest.name
        self.ae_title, self.host, self.port = dest.ae_title, dest.host, dest.port
        self.tls = dest.tls
        self.calling_ae = calling_ae
        self.deadlines = deadlines

    def send(self, paths: Sequence[Path]) -> list[SendResult]:
        """C-STORE every Part 10 file of ``paths`` in one association; one result per path, in order."""
        if not paths:
            return []
        metas = [_meta(path) for path in paths]
        ae = self._ae()
        for sop_class, syntax in dict.fromkeys((str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID))
                                               for m in metas):
            ae.add_requested_context(sop_class, [syntax])
        started = time.monotonic()
        assoc = self._associate(ae)
        if isinstance(assoc, SendResult):
            return [assoc] * len(paths)
        expired = threading.Event()
        timer = threading.Timer(max(0.0, self.deadlines.attempt_s - (time.monotonic() - started)),
                                _expire, (assoc, expired))
        timer.daemon = True
        timer.start()
        try:
            accepted = {(str(cx.abstract_syntax), str(ts)) for cx in assoc.accepted_contexts
                        for ts in cx.transfer_syntax}
            return [self._store_one(assoc, path, meta, accepted, expired) for path, meta in zip(paths, metas)]
        finally:
            timer.cancel()
            if assoc.is_established:
                assoc.release()

    def echo(self) -> SendResult:
        """C-ECHO the destination."""
        ae = self._ae()
        ae.add_requested_context(_VERIFICATION)
        assoc = self._associate(ae)
        if isinstance(assoc, SendResult):
            return assoc
        try:
            status = assoc.send_c_echo()
        finally:
            if assoc.is_established:
                assoc.release()
        code = _status(status)
        if code == 0x0000:
            return SendResult.stored("echo succeeded", code)
        return SendResult.retry("no echo response" if code is None else f"echo status 0x{code:04X}", code)

    # -- one association ----------------------------------------------------------------
    def _ae(self) -> AE:
        ae = AE(ae_title=self.calling_ae)
        ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        ae.connection_timeout = min(self.deadlines.connect_s, self.deadlines.attempt_s)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self._response_s
        return ae

    @property
    def _response_s(self) -> float:
        return min(self.deadlines.response_s, self.deadlines.attempt_s)

    def associate(self, contexts: Sequence[str], handlers: Sequence[evt.EventHandlerType] = ()
                  ) -> Association | SendResult:
        """An association proposing ``contexts`` (default transfer syntaxes), with ``handlers`` bound; or why not."""
        ae = self._ae()
        for abstract in contexts:
            ae.add_requested_context(abstract)
        return self._associate(ae, handlers)

    def _associate(self, ae: AE, handlers: Sequence[evt.EventHandlerType] = ()) -> Association | SendResult:
        """The established association, or why there is none."""
        started = time.monotonic()
        connected = threading.Event()
        tls = self.tls.tls_args(self.host) if self.tls else None
        assoc = ae.associate(self.host, self.port, ae_title=self.ae_title, tls_args=tls,
                             evt_handlers=[(evt.EVT_CONN_OPEN, lambda event: connected.set()), *handlers])
        if assoc.is_established:
            return assoc
        close_unestablished(assoc)
        if assoc.is_rejected:
            answer = assoc.acceptor.primitive
            result = answer.result if answer is not None else None
            reason = answer.diagnostic if answer is not None else None
            if result == _REJECTED_PERMANENT:
                return SendResult.refused(f"association rejected permanently (reason {reason})")
            return SendResult.retry(f"association rejected transiently (reason {reason})")
        if assoc.is_aborted and assoc.rejected_contexts and not assoc.accepted_contexts:
            # accepted, but with every context refused: pynetdicom then aborts by itself
            return SendResult.refused("destination accepts no presentation context for this SOP class")
        if not connected.is_set():
            return SendResult.retry(f"cannot connect to {self.host}:{self.port}")
        if time.monotonic() - started >= self._response_s:
            return SendResult.retry(f"no answer to the association request within {self._response_s:g} s")
        return SendResult.retry("association aborted by the destination")

    def _store_one(self, assoc: Association, path: Path, meta: Dataset, accepted: set[tuple[str, str]],
                   expired: threading.Event) -> SendResult:
        sop_class = str(meta.MediaStorageSOPClassUID)
        if (sop_class, str(meta.TransferSyntaxUID)) not in accepted:
            return SendResult.refused("destination accepts no presentation context for this SOP class "
                                      f"({_class_name(sop_class)})")
        if expired.is_set():
            return SendResult.retry(f"attempt deadline ({self.deadlines.attempt_s:g} s) passed before this object")
        if not assoc.is_established:
            return SendResult.retry("association lost before this object was sent")
        answer = assoc.send_c_store(path)
        code = _status(answer)
        if code is None:
            why = f"attempt deadline ({self.deadlines.attempt_s:g} s) passed" if expired.is_set() else \
                "timeout or abort"
            return SendResult.retry(f"no C-STORE response ({why})")
        if category(code) is Category.STORED:
            return SendResult.stored(f"stored (status 0x{code:04X})", code)
        comment = f" ({answer.ErrorComment})" if "ErrorComment" in answer else ""
        return SendResult(category(code), f"C-STORE refused with status 0x{code:04X}{comment}", code)


def _expire(assoc: Association, expired: threading.Event) -> None:
    """The attempt deadline: abort the association (a C-STORE waiting for its response returns at once)."""
    expired.set()
    if assoc.is_established:
        logger.warning("aborting the association to %s: attempt deadline passed", assoc.acceptor.ae_title)
        assoc.abort()


def _status(answer: Dataset) -> int | None:
    """The Status of a DIMSE response; None for the empty dataset pynetdicom returns on timeout or abort."""
    return int(answer.Status) if "Status" in answer else None


def _meta(path: Path) -> Dataset:
    try:
        return read_file_meta_info(path)
    except (OSError, ValueError) as exc:
        raise DispatchError(f"cannot read the file to send: {exc}", where=str(path)) from exc


def _class_name(uid: str) -> str:
    name = UID(uid).name
    return name if name and name != uid else uid
