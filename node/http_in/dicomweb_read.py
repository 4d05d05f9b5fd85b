"""The DICOMweb read side both HTTP servers mount at ``/dicomweb``: QIDO-RS and WADO-RS paths to answers.

:class:`DicomWebReader` knows nothing of sockets or authentication: the
DICOMweb server (:mod:`segnode.node.http_in.dicomweb`, bearer clients with
``retrieve``) and the ops server (the viewer's session, :mod:`segnode.node.ops.viewer`)
check who asks, then hand it the path below the mount, the query, the
``Accept`` header and the mount's path, ``/dicomweb``: a ``BulkDataURI`` is that
path and the resource's (``/dicomweb/studies/.../bulkdata/7FE00010``), resolved
against the URL the client reached the server at, whatever host and port it used.

=====================================================  ======================================
``/studies``, ``/series``, ``/instances``               QIDO-RS across studies
``/studies/{s}/series``, ``/studies/{s}/instances``     QIDO-RS in a study
``/studies/{s}/series/{se}/instances``                  QIDO-RS in a series
``/studies/{s}[/series/{se}[/instances/{i}]]``          WADO-RS instances (Part 10, multipart)
``.../metadata``                                         WADO-RS metadata (DICOM JSON)
``/studies/{s}/series/{se}/instances/{i}/frames/{n}``   WADO-RS frames
``/studies/{s}/series/{se}/instances/{i}/bulkdata/{t}`` bulk data named by a ``BulkDataURI``
=====================================================  ======================================

Every UID in a path must be a valid DICOM UID (400 otherwise; nothing of a
path is ever joined to a file name); a study, series or instance the node does
not hold is a 404.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from http import HTTPStatus

from segnode.node.http_in.base import HttpError
from segnode.node.http_in.catalogue import Catalogue, StoredInstance
from segnode.node.http_in.qido import Level, Query, search
from segnode.node.http_in.wado import WebAnswer, bulk_tag, bulkdata, frame_numbers, frames, metadata, read_full, retrieve
from segnode.uids import is_valid_uid

DICOM_JSON = "application/dicom+json"
_UID = r"[^/]+"
_PATHS = [(name, re.compile(pattern)) for name, pattern in (
    ("search_studies", r"/studies"),
    ("search_series", r"/series"),
    ("search_instances", r"/instances"),
    ("study_series", rf"/studies/(?P<study>{_UID})/series"),
    ("study_instances", rf"/studies/(?P<study>{_UID})/instances"),
    ("series_instances", rf"/studies/(?P<study>{_UID})/series/(?P<series>{_UID})/instances"),
    ("retrieve", rf"/studies/(?P<study>{_UID})(?:/series/(?P<series>{_UID})(?:/instances/(?P<sop>{_UID}))?)?"),
    ("metadata", rf"/studies/(?P<study>{_UID})(?:/series/(?P<series>{_UID})(?:/instances/(?P<sop>{_UID}))?)?"
                 r"/metadata"),
    ("frames", rf"/studies/(?P<study>{_UID})/series/(?P<series>{_UID})/instances/(?P<sop>{_UID})"
               r"/frames/(?P<frames>[^/]+)"),
    ("bulkdata", rf"/studies/(?P<study>{_UID})/series/(?P<series>{_UID})/instances/(?P<sop>{_UID})"
                 r"/bulkdata/(?P<tag>[^/]+)"),
)]


def route(path: str) -> tuple[str, dict[str, str]]:
    """The action for ``path`` (below the mount) and its UIDs, checked (400/404)."""
    for name, pattern in _PATHS:
        found = pattern.fullmatch(path)
        if found:
            params = {k: v for k, v in found.groupdict().items() if v is not None}
            for key in ("study", "series", "sop"):
                if key in params and not is_valid_uid(params[key]):
                    raise HttpError(HTTPStatus.BAD_REQUEST, f"the {key} in the path is not a valid DICOM UID")
            return name, params
    raise HttpError(HTTPStatus.NOT_FOUND, "no such DICOMweb resource")


def json_answer(data: object) -> WebAnswer:
    return WebAnswer.of(json.dumps(data).encode("utf-8"), DICOM_JSON)


class DicomWebReader:
    """QIDO-RS and WADO-RS over a :class:`Catalogue`."""

    def __init__(self, catalogue: Catalogue) -> None:
        self.catalogue = catalogue

    def get(self, path: str, query: Mapping[str, Sequence[str]], *, accept: str | None, base: str) -> WebAnswer:
        """The answer to ``GET {base}{path}?{query}``."""
        name, params = route(path)
        if name.startswith("search") or name.endswith(("_series", "_instances")):
            return self._search(name, params, query)
        instances = self._held(params)
        if name == "retrieve":
            syntaxes = {i.sop_uid: str(self._syntax(i)) for i in instances}
            return retrieve(instances, syntaxes, accept)
        if name == "metadata":
            return json_answer([metadata(self.catalogue.header(i), i, base) for i in instances])
        [instance] = instances
        ds = read_full(instance.path)
        if name == "frames":
            return frames(ds, frame_numbers(params["frames"]), accept)
        return bulkdata(ds, bulk_tag(params["tag"]), accept)

    def _search(self, name: str, params: dict[str, str], query: Mapping[str, Sequence[str]]) -> WebAnswer:
        parsed = Query.parse(query)
        study, series = params.get("study"), params.get("series")
        if study is not None and not self.catalogue.instances(study, series):
            raise HttpError(HTTPStatus.NOT_FOUND, "no such study or series on this node")
        level = Level.STUDY if name == "search_studies" else Level.SERIES if name.endswith("series") \
            else Level.INSTANCE
        return json_answer(search(self.catalogue, level, parsed, study_uid=study, series_uid=series))

    def _held(self, params: dict[str, str]) -> list[StoredInstance]:
        instances = self.catalogue.instances(params["study"], params.get("series"))
        if "sop" in params:
            instances = [i for i in instances if i.sop_uid == params["sop"]][:1]
        if not instances:
            raise HttpError(HTTPStatus.NOT_FOUND, "no such study, series or instance on this node")
        return instances

    def _syntax(self, instance: StoredInstance) -> str:
        header = self.catalogue.header(instance)
        return str(header.file_meta.TransferSyntaxUID)
