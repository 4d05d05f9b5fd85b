"""Delivering results by STOW-RS (PS3.18 10.5) to a destination with ``dicomweb:``, through ``dicomweb-client``.

The DIMSE sender's counterpart (:mod:`segnode.node.sending.dimse`): all
objects of a delivery in one request, one
:class:`~segnode.node.sending.sender.SendResult` per object, the same retry
rules translated to HTTP — no connection, a timeout, 408, 425, 429 and 5xx
are retried with backoff, as is a Failure Reason the status table
(:mod:`segnode.node.status`) calls retryable (``0xA7xx``, out of resources)
for one instance; any other 4xx (401/403 included: fix the credentials, then
``segnode jobs retry``) or failure reason dead-letters.

One try is one HTTP request on one connection attempt: dicomweb-client's
own retrying (five tries with exponential waits, on connection errors too) and
urllib3's are switched off, so the node's backoff (:mod:`segnode.node.dispatch`)
is the only retry policy.  The connect waits at most ``connect_s``, each read
at most ``response_s`` (both capped by ``attempt_s``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import requests
from dicomweb_client import DICOMwebClient
from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from requests.adapters import HTTPAdapter
from segnode.errors import DispatchError
from segnode.node.config.dicomweb import StowAuth, StowTarget, read_secret
from segnode.node.sending.sender import Deadlines, SendResult
from segnode.node.status import Category, Status, category
from urllib3.util.retry import Retry

logger = logging.getLogger(__name__)

_RETRY_HTTP = {408, 425, 429}


class StowSender:
    """STOW-RS to one DICOMweb service root (``destinations[].dicomweb``)."""

    def __init__(self, name: str, target: StowTarget, deadlines: Deadlines) -> None:
        self.name = name
        self.target = target
        self.deadlines = deadlines

    def send(self, paths: Sequence[Path]) -> list[SendResult]:
        """STOW-RS every Part 10 file of ``paths`` in one request; one result per path, in order."""
        if not paths:
            return []
        datasets = [_read(p) for p in paths]
        uids = [str(ds.SOPInstanceUID) for ds in datasets]
        try:
            answer = self._client().store_instances(datasets)
        except requests.HTTPError as exc:
            return _http_failure(exc, uids)
        except requests.Timeout:
            return [SendResult.retry(f"STOW-RS to {self.target.url}: timed out")] * len(paths)
        except requests.ConnectionError:
            return [SendResult.retry(f"STOW-RS to {self.target.url}: cannot connect")] * len(paths)
        except requests.RequestException as exc:  # a broken answer (chunked encoding, ...): worth another try
            return [SendResult.retry(f"STOW-RS to {self.target.url}: {type(exc).__name__}")] * len(paths)
        return _per_instance(_failures(answer), uids)

    def echo(self) -> SendResult:
        """A DICOMweb destination has no C-ECHO (says so, permanently)."""
        return SendResult.refused("a DICOMweb destination has no C-ECHO")

    def _client(self) -> DICOMwebClient:
        client = DICOMwebClient(url=self.target.url.rstrip("/"), session=_session(self.target),
                                timeout=(min(self.deadlines.connect_s, self.deadlines.attempt_s),
                                         min(self.deadlines.response_s, self.deadlines.attempt_s)))
        client.set_http_retry_params(retry=False)  # one try is one request: the node's backoff retries
        return client


def _session(target: StowTarget) -> requests.Session:
    session = requests.Session()
    no_retry = HTTPAdapter(max_retries=Retry(total=0, read=False))  # one connection try per request
    session.mount("http://", no_retry)
    session.mount("https://", no_retry)
    if target.auth is StowAuth.BASIC and target.password_file is not None:
        session.auth = (str(target.username), read_secret(target.password_file, "STOW-RS password"))
    elif target.auth is StowAuth.BEARER and target.token_file is not None:
        session.headers["Authorization"] = "Bearer " + read_secret(target.token_file, "STOW-RS token")
    if target.ca_bundle is not None:
        session.verify = str(target.ca_bundle)
    return session


def _read(path: Path) -> Dataset:
    try:
        return dcmread(path)
    except (OSError, InvalidDicomError) as exc:
        raise DispatchError(f"cannot read the file to send: {exc}", where=str(path)) from exc


def _http_failure(exc: requests.HTTPError, uids: list[str]) -> list[SendResult]:
    response = exc.response
    status = response.status_code if response is not None else 0
    failures: dict[str, int] = {}
    if response is not None and status == 409:  # none stored: the reasons are in the body
        try:
            failures = _failures(Dataset.from_json(response.json()))
        except ValueError:
            failures = {}
    if failures:
        return _per_instance(failures, uids)
    retry = status >= 500 or status in _RETRY_HTTP
    kind = Category.RETRYABLE if retry else Category.PERMANENT
    return [SendResult(kind, f"STOW-RS refused with HTTP {status}")] * len(uids)


def _failures(answer: Dataset) -> dict[str, int]:
    """SOP Instance UID → Failure Reason of the response's Failed SOP Sequence (0008,1198)."""
    out = {}
    for item in answer.get("FailedSOPSequence") or ():
        reason = item.get("FailureReason")
        out[str(item.get("ReferencedSOPInstanceUID", ""))] = int(Status.PROCESSING_FAILURE if reason is None
                                                                 else reason)
    return out


def _per_instance(failures: dict[str, int], uids: list[str]) -> list[SendResult]:
    results = []
    for uid in uids:
        reason = failures.get(uid)
        if reason is None:
            results.append(SendResult.stored("stored (STOW-RS)"))
        else:
            kind = category(reason)  # listed as failed: never stored, whatever the code says
            results.append(SendResult(Category.PERMANENT if kind is Category.STORED else kind,
                                      f"STOW-RS refused the instance (failure reason 0x{reason:04X})", reason))
    return results
