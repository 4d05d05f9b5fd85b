"""``/api/v1/fetch`` (role ``ops``): retrieve a study from a configured source, as ``segnode fetch`` does, in the node.

``POST /api/v1/fetch`` takes a JSON body: ``source`` and one of ``accession``,
``study_uid``, ``patient_id``; optionally ``since`` (YYYY-MM-DD), ``modality``,
and ``route`` (a rule's name) or ``profile`` to force the series onto.  It
checks the body (``400``), the source and the rule or profile (``404``), records
the request durably (:mod:`segnode.node.sources.fetch_requests`) and answers
at once ``202 Accepted`` with ``Location: /api/v1/fetch/{id}``; the node's
fetch pool (:mod:`segnode.node.sources.fetch_queue`) runs it.  ``GET
/api/v1/fetch/{id}`` answers its state (``queued``, ``running``, ``done`` with
the report, ``failed`` with the reason), who asked and when; ``GET
/api/v1/fetch`` lists the recent requests, newest first.  The requesting user
is recorded in the retrieval log (docs/sources.md) and the audit log
(``fetch.requested``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from http import HTTPStatus

from segnode.errors import ConfigError, InputError
from segnode.node.config import NodeConfig
from segnode.node.http_in.base import HttpError, Response, json_response
from segnode.node.ops.audit import utc_iso
from segnode.node.ops.auth import OpsRequest, OpsResponse
from segnode.node.ops.roles import Role
from segnode.node.ops.viewer import Route
from segnode.node.sources.fetch_queue import FetchQueue
from segnode.node.sources.fetch_requests import FetchOrder, FetchRequest
from segnode.node.sources.open import source_config
from segnode.node.sources.pin import pin_for
from segnode.node.sources.source import StudyQuery

logger = logging.getLogger(__name__)

PATH = "/api/v1/fetch"
_KEYS = frozenset({"source", "accession", "study_uid", "patient_id", "since", "modality", "route", "profile"})

#: ``(event, **fields)``: the ops audit writer
Audit = Callable[..., None]


class FetchAPI:
    """The fetch endpoints over the node's config and its fetch pool."""

    def __init__(self, config: NodeConfig, queue: FetchQueue, audit: Audit | None = None) -> None:
        self.config, self.queue, self.audit = config, queue, audit

    def routes(self) -> list[Route]:
        return [("POST", PATH, self.fetch, Role.OPS), ("GET", PATH, self.recent, Role.OPS),
                ("GET", f"{PATH}/(?P<fetch_id>[^/]+)", self.status, Role.OPS)]

    def fetch(self, req: OpsRequest) -> Response:
        order = self._order(_body(req.body))
        who = req.user.name if req.user is not None else req.client
        request = self.queue.requests.add(order, by=who, client=req.client)
        if self.audit is not None:
            self.audit("fetch.requested", state=request.state.value, client=req.client,
                       message=f"fetch request {request.id} from source {order.source}",
                       **({} if req.user is None else {"user": req.user.name, "via": req.user.via}))
        logger.info("fetch request %d from %s accepted through the API by %s", request.id, order.source, who)
        self.queue.pump()  # it may be running already; the answer is the request as accepted
        return OpsResponse(HTTPStatus.ACCEPTED, json.dumps(view(request)).encode("utf-8"), "application/json",
                           [("Location", f"{PATH}/{request.id}")])

    def _order(self, body: dict[str, object]) -> FetchOrder:
        """The request, checked as the fetch will use it: 400 for a bad body, 404 for an unknown name."""
        order = FetchOrder(str(body["source"]), accession=_text(body, "accession"),
                           study_uid=_text(body, "study_uid"), patient_id=_text(body, "patient_id"),
                           since=_text(body, "since"), modality=_text(body, "modality"), route=_text(body, "route"),
                           profile=_text(body, "profile"))
        _check_query(order)
        if order.route is not None and order.profile is not None:
            raise HttpError(HTTPStatus.BAD_REQUEST, "give a route or a profile, not both")
        try:
            source_config(self.config, order.source)
            pin_for(self.config, route=order.route, profile=order.profile)
        except ConfigError as exc:
            raise HttpError(HTTPStatus.NOT_FOUND, exc.message) from exc
        return order

    def recent(self, req: OpsRequest) -> Response:
        return json_response({"fetches": [view(r) for r in self.queue.requests.recent(req.int_arg("limit", 50))]})

    def status(self, req: OpsRequest) -> Response:
        raw = req.params["fetch_id"]
        if not (raw.isascii() and raw.isdigit() and len(raw) <= 12):
            raise HttpError(HTTPStatus.BAD_REQUEST, f"fetch id must be a number, not {raw!r}")
        request = self.queue.requests.get(int(raw))
        if request is None:
            raise HttpError(HTTPStatus.NOT_FOUND, f"no fetch request {raw}")
        return json_response(view(request))


def view(request: FetchRequest) -> dict[str, object]:
    """A request as the API answers it (the query described: never a patient ID)."""
    order = request.order
    try:
        query = order.query().describe()
    except (InputError, ValueError):
        query = None
    return {"id": request.id, "state": request.state.value, "source": order.source, "query": query,
            "modality": order.modality, "route": order.route, "profile": order.profile,
            "by": request.by, "client": request.client, "requested_at": _iso(request.requested_at),
            "started_at": _iso(request.started_at), "finished_at": _iso(request.finished_at),
            "attempts": request.attempt, "error": request.error, "report": request.report}


def _iso(ts: float | None) -> str | None:
    return None if ts is None else utc_iso(ts)


def _body(raw: bytes) -> dict[str, object]:
    try:
        body = json.loads(raw or b"{}")
    except (ValueError, RecursionError) as exc:
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


def _check_query(order: FetchOrder) -> StudyQuery:
    try:
        return order.query()
    except ValueError as exc:
        raise HttpError(HTTPStatus.BAD_REQUEST, f"since: {exc}") from exc
    except InputError as exc:
        raise HttpError(HTTPStatus.BAD_REQUEST, exc.message) from exc
