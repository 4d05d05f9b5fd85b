"""A DIMSE source: C-FIND (Study Root, STUDY and SERIES levels), then C-MOVE or C-GET of one series.

C-MOVE names the node's own AE title as the destination: the PACS opens an
association to the node's receiver, whose store path stores the instances
like any push.  C-GET asks for the instances on the same association, in the
Storage SCP role; each is handed to :class:`segnode.node.ingest.store.StoreHandler`
(``calling_ae`` is the PACS's AE title) and one that is not of the requested
study and series is refused (``0xC000``, counted as ``refused``).

Bounds (``sources[]`` keys): a query returning more than ``max_results``
matches is cancelled (C-CANCEL, then the association aborted) and raises; a
retrieve that runs past ``retrieve_timeout_s`` is cancelled the same way; a
peer silent for ``idle_timeout_s`` during a retrieve (``query_timeout_s``
during a query) is aborted.  Every failure is a :class:`SourceError` naming
the source, what was asked and the peer's status.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from pydicom import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from segnode.identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from segnode.node.association import close_unestablished
from segnode.node.config.sources import SourceConfig
from segnode.node.ingest.header import read_header
from segnode.node.ingest.store import TRANSFER_SYNTAXES, StoreHandler, StoreRequest
from segnode.node.sources.answers import series_match, study_identifier, study_match
from segnode.node.sources.source import (
    NoMatchError,
    RetrieveResult,
    SeriesMatch,
    SourceError,
    StudyMatch,
    StudyQuery,
)
from segnode.node.status import Status

logger = logging.getLogger(__name__)

#: the Study Root query/retrieve models (PS3.4 C.6.2)
StudyRootQueryRetrieveInformationModelFind = "1.2.840.10008.5.1.4.1.2.2.1"
StudyRootQueryRetrieveInformationModelMove = "1.2.840.10008.5.1.4.1.2.2.2"
StudyRootQueryRetrieveInformationModelGet = "1.2.840.10008.5.1.4.1.2.2.3"
PENDING = (0xFF00, 0xFF01)
CANCELLED = 0xFE00
MOVE_DESTINATION_UNKNOWN = 0xA801
#: the C-STORE status answered on a C-GET association for an instance that was not asked for
NOT_REQUESTED = Status.CANNOT_UNDERSTAND
#: how long a cancelled retrieve may take to end before the association is aborted
CANCEL_GRACE_S = 2.0


class DimseSource:
    """A PACS reached by DIMSE (``kind: dimse``)."""

    def __init__(self, settings: SourceConfig, *, node_ae: str, store: StoreHandler | None = None) -> None:
        self.settings = settings
        self.name = settings.name
        self.node_ae = node_ae
        self.store = store

    # -- queries ------------------------------------------------------------------------
    def find_studies(self, query: StudyQuery) -> list[StudyMatch]:
        answers = self._find(study_identifier(query), query.describe())
        if not answers:
            raise NoMatchError(f"source {self.name}: no study matches {query.describe()}")
        return [study_match(a) for a in answers if a.get("StudyInstanceUID")]

    def find_series(self, study_uid: str) -> list[SeriesMatch]:
        ds = Dataset()
        ds.QueryRetrieveLevel = "SERIES"
        ds.StudyInstanceUID = study_uid
        for keyword in ("SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription",
                        "NumberOfSeriesRelatedInstances"):
            setattr(ds, keyword, "")
        answers = self._find(ds, f"the series of study {study_uid}")
        return [series_match(study_uid, a) for a in answers if a.get("SeriesInstanceUID")]

    def _find(self, identifier: Dataset, what: str) -> list[Dataset]:
        """The C-FIND matches, at most ``max_results`` (more: cancelled, then :class:`SourceError`)."""
        cap = self.settings.max_results
        found: list[Dataset] = []
        with self._association([StudyRootQueryRetrieveInformationModelFind], self.settings.query_timeout_s) as assoc:
            for status, answer in assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind):
                code = _code(status)
                if code in PENDING and answer is not None:
                    found.append(answer)
                    if len(found) > cap:
                        _cancel(assoc, StudyRootQueryRetrieveInformationModelFind)
                        raise SourceError(f"source {self.name}: the query for {what} returned more than {cap} "
                                          f"matches; cancelled at the bound (sources[].max_results): narrow it")
                elif code is None:
                    raise SourceError(f"source {self.name}: no answer to the query for {what} within "
                                      f"{self.settings.query_timeout_s:g} s; association aborted")
                elif code != 0x0000:
                    raise SourceError(f"source {self.name}: the query for {what} failed with status "
                                      f"0x{code:04X}{_comment(status)}")
        return found

    # -- retrieve -----------------------------------------------------------------------
    def retrieve_series(self, study_uid: str, series_uid: str) -> RetrieveResult:
        ds = Dataset()
        ds.QueryRetrieveLevel = "SERIES"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        if self.settings.retrieve.value == "get":
            return self._get(ds)
        return self._move(ds)

    def _move(self, identifier: Dataset) -> RetrieveResult:
        model = StudyRootQueryRetrieveInformationModelMove
        # the node's receiver stores this move's sub-operations only if they are of the series asked for:
        # the move's Message ID is registered in the node's index (without a store path: a move to another SCP)
        index = self.store.index if self.store is not None else None
        expires = time.time() + self.settings.retrieve_timeout_s + self.settings.idle_timeout_s
        message_id = index.expect_move(identifier.StudyInstanceUID, identifier.SeriesInstanceUID, expires) \
            if index is not None else 1
        try:
            with self._association([model], self.settings.idle_timeout_s) as assoc, \
                    _deadline(assoc, model, self.settings.retrieve_timeout_s, message_id) as expired:
                final = _last(assoc.send_c_move(identifier, self.node_ae, model, msg_id=message_id))
        finally:
            if index is not None:
                index.end_move(message_id)
        return self._result(identifier, "move", final, expired.is_set(), refused=0)

    def _get(self, identifier: Dataset) -> RetrieveResult:
        if self.store is None:
            raise SourceError(f"source {self.name}: C-GET needs the node's store path (run it inside the node)")
        model = StudyRootQueryRetrieveInformationModelGet
        guard = _RequestedOnly(self.store, identifier, self.settings, self.node_ae)
        with self._association([model], self.settings.idle_timeout_s, storage=self.store.storage_classes,
                               on_store=guard.handle) as assoc, \
                _deadline(assoc, model, self.settings.retrieve_timeout_s) as expired:
            guard.session = id(assoc)
            final = _last(assoc.send_c_get(identifier, model))
        self.store.association_ended(guard.session, released=_code(final) == 0x0000 and not expired.is_set())
        return self._result(identifier, "get", final, expired.is_set(), refused=guard.refused)

    def _result(self, identifier: Dataset, method: str, final: Dataset | None, expired: bool,
                refused: int) -> RetrieveResult:
        what = f"series {identifier.SeriesInstanceUID}"
        code = _code(final)
        if expired:
            raise SourceError(f"source {self.name}: the retrieve of {what} ran past "
                              f"{self.settings.retrieve_timeout_s:g} s (sources[].retrieve_timeout_s); cancelled")
        if code is None:
            raise SourceError(f"source {self.name}: no response during the retrieve of {what} for "
                              f"{self.settings.idle_timeout_s:g} s (sources[].idle_timeout_s); association aborted")
        if code == MOVE_DESTINATION_UNKNOWN:
            raise SourceError(f"source {self.name} refuses the move destination {self.node_ae!r} (status 0xA801, "
                              f"move destination unknown): the PACS must know the node's AE title, host and port")
        assert final is not None
        result = RetrieveResult(identifier.StudyInstanceUID, identifier.SeriesInstanceUID, method,
                                completed=_count(final, "NumberOfCompletedSuboperations"),
                                failed=_count(final, "NumberOfFailedSuboperations"),
                                warning=_count(final, "NumberOfWarningSuboperations"), refused=refused)
        if code not in (0x0000, 0xB000) and method == "move" and result.completed + result.failed == 0:
            raise SourceError(f"source {self.name} refused to move {what} to {self.node_ae!r} (status 0x{code:04X}"
                              f"{_comment(final)}, nothing sent): does the PACS know the node's AE title, host "
                              "and port? (Orthanc answers 0xC000 for an unknown move destination)")
        if code not in (0x0000, 0xB000):
            raise SourceError(f"source {self.name}: the {method} of {what} failed with status 0x{code:04X}"
                              f"{_comment(final)} ({result.completed} stored, {result.failed} failed)")
        return result

    # -- associations -------------------------------------------------------------------
    @contextmanager
    def _association(self, models: list[str], timeout_s: float, *, storage: frozenset[str] = frozenset(),
                     on_store: Callable[[Event], Dataset] | None = None) -> Iterator[Association]:
        ae = self._ae(models, timeout_s, storage)
        # pynetdicom's parameter types are invariant lists of unions: annotated as such here
        handlers: list[Any] = [(evt.EVT_C_STORE, on_store)] if on_store is not None else []
        roles: list[Any] = [build_role(uid, scp_role=True) for uid in sorted(storage)]
        s = self.settings
        assert s.host is not None and s.port is not None and s.ae_title is not None
        assoc = ae.associate(s.host, s.port, ae_title=s.ae_title, ext_neg=roles or None, evt_handlers=handlers,
                             tls_args=s.tls.tls_args(s.host) if s.tls else None)
        if not assoc.is_established:
            close_unestablished(assoc)
            why = "rejected the association" if assoc.is_rejected else "could not be reached or aborted"
            raise SourceError(f"source {self.name} ({s.ae_title}@{s.host}:{s.port}) {why}")
        try:
            yield assoc
        finally:
            if assoc.is_established:
                assoc.release()
            ae.shutdown()

    def _ae(self, models: list[str], timeout_s: float, storage: frozenset[str]) -> AE:
        ae = AE(ae_title=self.settings.calling_ae_title or self.node_ae)
        ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        ae.connection_timeout = self.settings.connect_timeout_s
        ae.acse_timeout = self.settings.query_timeout_s
        ae.dimse_timeout = ae.network_timeout = timeout_s
        for model in models:
            ae.add_requested_context(model)
        for uid in sorted(storage):
            ae.add_requested_context(uid, list(TRANSFER_SYNTAXES))
        return ae


class _RequestedOnly:
    """The C-STORE handler of a C-GET association: the requested series into the store path, nothing else."""

    def __init__(self, store: StoreHandler, identifier: Dataset, settings: SourceConfig, node_ae: str) -> None:
        self.store, self.settings, self.node_ae = store, settings, node_ae
        self.study_uid, self.series_uid = identifier.StudyInstanceUID, identifier.SeriesInstanceUID
        self.session = 0
        self.refused = 0

    def handle(self, event: Event) -> Dataset:
        data = memoryview(event.encoded_dataset(include_meta=False))
        ts = str(event.context.transfer_syntax)
        primitive = event.request
        assert isinstance(primitive, C_STORE)
        header = _header(data, ts)
        if header.get("SeriesInstanceUID") != self.series_uid or header.get("StudyInstanceUID") != self.study_uid:
            self.refused += 1
            logger.warning("source %s sent instance %s of series %s, not asked for: refused", self.settings.name,
                           primitive.AffectedSOPInstanceUID, header.get("SeriesInstanceUID"))
            return _status(NOT_REQUESTED, "instance not of the requested series")
        request = StoreRequest(sop_class_uid=str(primitive.AffectedSOPClassUID),
                               sop_instance_uid=str(primitive.AffectedSOPInstanceUID), transfer_syntax=ts,
                               calling_ae=self.settings.ae_title or "", called_ae=self.node_ae,
                               host=self.settings.host or "", abstract_syntax=str(event.context.abstract_syntax),
                               session=self.session)
        outcome = self.store.store(request, data)
        return _status(outcome.status, outcome.comment)


def _header(data: memoryview, transfer_syntax: str) -> dict[str, str]:
    try:
        return read_header(data, transfer_syntax) or {}
    except ValueError:
        return {}


def _status(code: int, comment: str | None) -> Dataset:
    ds = Dataset()
    ds.Status = int(code)
    if comment:
        ds.ErrorComment = comment[:64]
    return ds


@contextmanager
def _deadline(assoc: Association, model: str, seconds: float, message_id: int = 1) -> Iterator[threading.Event]:
    """Cancel the operation on ``assoc`` (C-CANCEL, then abort) if it is still running after ``seconds``."""
    expired, done = threading.Event(), threading.Event()

    def expire() -> None:
        expired.set()
        _cancel(assoc, model, done, message_id)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    try:
        yield expired
    finally:
        done.set()
        timer.cancel()


def _cancel(assoc: Association, model: str, done: threading.Event | None = None, message_id: int = 1) -> None:
    """C-CANCEL the running request (``message_id``); abort unless it ends within :data:`CANCEL_GRACE_S`."""
    if assoc.is_established:
        assoc.send_c_cancel(message_id, query_model=model)
    if done is None or not done.wait(CANCEL_GRACE_S):
        assoc.abort()


def _last(responses: Iterator[tuple[Dataset, Dataset | None]]) -> Dataset | None:
    """The final response of a C-MOVE / C-GET (pending ones skipped); ``None`` if the association ended first."""
    final: Dataset | None = None
    for status, _ in responses:
        code = _code(status)
        if code is None:
            return None
        final = status
    return final


def _code(status: Dataset | None) -> int | None:
    """The status of a response; ``None`` for pynetdicom's empty Dataset (timeout, abort, no response)."""
    if status is None or "Status" not in status:
        return None
    return int(status.Status)


def _comment(status: Dataset | None) -> str:
    text = str(status.get("ErrorComment", "") or "") if status is not None else ""
    return f" ({text})" if text else ""


def _count(status: Dataset, keyword: str) -> int:
    value = status.get(keyword)
    return int(value) if value not in (None, "") else 0
