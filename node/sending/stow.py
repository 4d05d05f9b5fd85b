"""Delivering results by STOW-RS (PS3.18 10.5) to a destination with ``dicomweb:``, through ``dicomweb-client``.

The DIMSE dispatcher's counterpart (:func:`segnode.node.dispatch.send_files` hands
over when a destination has ``dicomweb``): all objects of a job for one
destination in one request, one :class:`~node.dispatch.SendResult` per object,
the same retry rules translated to HTTP — no connection, a timeout, 408, 429
and 5xx are retried with backoff, as is a Failure Reason of ``0xA7xx`` (out of
resources) for one instance; any other 4xx (401/403 included: fix the
credentials, then ``segnode jobs retry``) or failure reason dead-letters.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import requests
from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from segnode.errors import DispatchError
from segnode.node.config import Destination
from segnode.node.config.dicomweb import StowAuth, StowTarget, read_secret
from segnode.node.dispatch import SendResult

logger = logging.getLogger(__name__)

_RETRY_STATUS = {408, 425, 429}


def _session(target: StowTarget) -> requests.Session:
    session = requests.Session()
    if target.auth is StowAuth.BASIC and target.password_file is not None:
        session.auth = (str(target.username), read_secret(target.password_file, "STOW-RS password"))
    elif target.auth is StowAuth.BEARER and target.token_file is not None:
        session.headers["Authorization"] = "Bearer " + read_secret(target.token_file, "STOW-RS token")
    if target.ca_bundle is not None:
        session.verify = str(target.ca_bundle)
    return session


def stow_files(dest: Destination, paths: Sequence[Path], *, timeout_s: float = 30.0) -> list[SendResult]:
    """STOW-RS every Part 10 file of ``paths`` to ``dest`` in one request; one result per path, in order."""
    from dicomweb_client import DICOMwebClient

    target = dest.dicomweb
    if target is None:
        raise DispatchError("destination has no dicomweb settings", where=dest.name)
    if not paths:
        return []
    datasets = [_read(p) for p in paths]
    uids = [str(ds.SOPInstanceUID) for ds in datasets]
    client = DICOMwebClient(url=target.url.rstrip("/"), session=_session(target), timeout=timeout_s)
    try:
        answer = client.store_instances(datasets)
    except requests.HTTPError as exc:
        return _http_failure(exc, uids)
    except (requests.ConnectionError, requests.Timeout) as exc:
        reason = "timed out" if isinstance(exc, requests.Timeout) else "cannot connect"
        return [SendResult(False, True, f"STOW-RS to {target.url}: {reason}")] * len(paths)
    return _per_instance(_failures(answer), uids)


def _read(path: Path) -> Any:
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
            from pydicom import Dataset

            failures = _failures(Dataset.from_json(response.json()))
        except ValueError:
            failures = {}
    if failures:
        return _per_instance(failures, uids)
    retry = status >= 500 or status in _RETRY_STATUS
    return [SendResult(False, retry, f"STOW-RS refused with HTTP {status}")] * len(uids)


def _failures(answer: Any) -> dict[str, int]:
    """SOP Instance UID → Failure Reason of the response's Failed SOP Sequence (0008,1198)."""
    out = {}
    for item in getattr(answer, "FailedSOPSequence", None) or ():
        out[str(getattr(item, "ReferencedSOPInstanceUID", ""))] = int(getattr(item, "FailureReason", 0x0110))
    return out


def _per_instance(failures: dict[str, int], uids: list[str]) -> list[SendResult]:
    results = []
    for uid in uids:
        reason = failures.get(uid)
        if reason is None:
            results.append(SendResult(True, False, "stored (STOW-RS)"))
        else:
            results.append(SendResult(False, (reason & 0xFF00) == 0xA700,
                                      f"STOW-RS refused the instance (failure reason 0x{reason:04X})"))
    return results
