"""``POST /api/v1/fetch`` (role ``ops``): retrieve a study from a configured source, as ``segnode fetch`` does.

The body is JSON: ``source`` and one of ``accession``, ``study_uid``,
``patient_id``; optionally ``since`` (YYYY-MM-DD), ``modality``, and ``route``
(a rule's name) or ``profile`` to force the series onto.  The
request runs the fetch inside the node (its own store path for C-GET and
WADO-RS; its receiver for C-MOVE) and answers when every series is retrieved:
``200`` with the report, ``502`` with it when a series failed, ``404`` for an
unknown source or no matching study, ``400`` for a bad body.  The requesting
user is recorded in the retrieval log (docs/sources.md).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import date
from http import HTTPStatus

from segnode.errors import ConfigError, InputError
from segnode.node.config import NodeConfig
from segnode.node.http_in.base import HttpError, Response, json_response
from segnode.node.ingest.store import StoreHandler
from segnode.node.ops.auth import OpsRequest
from segnode.node.ops.roles import Role
from segnode.node.ops.viewer import Route
from segnode.node.sources.fetch import fetcher_for
from segnode.node.sources.pin import pin_for
from segnode.node.sources.source import NoMatchError, SourceError, StudyQuery
from segnode.storage.index import Index

logger = logging.getLogger(__name__)

_KEYS = frozenset({"source", "accession", "study_uid", "patient_id", "since", "modality", "route", "profile"})


class FetchAPI:
    """The fetch endpoint over the node's config, index and (when it listens) store path."""

    def __init__(self, config: NodeConfig, index: Index, store: Callable[[], StoreHandler | None]) -> None:
        self.config, self.index, self.store = config, index, store

    def routes(self) -> list[Route]:
        return [("POST", "/api/v1/fetch", self.fetch, Role.OPS)]

    def fetch(self, req: OpsRequest) -> Response:
        body = _body(req.body)
        query = _query(body)
        who = req.user.name if req.user is not None else req.client
        name, modality = str(body["source"]), _text(body, "modality")
        try:
            pin = pin_for(self.config, route=_text(body, "route"), profile=_text(body, "profile"))
            fetcher = fetcher_for(self.config, name, store=self.store(), index=self.index, by=who, modality=modality,
                                  pin=pin)
            report = fetcher.fetch(query)
        except (ConfigError, NoMatchError) as exc:
            raise HttpError(HTTPStatus.NOT_FOUND, exc.message) from exc
        except SourceError as exc:
            raise HttpError(HTTPStatus.BAD_GATEWAY, exc.message) from exc
        logger.info("fetch from %s through the API by %s: %d series", name, who, len(report.series))
        return json_response(report.as_dict(), HTTPStatus.OK if report.ok else HTTPStatus.BAD_GATEWAY)


def _body(raw: bytes) -> dict[str, object]:
    try:
        body = json.loads(raw or b"{}")
    except ValueError as exc:
        raise HttpError(HTTPStatus.BAD_REQUEST, "the body must be JSON") from exc
    if not isinstance(body, dict) or not isinstance(body.get("source"), str):
        raise HttpError(HTTPStatus.BAD_REQUEST, "the body must be a JSON object with 'source'")
    unknown = sorted(set(body) - _KEYS)
    if unknown:
        raise HttpError(HTTPStatus.BAD_REQUEST, f"unknown keys: {', '.join(unknown)} (known: {', '.join(sorted(_KEYS))})")
    return body


def _text(body: dict[str, object], key: str) -> str | None:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise HttpError(HTTPStatus.BAD_REQUEST, f"{key} must be a string")
    return value or None


def _query(body: dict[str, object]) -> StudyQuery:
    since = _text(body, "since")
    try:
        return StudyQuery(accession=_text(body, "accession"), study_uid=_text(body, "study_uid"),
                          patient_id=_text(body, "patient_id"), since=date.fromisoformat(since) if since else None)
    except ValueError as exc:
        raise HttpError(HTTPStatus.BAD_REQUEST, f"since: {exc}") from exc
    except InputError as exc:
        raise HttpError(HTTPStatus.BAD_REQUEST, exc.message) from exc
