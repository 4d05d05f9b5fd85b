"""STOW-RS ingest: each application/dicom part through the same store path as a C-STORE.

A part is a Part 10 file.  Its file meta (group 0002) is read by hand for the
SOP class, SOP instance and transfer syntax; the dataset after it goes to
:meth:`segnode.node.ingest.store.StoreHandler.store` exactly as a C-STORE dataset does (UID
checks, size and free-disk limits, self-checked spool file, overlapped syncs,
index row, duplicates, events), so routing and jobs follow as for DIMSE.  Each
part ends in a :class:`StowOutcome`; the response is the PS3.18 Store
Instances Response Module (JSON): Referenced SOP Sequence (0008,1199) and
Failed SOP Sequence (0008,1198) with a Failure Reason (0008,1197).
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from segnode.node.http_in.multipart import Part
from segnode.node.ingest.header import element_at
from segnode.node.ingest.store import StoreHandler, StoreRequest
from segnode.node.status import Status
from segnode.uids import is_valid_uid

logger = logging.getLogger(__name__)

# Failure reasons (PS3.18 10.5.3) beyond the store path's answers, from the status table (segnode.node.status):
# CANNOT_UNDERSTAND (0xC000): not a Part 10 file, or not application/dicom;
# DATA_SET_DOES_NOT_MATCH_SOP_CLASS (0xA900): the instance's Study Instance UID differs from the request's;
# OUT_OF_RESOURCES (0xA700): a part larger than the node accepts.


@dataclass(frozen=True)
class StowOutcome:
    """One part's result: the UIDs it claimed (may be empty), the status, a comment for the log."""

    sop_class_uid: str
    sop_instance_uid: str
    status: Status
    comment: str | None = None

    @property
    def ok(self) -> bool:
        return self.status is Status.SUCCESS


@dataclass(frozen=True)
class FileMeta:
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    dataset_offset: int


def read_file_meta(data: bytes | bytearray | memoryview) -> FileMeta | None:
    """The file meta of a Part 10 file (explicit VR little endian, PS3.10 7.1), or ``None``."""
    view = memoryview(data)
    if len(view) < 132 or bytes(view[128:132]) != b"DICM":
        return None
    values: dict[int, str] = {}
    pos = 132
    while pos + 8 <= len(view):
        if struct.unpack_from("<H", view, pos)[0] != 0x0002:
            break
        try:
            tag, _, length, start = element_at(view, pos, explicit=True)
        except struct.error:  # a long VR's length runs past the end
            return None
        if start + length > len(view):
            return None
        values[tag & 0xFFFF] = bytes(view[start:start + length]).rstrip(b"\x00 ").decode("latin-1")
        pos = start + length
    if 0x0010 not in values:
        return None
    return FileMeta(values.get(0x0002, ""), values.get(0x0003, ""), values[0x0010], pos)


class StowIngest:
    """Stores the parts of one STOW-RS request through the node's :class:`StoreHandler`."""

    def __init__(self, handler: StoreHandler, *, calling_ae: str, called_ae: str, host: str,
                 study_uid: str | None, session: int, author: str | None = None) -> None:
        self.handler = handler
        self.author = author  # the client (or user) storing: a correction's author (node/corrections.py)
        self.calling_ae, self.called_ae, self.host = calling_ae, called_ae, host
        self.study_uid = study_uid
        self.session = session

    def store(self, part: Part) -> StowOutcome:
        if part.too_large:
            return StowOutcome("", "", Status.OUT_OF_RESOURCES, "part larger than the node accepts")
        if part.content_type.value != "application/dicom":
            return StowOutcome("", "", Status.CANNOT_UNDERSTAND, f"part is {part.content_type.value or 'untyped'}, "
                                                   "not application/dicom")
        meta = read_file_meta(part.body)
        if meta is None:
            return StowOutcome("", "", Status.CANNOT_UNDERSTAND, "part is not a DICOM Part 10 file")
        claimed = (meta.sop_class_uid if is_valid_uid(meta.sop_class_uid) else "",
                   meta.sop_instance_uid if is_valid_uid(meta.sop_instance_uid) else "")
        dataset = memoryview(part.body)[meta.dataset_offset:]
        request = StoreRequest(meta.sop_class_uid, meta.sop_instance_uid, meta.transfer_syntax, self.calling_ae,
                               self.called_ae, self.host, abstract_syntax=meta.sop_class_uid, session=self.session,
                               study_uid=self.study_uid, author=self.author)  # the store path reads the header once and checks it
        code, comment = self.handler.store(request, dataset)
        return StowOutcome(*claimed, code, comment)

def store_response(outcomes: list[StowOutcome], retrieve_base: str | None) -> tuple[HTTPStatus, dict[str, Any]]:
    """The HTTP status and the Store Instances Response Module (DICOM JSON) for ``outcomes``.

    200: every instance stored; 202: some stored, some failed; 409: none stored.
    """
    stored = [o for o in outcomes if o.ok]
    failed = [o for o in outcomes if not o.ok]
    body: dict[str, Any] = {}
    if stored:
        body["00081199"] = {"vr": "SQ", "Value": [_item(o, retrieve_base) for o in stored]}
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": [
            {**_item(o, None), "00081197": {"vr": "US", "Value": [o.status]}} for o in failed]}
    status = HTTPStatus.OK if not failed else HTTPStatus.ACCEPTED if stored else HTTPStatus.CONFLICT
    return status, body


def _item(outcome: StowOutcome, retrieve_base: str | None) -> dict[str, Any]:
    item: dict[str, Any] = {}
    if outcome.sop_class_uid:
        item["00081150"] = {"vr": "UI", "Value": [outcome.sop_class_uid]}
    if outcome.sop_instance_uid:
        item["00081155"] = {"vr": "UI", "Value": [outcome.sop_instance_uid]}
    if retrieve_base and outcome.sop_instance_uid:
        item["00081190"] = {"vr": "UR", "Value": [f"{retrieve_base}/instances/{outcome.sop_instance_uid}"]}
    return item
