"""The ops HTTP server: JSON API, status page and Prometheus metrics, in a thread of the node.

Standard library only (:class:`http.server.ThreadingHTTPServer`).  Bound to
``127.0.0.1:8080`` by default (``http:`` in the node config).  Endpoints
(described in :mod:`segnode.node.ops.openapi`, served at ``/api/v1/openapi.json``):

=======  ===================================  ==========================================
GET      ``/healthz``                         liveness (no authentication)
GET      ``/readyz``                          readiness: index, SCP, disk, rules, audit
GET      ``/login``                           the login form (no authentication)
POST     ``/login``, ``/logout``              start (throttled) or end a session
GET      ``/``, ``/status``                   the status page (HTML)
GET      ``/metrics``                         Prometheus text exposition
GET      ``/api/v1/studies``                  studies with their series and jobs
GET      ``/api/v1/studies/{study_uid}``      one study
GET      ``/api/v1/jobs``                     jobs (``state``, ``study``, ``limit``) with timings
GET      ``/api/v1/jobs/{job_id}``            rule, profile, backend, errors, history, deliveries
POST     ``/api/v1/jobs/{job_id}/retry``      re-run / resend / re-route
POST     ``/api/v1/jobs/{job_id}/approve``    a held job approved: sent (JSON {comment})
POST     ``/api/v1/jobs/{job_id}/reject``     a held job rejected: never sent
GET      ``/jobs/{job_id}/review``            job page: QC figures, pictures, approve/reject form
POST     ``/jobs/{job_id}/decision``          the job page's form (session + CSRF token)
GET      ``/api/v1/routes``                   the rules in force
POST     ``/api/v1/routes/validate``          validate a candidate rules file (YAML body)
GET      ``/api/v1/datasets``                 the dataset store's datasets and versions
POST     ``/api/v1/fetch``                    fetch a study from a source: 202, runs on the node's pool
GET      ``/api/v1/fetch[/{id}]``             the fetch requests, or one: queued, running, done, failed
GET      ``/api/v1/openapi.json``             the OpenAPI description
=======  ===================================  ==========================================

Authentication and roles (:mod:`segnode.node.ops.auth`): each route names its
``access`` (:mod:`segnode.node.ops.roles`).  People log in (``/login``: a
session cookie and a CSRF token); machine clients send ``Authorization: Bearer``
with a personal token (``segnode users token``) or the shared token of
``http.token_file`` (the machine principal ``shared-token``, roles admin and
ops).  Every response carries ``Content-Security-Policy`` (``frame-ancestors
'none'``), ``X-Frame-Options: DENY``, ``X-Content-Type-Options: nosniff`` and
``Referrer-Policy: same-origin``.  Binding to an address other than loopback
without a token file or accounts is refused at start.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from segnode.errors import ConfigError, SegnodeError, StorageError
from segnode.node.config.http import HttpConfig
from segnode.node.http_in.base import (
    MAX_LIMIT,
    DeadlineHandler,
    DeadlineHTTPServer,
    HttpError,
    Request,
    Response,
    RunningHTTP,
    content_length,
    json_response,
)
from segnode.node.ops.accounts import AccountStore
from segnode.node.ops.audit import utc_iso
from segnode.node.ops.auth import DEFAULT_CSP, SECURITY_HEADERS, Guard, OpsRequest, OpsResponse
from segnode.node.ops.login import Login
from segnode.node.ops.roles import Access, Principal, Role
from segnode.node.ops.sessions import LoginThrottle, SessionStore
from segnode.node.ops.views import FAILURE_STATES, OpsDB, stage_totals
from segnode.storage.index import JobState
from segnode.uids import is_valid_uid

logger = logging.getLogger(__name__)

API = "/api/v1"


Handler = Callable[[OpsRequest], Response]

#: who may read jobs, studies and the job pages
JOB_READERS = frozenset({Role.REVIEWER, Role.OPS, Role.CURATOR})


# -- the token --------------------------------------------------------------------------------


def read_token(path: Path) -> bytes:
    """The bearer token in ``path`` (surrounding whitespace removed); never logged."""
    try:
        token = Path(path).read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the HTTP token file: {exc.strerror}", where=str(path)) from exc
    if len(token) < 16:
        raise ConfigError("the HTTP token must be at least 16 characters", where=str(path))
    if Path(path).stat().st_mode & 0o004:
        logger.warning("the HTTP token file %s is readable by every user; chmod 600 it", path)
    return token


# -- the application ----------------------------------------------------------------------------


class OpsApp:
    """Routes requests to handlers; knows nothing of sockets.

    Parameters
    ----------
    db:
        Read-only view of the index.
    retry:
        ``job_id → new state`` (the index's :meth:`~segnode.storage.index.Index.retry`).
    metrics:
        Renders the Prometheus text.
    rules:
        The :class:`segnode.routing.RulesHolder` in force (``.current``), or ``None``.
    readiness:
        Named checks, each returning ``(ok, detail)``.
    validate_rules:
        Loads a candidate rules file and returns its rule names (raises
        :class:`~segnode.errors.ConfigError`).
    datasets:
        Returns the dataset store summary.
    status_page:
        Renders the HTML status page.
    audit:
        ``(event, **fields)`` writer for operator actions, or ``None``.
    """

    def __init__(self, *, db: OpsDB, retry: Callable[[int], JobState], metrics: Callable[[], bytes],
                 rules: Any | None, readiness: dict[str, Callable[[], tuple[bool, str]]],
                 validate_rules: Callable[[Path], list[str]], datasets: Callable[[], dict[str, Any]],
                 status_page: Callable[[], str], audit: Callable[..., Any] | None = None,
                 clock: Callable[[], float] = time.time,
                 review: Callable[[int, bool, str, str], str | None] | None = None, node: str = "segnode") -> None:
        self.db = db
        self.retry = retry
        self.metrics = metrics
        self.rules = rules
        self.readiness = readiness
        self.validate_rules_file = validate_rules
        self.datasets_summary = datasets
        self.status_page = status_page
        self.audit = audit
        self.clock = clock
        self.review = review
        self.node = node
        #: (verb, path pattern, handler, access): see segnode.node.ops.roles for ``access``
        self.routes: list[tuple[str, re.Pattern[str], Handler, Access]] = [
            ("GET", re.compile(r"/healthz"), self.healthz, None),
            ("GET", re.compile(r"/readyz"), self.readyz, None),
            ("GET", re.compile(r"/(status)?"), self.status, True),
            ("GET", re.compile(r"/metrics"), self.get_metrics, Role.OPS),
            ("GET", re.compile(f"{API}/openapi.json"), self.openapi, True),
            ("GET", re.compile(f"{API}/studies"), self.studies, JOB_READERS),
            ("GET", re.compile(f"{API}/studies/(?P<study_uid>[^/]+)"), self.study, JOB_READERS),
            ("GET", re.compile(f"{API}/jobs"), self.jobs, JOB_READERS),
            ("GET", re.compile(f"{API}/jobs/(?P<job_id>[^/]+)"), self.job, JOB_READERS),
            ("POST", re.compile(f"{API}/jobs/(?P<job_id>[^/]+)/retry"), self.retry_job, Role.OPS),
            ("POST", re.compile(f"{API}/jobs/(?P<job_id>[^/]+)/approve"), self.approve_api, Role.REVIEWER),
            ("POST", re.compile(f"{API}/jobs/(?P<job_id>[^/]+)/reject"), self.reject_api, Role.REVIEWER),
            ("GET", re.compile(r"/jobs/(?P<job_id>[^/]+)/review"), self.review_page, JOB_READERS),
            ("GET", re.compile(r"/jobs/(?P<job_id>[^/]+)/review/(?P<file>[^/]+)"), self.review_picture,
             JOB_READERS),
            ("POST", re.compile(r"/jobs/(?P<job_id>[^/]+)/decision"), self.review_form, Role.REVIEWER),
            ("GET", re.compile(f"{API}/routes"), self.get_routes, Role.OPS),
            ("POST", re.compile(f"{API}/routes/validate"), self.validate_routes, Role.OPS),
            ("GET", re.compile(f"{API}/datasets"), self.datasets, Role.CURATOR),
        ]
        #: path prefix → Content-Security-Policy for pages that need another one (a viewer's scripts)
        self.csp_by_prefix: dict[str, str] = {}

    def add_routes(self, routes: list[tuple[str, str, Handler, Access]]) -> None:
        """Routes of another part (login, a viewer): ``(verb, path regex, handler, access)``."""
        self.routes.extend((verb, re.compile(path), handler, access) for verb, path, handler, access in routes)

    def csp_for(self, path: str) -> str:
        found = [p for p in self.csp_by_prefix if path.startswith(p)]
        return self.csp_by_prefix[max(found, key=len)] if found else DEFAULT_CSP

    def match(self, method: str, path: str) -> tuple[Handler, Access, dict[str, str]]:
        """The handler for ``method path``, who may call it, and its path parameters."""
        allowed = []
        for verb, pattern, handler, access in self.routes:
            found = pattern.fullmatch(path)
            if found:
                if verb == method:
                    return handler, access, found.groupdict()
                allowed.append(verb)
        if allowed:
            raise HttpError(HTTPStatus.METHOD_NOT_ALLOWED, f"{method} not allowed here (use {', '.join(allowed)})")
        raise HttpError(HTTPStatus.NOT_FOUND, f"no such endpoint: {path}")

    # -- health -------------------------------------------------------------------
    def healthz(self, req: Request) -> Response:
        return json_response({"status": "ok"})

    def readyz(self, req: Request) -> Response:
        checks = {}
        for name, check in self.readiness.items():
            try:
                ok, detail = check()
            except SegnodeError as exc:
                ok, detail = False, str(exc)
            checks[name] = {"ok": ok, "detail": detail}
        ready = all(c["ok"] for c in checks.values())
        return json_response({"ready": ready, "checks": checks},
                             HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE)

    # -- pages ----------------------------------------------------------------------
    def status(self, req: OpsRequest) -> Response:
        from segnode.node.ops.status_page import user_bar

        page = self.status_page().replace("<body>", "<body>" + user_bar(req.user, _csrf(req)), 1)
        return Response(HTTPStatus.OK, page.encode("utf-8"), "text/html; charset=utf-8")

    def get_metrics(self, req: Request) -> Response:
        from segnode.node.ops.metrics import CONTENT_TYPE

        return Response(HTTPStatus.OK, self.metrics(), CONTENT_TYPE)

    def openapi(self, req: Request) -> Response:
        from segnode.node.ops.openapi import document_bytes

        return Response(HTTPStatus.OK, document_bytes())

    # -- studies ----------------------------------------------------------------------
    def studies(self, req: Request) -> Response:
        studies = self.db.studies(limit=req.int_arg("limit", 50))
        return json_response({"studies": self._with_series(studies)})

    def study(self, req: Request) -> Response:
        uid = req.params["study_uid"]
        if not is_valid_uid(uid):
            raise HttpError(HTTPStatus.BAD_REQUEST, "study_uid is not a valid DICOM UID")
        study = self.db.study(uid)
        if study is None:
            raise HttpError(HTTPStatus.NOT_FOUND, f"no study {uid}")
        return json_response(self._with_series([study])[0])

    def _with_series(self, studies: list[dict[str, Any]]) -> list[dict[str, Any]]:
        series = self.db.series_of([s["study_uid"] for s in studies])
        jobs: dict[str, list[dict[str, Any]]] = {}
        for study in studies:
            for job in self._timed(self.db.jobs(study_uid=study["study_uid"], limit=MAX_LIMIT)):
                jobs.setdefault(job["series_uid"], []).append(job)
        out = []
        for study in studies:
            rows = [dict(_series_view(s), jobs=jobs.get(s["series_uid"], []))
                    for s in series if s["study_uid"] == study["study_uid"]]
            out.append({"study_uid": study["study_uid"], "first_received_at": _iso(study["first_received_at"]),
                        "last_received_at": _iso(study["last_received_at"]), "series": rows})
        return out

    # -- jobs -----------------------------------------------------------------------
    def jobs(self, req: Request) -> Response:
        state = req.arg("state")
        if state is not None and state not in {s.value for s in JobState}:
            raise HttpError(HTTPStatus.BAD_REQUEST, f"unknown state {state!r}; one of "
                            + ", ".join(s.value for s in JobState))
        study = req.arg("study")
        if study is not None and not is_valid_uid(study):
            raise HttpError(HTTPStatus.BAD_REQUEST, "study is not a valid DICOM UID")
        jobs = self.db.jobs(state=state, study_uid=study, limit=req.int_arg("limit", 100))
        return json_response({"jobs": self._timed(jobs), "counts": self.db.counts()})

    def _timed(self, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        events = self.db.events_of([j["job_id"] for j in jobs])
        now = self.clock()
        return [_job_view(j, stage_totals(events[j["job_id"]], now)) for j in jobs]

    def _job_id(self, req: Request) -> int:
        raw = req.params["job_id"]
        if not (raw.isascii() and raw.isdigit() and len(raw) <= 12):  # int() refuses '²'; SQLite, 20 digits
            raise HttpError(HTTPStatus.BAD_REQUEST, f"job id must be a number, not {raw!r}")
        return int(raw)

    def job(self, req: Request) -> Response:
        job_id = self._job_id(req)
        job = self.db.job(job_id)
        if job is None:
            raise HttpError(HTTPStatus.NOT_FOUND, f"no job {job_id}")
        events = self.db.events_of([job_id])[job_id]
        deliveries = self.db.deliveries(job_id)
        objects = self.db.delivery_objects(job_id)
        view = _job_view(job, stage_totals(events, self.clock()))
        series = self.db.series(job["series_uid"])
        errors = [{"at": _iso(e.at), "state": e.state, "reason": e.reason}
                  for e in events if e.state in FAILURE_STATES]
        errors += [{"at": _iso(d["next_attempt_at"]), "destination": d["destination"], "reason": d["last_error"]}
                   for d in deliveries if d["last_error"]]
        view.update(
            destinations=job["destinations"], segment_attempts=job["segment_attempts"],
            backend_used=job["backend_used"], model_version=job["model_version"],
            seg_series_uid=job["seg_series_uid"], seg_sop_uid=job["seg_sop_uid"],
            sender=None if series is None else {"calling_ae": series["calling_ae"], "called_ae": series["called_ae"],
                                                "host": series["sender_host"]},
            instances=None if series is None else series["instance_count"],
            errors=errors,
            events=[{"at": _iso(e.at), "state": e.state, "reason": e.reason} for e in events],
            deliveries=[{"destination": d["destination"], "state": d["state"], "attempts": d["attempts"],
                         "next_attempt_at": _iso(d["next_attempt_at"]), "delivered_at": _iso(d["delivered_at"]),
                         "last_error": d["last_error"],
                         "objects": [{"kind": o["kind"], "sop_class_uid": o["sop_class_uid"],
                                      "sop_instance_uid": o["sop_instance_uid"], "state": o["state"],
                                      "delivered_at": _iso(o["delivered_at"]), "last_error": o["last_error"],
                                      "committed_at": _iso(o.get("committed_at"))}  # Storage Commitment
                                     for o in objects if o["destination"] == d["destination"]]}
                        for d in deliveries],
        )
        return json_response(view)

    def retry_job(self, req: OpsRequest) -> Response:
        job_id = self._job_id(req)
        if self.db.job(job_id) is None:
            raise HttpError(HTTPStatus.NOT_FOUND, f"no job {job_id}")
        try:
            state = self.retry(job_id)
        except StorageError as exc:
            raise HttpError(HTTPStatus.CONFLICT, exc.message) from exc
        if self.audit is not None:
            self.audit("api.retry", job_id=job_id, state=state.value, client=req.client, **_who(req.user))
        logger.info("job %d retried through the API by %s: now %s", job_id, req.client, state.value)
        return json_response({"job_id": job_id, "state": state.value})

    # -- review (docs/review.md) -----------------------------------------------------------
    def approve_api(self, req: OpsRequest) -> Response:
        return self._review_api(req, approve=True)

    def reject_api(self, req: OpsRequest) -> Response:
        return self._review_api(req, approve=False)

    def _review_api(self, req: OpsRequest, *, approve: bool) -> Response:
        try:
            body = json.loads(req.body or b"{}")
        except (ValueError, RecursionError):  # RecursionError: nested too deeply
            raise HttpError(HTTPStatus.BAD_REQUEST, "body must be JSON {comment}") from None
        if not isinstance(body, dict):
            raise HttpError(HTTPStatus.BAD_REQUEST, "body must be JSON {comment}")
        state = self._decide(req, approve, body.get("reviewer"), body.get("comment"))
        return json_response({"job_id": int(req.params["job_id"]), "state": state})

    def review_form(self, req: OpsRequest) -> Response:
        form = req.form()
        if form.get("decision") not in ("approve", "reject"):
            raise HttpError(HTTPStatus.BAD_REQUEST, "decision must be approve or reject")
        self._decide(req, form["decision"] == "approve", form.get("reviewer"), form.get("comment"))
        return self.review_page(req)

    def _decide(self, req: OpsRequest, approve: bool, reviewer: Any, comment: Any) -> str:
        """The logged-in user decides; a ``reviewer`` field naming anyone else is refused."""
        job_id = self._job_id(req)
        if self.review is None:
            raise HttpError(HTTPStatus.NOT_IMPLEMENTED, "this node takes no review decisions")
        user = req.user
        if user is None:
            raise HttpError(HTTPStatus.UNAUTHORIZED, "log in to decide: the reviewer is the logged-in user")
        if reviewer is not None and reviewer != user.name:
            raise HttpError(HTTPStatus.FORBIDDEN, f"a reviewer acting as another user: {user.name} "
                            "may decide only as themself")
        comment = comment if isinstance(comment, str) else ""
        if len(comment) > 500:
            raise HttpError(HTTPStatus.BAD_REQUEST, "comment is longer than 500 characters")
        if self.db.job(job_id) is None:
            raise HttpError(HTTPStatus.NOT_FOUND, f"no job {job_id}")
        state = self.review(job_id, approve, user.name, comment.strip())
        if state is None:
            now = (self.db.job(job_id) or {}).get("state")
            raise HttpError(HTTPStatus.CONFLICT, f"job {job_id} is {now}, not held for review")
        if self.audit is not None:
            self.audit("review.decision", job_id=job_id, decision="approve" if approve else "reject",
                       reviewer=user.name, via=user.via, comment=comment.strip(), state=state, client=req.client)
        logger.info("job %d %s through the API by %s: now %s", job_id, "approved" if approve else "rejected",
                    req.client, state)
        return state

    def review_page(self, req: OpsRequest) -> Response:
        from segnode.node.ops.status_page import render_review
        from segnode.node.review import job_summary

        job_id = self._job_id(req)
        job = self.db.job(job_id)
        if job is None:
            raise HttpError(HTTPStatus.NOT_FOUND, f"no job {job_id}")
        page = render_review(job, job_summary(job), node=self.node,
                             events=self.db.events_of([job_id])[job_id], user=req.user, csrf=_csrf(req))
        return Response(HTTPStatus.OK, page.encode("utf-8"), "text/html; charset=utf-8")

    def review_picture(self, req: Request) -> Response:
        from segnode.node.review import picture_path

        job = self.db.job(self._job_id(req))
        path = picture_path(job, req.params["file"]) if job else None
        if path is None:
            raise HttpError(HTTPStatus.NOT_FOUND, "no such picture")
        return Response(HTTPStatus.OK, path.read_bytes(), "image/png")

    # -- routes ------------------------------------------------------------------------
    def get_routes(self, req: Request) -> Response:
        if self.rules is None:
            raise HttpError(HTTPStatus.SERVICE_UNAVAILABLE, "no routing rules loaded")
        current = self.rules.current
        return json_response({"source": current.source, "rules": [
            r.model_dump(mode="json", by_alias=True, exclude_none=True) for r in current.rules]})

    def validate_routes(self, req: Request) -> Response:
        """Validate the YAML body as a rules file; nothing is applied."""
        if not req.body.strip():
            raise HttpError(HTTPStatus.BAD_REQUEST, "send the candidate rules file (YAML) as the request body")
        with tempfile.TemporaryDirectory(prefix="segnode-rules-") as tmp:
            path = Path(tmp) / "candidate.yaml"
            path.write_bytes(req.body)
            try:
                names = self.validate_rules_file(path)
            except ConfigError as exc:
                message = str(exc).replace(str(path), "candidate.yaml")
                return json_response({"valid": False, "errors": [m.strip() for m in message.split("; ")]})
        return json_response({"valid": True, "errors": [], "rules": names})

    # -- datasets ------------------------------------------------------------------------
    def datasets(self, req: Request) -> Response:
        return json_response(self.datasets_summary())


def _csrf(req: OpsRequest) -> str | None:
    return req.session.csrf if req.session is not None else None


def _who(user: Principal | None) -> dict[str, str]:
    return {} if user is None else {"user": user.name, "via": user.via}


def _iso(ts: float | None) -> str | None:
    return None if ts is None else utc_iso(ts)


def _series_view(s: dict[str, Any]) -> dict[str, Any]:
    return {"series_uid": s["series_uid"], "modality": s["modality"], "calling_ae": s["calling_ae"],
            "called_ae": s["called_ae"], "host": s["sender_host"], "instances": s["instance_count"],
            "duplicates": s["duplicate_count"], "bytes": s["bytes"],
            "first_received_at": _iso(s["first_received_at"]), "last_received_at": _iso(s["last_received_at"]),
            "purged_at": _iso(s["purged_at"])}


def _job_view(job: dict[str, Any], timings: dict[str, float]) -> dict[str, Any]:
    return {"job_id": job["job_id"], "study_uid": job["study_uid"], "series_uid": job["series_uid"],
            "state": job["state"], "reason": job["reason"], "rule": job["rule"], "profile": job["profile"],
            "backend": job["backend"], "completion": job.get("completion"),
            "created_at": _iso(job["created_at"]), "updated_at": _iso(job["updated_at"]),
            "timings_s": {k: round(v, 3) for k, v in timings.items()}}


# -- HTTP ----------------------------------------------------------------------------------------


class _RequestHandler(DeadlineHandler):  # deadlines: a slow-loris peer cannot hold a thread
    server: "OpsHTTPServer"
    server_version = "segnode"
    sys_version = ""
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def _handle(self, method: str) -> None:
        url = urlsplit(self.path)
        try:
            body = self._body()  # read (bounded) before any refusal, so a kept-alive connection stays in step
            handler, access, params = self.server.app.match(method, url.path)
            req = OpsRequest(method, url.path, parse_qs(url.query), body, self.client_address[0], params,
                             headers={k.lower(): v for k, v in self.headers.items()})
            response = self._guarded(req, handler, access)
        except HttpError as exc:
            response = json_response({"error": exc.message}, exc.status)
        except SegnodeError as exc:  # the index or the store failed under this request
            logger.error("%s %s failed: %s", method, url.path, exc)
            response = json_response({"error": str(exc)}, HTTPStatus.INTERNAL_SERVER_ERROR)
        self._send(response)

    def _guarded(self, req: OpsRequest, handler: Handler, access: Access) -> Response:
        guard = self.server.guard
        guard.authenticate(req)
        guard.check_request(req)
        refused = guard.authorize(req, access)
        return refused if refused is not None else handler(req)

    def _body(self) -> bytes:
        length = content_length(self.headers.get("Content-Length"))
        if length is None:
            return b""
        if length > self.server.max_body:
            self.close_connection = True
            if length <= 4 * self.server.max_body:  # drain a modest excess, so the client reads the 413
                remaining = length
                while remaining > 0 and (chunk := self.rfile.read(min(remaining, 65536))):
                    remaining -= len(chunk)
            raise HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body larger than {self.server.max_body} bytes")
        body = self.rfile.read(length)
        if len(body) < length:
            self.close_connection = True
            raise HttpError(HTTPStatus.BAD_REQUEST, "the request body ended before its Content-Length")
        return body

    def _send(self, response: Response) -> None:
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        self.send_header("Cache-Control", "no-store")
        csp = response.csp if isinstance(response, OpsResponse) and response.csp else None
        self.send_header("Content-Security-Policy", csp or self.server.app.csp_for(urlsplit(self.path).path))
        for name, value in SECURITY_HEADERS:
            self.send_header(name, value)
        for name, value in response.headers if isinstance(response, OpsResponse) else ():
            self.send_header(name, value)
        if response.status == HTTPStatus.UNAUTHORIZED:
            self.send_header("WWW-Authenticate", 'Bearer realm="segnode"')
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        logger.debug("%s %s", self.client_address[0], format % args)


class OpsHTTPServer(DeadlineHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], app: OpsApp, guard: Guard, max_body: int) -> None:
        self.app = app
        self.guard = guard
        self.max_body = max_body
        super().__init__(address, _RequestHandler)


def start_http(config: HttpConfig, app: OpsApp, accounts: AccountStore | None = None,
               clock: Callable[[], float] = time.time) -> RunningHTTP:
    """Listen on ``config.host:config.port`` in a thread; refuse an exposed bind without a token or accounts."""
    token = read_token(config.token_file) if config.token_file is not None else None
    if token is None and not config.is_loopback and not (accounts is not None and accounts.any()):
        raise ConfigError(f"http.host {config.host} is not a loopback address: set http.token_file "
                          "(a file holding the API token), add accounts (segnode users add) or bind to 127.0.0.1")
    guard = Guard(token=token, accounts=accounts, secure_cookie=config.secure_cookie,
                  sessions=SessionStore(idle_s=config.session_idle_s, max_s=config.session_max_s, clock=clock))
    throttle = LoginThrottle(free=config.login_free_failures, delay_s=config.login_delay_s,
                             max_delay_s=config.login_max_delay_s, clock=clock)
    app.add_routes(Login(guard, throttle, node=app.node, audit=app.audit).routes())
    try:
        server = OpsHTTPServer((config.host, config.port), app, guard, config.max_body_bytes)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {config.host}:{config.port}: {exc.strerror} "
                          "(set http.port, or http.enabled: false)", where="http") from exc
    thread = threading.Thread(target=server.serve_forever, name="segnode-http", daemon=True)
    thread.start()
    running = RunningHTTP(server, thread)
    logger.info("ops HTTP API on %s (%s)", running.url, "login required" if guard.login_required else "open")
    return running
