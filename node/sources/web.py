"""A DICOMweb source: QIDO-RS for studies and series, WADO-RS for one series, through ``dicomweb-client``.

Each retrieved instance is asked for as Explicit VR Little Endian and handed
to :class:`segnode.node.ingest.store.StoreHandler` like a STOW-RS part (the
calling AE title is the source's name, up to 16 characters, so routing rules
can match it); one that is not of the requested study and series is refused
and counted.  Requests are retried (``retries``) on 408/429/503/504 by the
client; every read waits at most ``idle_timeout_s`` (``query_timeout_s`` for
a query) and the whole series at most ``retrieve_timeout_s``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian
from segnode.node.config.dicomweb import read_secret
from segnode.node.config.sources import SourceConfig
from segnode.node.ingest.store import StoreHandler, StoreRequest
from segnode.node.sources.answers import series_match, study_identifier, study_match
from segnode.node.sources.source import (
    NoMatchError,
    RetrieveResult,
    SeriesMatch,
    SourceError,
    StudyMatch,
    StudyQuery,
)
from segnode.node.status import Category, category

logger = logging.getLogger(__name__)

_STUDY_FILTERS = ("StudyInstanceUID", "AccessionNumber", "PatientID", "StudyDate", "ModalitiesInStudy")


class WebSource:
    """A PACS reached by DICOMweb (``kind: dicomweb``)."""

    def __init__(self, settings: SourceConfig, *, node_ae: str = "SEGNODE", store: StoreHandler | None = None) -> None:
        self.settings, self.name, self.node_ae, self.store = settings, settings.name, node_ae, store
        assert settings.url is not None
        self.url = settings.url.rstrip("/")
        self.calling_ae = settings.name[:16]

    def _client(self, read_timeout_s: float) -> DICOMwebClient:
        session = requests.Session()
        if self.settings.ca_bundle is not None:
            session.verify = str(self.settings.ca_bundle)
        headers = {}
        if self.settings.token_file is not None:
            headers["Authorization"] = f"Bearer {read_secret(self.settings.token_file, 'source token')}"
        client = DICOMwebClient(self.url, session=session, headers=headers,
                                timeout=(self.settings.connect_timeout_s, read_timeout_s))
        client.set_http_retry_params(retry=self.settings.retries > 0, max_attempts=self.settings.retries + 1,
                                     wait_exponential_multiplier=200)
        return client

    # -- queries ------------------------------------------------------------------------
    def find_studies(self, query: StudyQuery) -> list[StudyMatch]:
        identifier = study_identifier(query)
        filters = {k: str(identifier.get(k)) for k in _STUDY_FILTERS if identifier.get(k)}
        answers = self._search(query.describe(), lambda c, limit: c.search_for_studies(
            search_filters=filters, limit=limit, fields=["StudyDescription", "ModalitiesInStudy"]))
        if not answers:
            raise NoMatchError(f"source {self.name}: no study matches {query.describe()}")
        return [study_match(a) for a in answers if a.get("StudyInstanceUID")]

    def find_series(self, study_uid: str) -> list[SeriesMatch]:
        answers = self._search(f"the series of study {study_uid}", lambda c, limit: c.search_for_series(
            study_uid, limit=limit, fields=["SeriesDescription", "NumberOfSeriesRelatedInstances"]))
        return [series_match(study_uid, a) for a in answers if a.get("SeriesInstanceUID")]

    def _search(self, what: str, search: Callable[[DICOMwebClient, int], list[dict[str, dict]]]) -> list[Dataset]:
        cap = self.settings.max_results
        try:
            found = search(self._client(self.settings.query_timeout_s), cap + 1)
        except requests.RequestException as exc:
            raise SourceError(f"source {self.name}: the query for {what} failed: {_why(exc)}") from exc
        if len(found) > cap:
            raise SourceError(f"source {self.name}: the query for {what} returned more than {cap} matches; "
                              f"stopped at the bound (sources[].max_results): narrow it")
        return [Dataset.from_json(answer) for answer in found]

    # -- retrieve -----------------------------------------------------------------------
    def retrieve_series(self, study_uid: str, series_uid: str) -> RetrieveResult:
        if self.store is None:
            raise SourceError(f"source {self.name}: WADO-RS needs the node's store path (run it inside the node)")
        deadline = time.monotonic() + self.settings.retrieve_timeout_s
        session = id(object())
        counts = {"completed": 0, "failed": 0, "refused": 0}
        client = self._client(self.settings.idle_timeout_s)
        try:
            for ds in client.iter_series(study_uid, series_uid,
                                         media_types=(("application/dicom", ExplicitVRLittleEndian),)):
                counts[self._store_one(ds, study_uid, series_uid, session)] += 1
                if time.monotonic() > deadline:
                    raise SourceError(f"source {self.name}: the retrieve of series {series_uid} ran past "
                                      f"{self.settings.retrieve_timeout_s:g} s (sources[].retrieve_timeout_s); "
                                      "stopped")
        except requests.RequestException as exc:
            raise SourceError(f"source {self.name}: the retrieve of series {series_uid} failed: {_why(exc)}") from exc
        self.store.association_ended(session, released=counts["failed"] == 0)
        return RetrieveResult(study_uid, series_uid, "wado", **counts)

    def _store_one(self, ds: Dataset, study_uid: str, series_uid: str, session: int) -> str:
        assert self.store is not None
        if ds.get("StudyInstanceUID") != study_uid or ds.get("SeriesInstanceUID") != series_uid:
            logger.warning("source %s sent instance %s of series %s, not asked for: refused", self.name,
                           ds.get("SOPInstanceUID"), ds.get("SeriesInstanceUID"))
            return "refused"
        request = StoreRequest(sop_class_uid=str(ds.SOPClassUID), sop_instance_uid=str(ds.SOPInstanceUID),
                               transfer_syntax=ExplicitVRLittleEndian, calling_ae=self.calling_ae,
                               called_ae=self.node_ae, host=urlsplit(self.url).hostname or "",
                               abstract_syntax=str(ds.SOPClassUID), session=session)
        outcome = self.store.store(request, memoryview(_encode(ds)))
        return "completed" if category(outcome.status) is Category.STORED else "failed"


def _encode(ds: Dataset) -> bytes:
    """The dataset (no file meta) as Explicit VR Little Endian."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    body = Dataset({tag: ds[tag] for tag in ds.keys() if tag.group != 0x0002})
    write_dataset(fp, body)
    return fp.getvalue()


def _why(exc: requests.RequestException) -> str:
    response = getattr(exc, "response", None)
    if response is not None:
        return f"HTTP {response.status_code}"
    return type(exc).__name__
