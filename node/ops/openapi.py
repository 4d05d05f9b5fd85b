"""The OpenAPI 3.1 description of the ops HTTP API (served at ``/api/v1/openapi.json``).

Kept next to :mod:`segnode.node.ops.api`; a test checks that every route there is
described here and nothing more.
"""

from __future__ import annotations

import json
from typing import Any

VERSION = "1.0.0"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(_ref("Error"), description)


_UNAUTHORIZED = {"401": _error("Not logged in, or a missing or wrong token (when the node has a token or accounts)"),
                 "403": _error("The user's roles do not allow this; a cross-origin request; a session request "
                               "without its CSRF token")}
_JOB_ID = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 1}}
_STUDY_UID = {"name": "study_uid", "in": "path", "required": True,
              "schema": {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)*$", "maxLength": 64}}
_LIMIT = {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}}
_STATES = ["received", "complete", "segmenting", "encoded", "sending", "done", "failed", "dead_letter",
           "not_routed", "skipped", "superseded"]
_TIME = {"type": ["string", "null"], "format": "date-time"}


def _op(summary: str, responses: dict[str, Any], *, secured: bool = True, **extra: Any) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": {**responses, **(_UNAUTHORIZED if secured else {})}}
    if not secured:
        op["security"] = []
    op.update(extra)
    return op


SCHEMAS: dict[str, Any] = {
    "FetchBody": {"type": "object", "required": ["source"], "additionalProperties": False, "properties": {
        "source": {"type": "string"}, "accession": {"type": "string"}, "study_uid": {"type": "string"},
        "patient_id": {"type": "string"}, "since": {"type": "string", "format": "date"},
        "modality": {"type": "string"}, "route": {"type": "string"}, "profile": {"type": "string"}},
        "description": "source and one of accession, study_uid, patient_id; route or profile, not both"},
    "Fetch": {"type": "object", "properties": {
        "id": {"type": "integer"}, "state": {"type": "string", "enum": ["queued", "running", "done", "failed"]},
        "source": {"type": "string"}, "query": {"type": ["string", "null"], "description": "never a patient ID"},
        "modality": {"type": ["string", "null"]}, "route": {"type": ["string", "null"]},
        "profile": {"type": ["string", "null"]}, "by": {"type": "string", "description": "who asked"},
        "client": {"type": ["string", "null"]}, "requested_at": _TIME, "started_at": _TIME, "finished_at": _TIME,
        "attempts": {"type": "integer", "description": "runs begun (more than 1: resumed after a node restart)"},
        "error": {"type": ["string", "null"], "description": "why it failed: no matching study, a series that "
                                                           "failed, a source error"},
        "report": {"type": ["object", "null"], "description": "per series: method, counts, error, pinned job"}}},
    "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
    "Timings": {"type": "object", "description": "seconds per stage (ingest, queue, segment, dispatch)",
                "additionalProperties": {"type": "number"}},
    "Job": {"type": "object", "properties": {
        "job_id": {"type": "integer"}, "study_uid": {"type": "string"}, "series_uid": {"type": "string"},
        "state": {"type": "string", "enum": _STATES}, "reason": {"type": ["string", "null"]},
        "rule": {"type": ["string", "null"]}, "profile": {"type": ["string", "null"]},
        "backend": {"type": ["string", "null"]}, "created_at": _TIME, "updated_at": _TIME,
        "timings_s": _ref("Timings")}},
    "JobDetail": {"allOf": [_ref("Job"), {"type": "object", "properties": {
        "destinations": {"type": "array", "items": {"type": "string"}},
        "segment_attempts": {"type": "integer"}, "backend_used": {"type": ["string", "null"]},
        "model_version": {"type": ["string", "null"]}, "seg_series_uid": {"type": ["string", "null"]},
        "seg_sop_uid": {"type": ["string", "null"]},
        "sender": {"type": ["object", "null"], "properties": {
            "calling_ae": {"type": "string"}, "called_ae": {"type": "string"}, "host": {"type": "string"}}},
        "instances": {"type": ["integer", "null"]},
        "errors": {"type": "array", "items": {"type": "object"}},
        "events": {"type": "array", "items": {"type": "object", "properties": {
            "at": _TIME, "state": {"type": "string"}, "reason": {"type": ["string", "null"]}}}},
        "deliveries": {"type": "array", "items": {"type": "object", "properties": {
            "destination": {"type": "string"}, "attempts": {"type": "integer"},
            "state": {"type": "string", "description": "pending, stored (awaiting Storage Commitment), done, dead"},
            "next_attempt_at": _TIME, "delivered_at": _TIME, "last_error": {"type": ["string", "null"]},
            "objects": {"type": "array", "description": "each object this destination takes, with its own state",
                        "items": {"type": "object", "properties": {
                            "kind": {"type": "string", "enum": ["seg", "rtstruct", "overlay", "sr"]},
                            "sop_class_uid": {"type": "string"}, "sop_instance_uid": {"type": "string"},
                            "state": {"type": "string", "enum": ["pending", "done", "dead"]},
                            "delivered_at": _TIME, "last_error": {"type": ["string", "null"]},
                            "committed_at": _TIME}}}}}},
    }}]},
    "Series": {"type": "object", "properties": {
        "series_uid": {"type": "string"}, "modality": {"type": ["string", "null"]},
        "calling_ae": {"type": "string"}, "called_ae": {"type": "string"}, "host": {"type": "string"},
        "instances": {"type": "integer"}, "duplicates": {"type": "integer"}, "bytes": {"type": "integer"},
        "first_received_at": _TIME, "last_received_at": _TIME, "purged_at": _TIME,
        "jobs": {"type": "array", "items": _ref("Job")}}},
    "Study": {"type": "object", "properties": {
        "study_uid": {"type": "string"}, "first_received_at": _TIME, "last_received_at": _TIME,
        "series": {"type": "array", "items": _ref("Series")}}},
    "Readiness": {"type": "object", "properties": {
        "ready": {"type": "boolean"},
        "checks": {"type": "object", "additionalProperties": {"type": "object", "properties": {
            "ok": {"type": "boolean"}, "detail": {"type": "string"}}}}}},
    "Validation": {"type": "object", "required": ["valid", "errors"], "properties": {
        "valid": {"type": "boolean"}, "errors": {"type": "array", "items": {"type": "string"}},
        "rules": {"type": "array", "items": {"type": "string"}}}},
}

PATHS: dict[str, dict[str, Any]] = {
    "/healthz": {"get": _op("Liveness: the HTTP thread answers", {"200": _json({"type": "object"})},
                            secured=False)},
    "/readyz": {"get": _op("Readiness: index, DICOM listener, free disk, rules, audit log",
                           {"200": _json(_ref("Readiness")), "503": _json(_ref("Readiness"), "Not ready")},
                           secured=False)},
    "/login": {
        "get": _op("The login form (HTML)", {"200": {"description": "HTML", "content": {
            "text/html": {"schema": {"type": "string"}}}}}, secured=False),
        "post": _op("Log in (form: name, password, next): a session cookie, 303 to next", {
            "303": {"description": "logged in: Set-Cookie segnode_session"},
            "401": {"description": "wrong name or password (the form again)"},
            "429": {"description": "too many failed logins (Retry-After)"}}, secured=False,
            requestBody={"required": True, "content": {
                "application/x-www-form-urlencoded": {"schema": {"type": "object"}}}})},
    "/logout": {"post": _op("End the session (form field csrf or X-CSRF-Token)", {
        "303": {"description": "logged out: to /login"}})},
    "/": {"get": _op("The status page", {"200": {"description": "HTML",
                                                 "content": {"text/html": {"schema": {"type": "string"}}}}})},
    "/status": {"get": _op("The status page (same as /)", {"200": {
        "description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}}})},
    "/metrics": {"get": _op("Prometheus metrics (text exposition 0.0.4)", {"200": {
        "description": "metrics", "content": {"text/plain": {"schema": {"type": "string"}}}}})},
    "/api/v1/openapi.json": {"get": _op("This description", {"200": _json({"type": "object"})})},
    "/api/v1/studies": {"get": _op("Latest studies with their series and jobs", {
        "200": _json({"type": "object", "properties": {"studies": {"type": "array", "items": _ref("Study")}}}),
        "400": _error("Bad limit")}, parameters=[_LIMIT])},
    "/api/v1/studies/{study_uid}": {"get": _op("One study", {
        "200": _json(_ref("Study")), "400": _error("Not a UID"), "404": _error("No such study")},
        parameters=[_STUDY_UID])},
    "/api/v1/jobs": {"get": _op("Latest jobs with per-stage timings, and counts per state", {
        "200": _json({"type": "object", "properties": {"jobs": {"type": "array", "items": _ref("Job")},
                                                       "counts": {"type": "object"}}}),
        "400": _error("Bad state, study or limit")},
        parameters=[{"name": "state", "in": "query", "schema": {"type": "string", "enum": _STATES}},
                    {"name": "study", "in": "query", "schema": {"type": "string"}}, _LIMIT])},
    "/api/v1/jobs/{job_id}": {"get": _op("One job: rule, profile, backend, errors, history, deliveries", {
        "200": _json(_ref("JobDetail")), "400": _error("Not a job id"), "404": _error("No such job")},
        parameters=[_JOB_ID])},
    "/api/v1/jobs/{job_id}/retry": {"post": _op(
        "Retry: re-run a failed job, resend a dead-lettered one, re-route a not-routed one", {
            "200": _json({"type": "object", "properties": {"job_id": {"type": "integer"},
                                                           "state": {"type": "string", "enum": _STATES}}}),
            "404": _error("No such job"), "409": _error("The job is not in a state that can be retried")},
        parameters=[_JOB_ID])},
    **{f"/api/v1/jobs/{{job_id}}/{verb}": {"post": _op(
        f"Review: {what} (the acting user is the reviewer; user and comment go to the audit log)", {
            "200": _json({"type": "object", "properties": {"job_id": {"type": "integer"},
                                                           "state": {"type": "string", "enum": _STATES}}}),
            "400": _error("A bad body"), "404": _error("No such job"),
            "409": _error("The job is not held for review")},
        parameters=[_JOB_ID],
        requestBody={"required": True, "content": {"application/json": {"schema": {
            "type": "object",
            "properties": {"reviewer": {"type": "string", "maxLength": 64,
                                        "description": "optional; if given, must be the acting user (else 403)"},
                           "comment": {"type": "string", "maxLength": 500}}}}}})}
       for verb, what in (("approve", "send a held job's result"), ("reject", "never send a held job's result"))},
    "/jobs/{job_id}/review": {"get": _op("The job page (HTML): QC figures, pictures, approve/reject form", {
        "200": {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}},
        "404": _error("No such job")}, parameters=[_JOB_ID])},
    "/jobs/{job_id}/review/{file}": {"get": _op("One review picture (PNG)", {
        "200": {"description": "PNG", "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}},
        "404": _error("No such picture")},
        parameters=[_JOB_ID, {"name": "file", "in": "path", "required": True, "schema": {"type": "string"}}])},
    "/jobs/{job_id}/decision": {"post": _op("The job page's form: approve or reject (csrf, decision, comment)", {
        "200": {"description": "the job page again", "content": {"text/html": {"schema": {"type": "string"}}}},
        "400": _error("No decision"), "409": _error("The job is not held for review")},
        parameters=[_JOB_ID], requestBody={"required": True, "content": {
            "application/x-www-form-urlencoded": {"schema": {"type": "object"}}}})},
    "/api/v1/routes": {"get": _op("The routing rules in force", {
        "200": _json({"type": "object", "properties": {"source": {"type": "string"},
                                                       "rules": {"type": "array", "items": {"type": "object"}}}}),
        "503": _error("No rules loaded")})},
    "/api/v1/routes/validate": {"post": _op(
        "Validate a candidate rules file without applying it", {
            "200": _json(_ref("Validation")), "400": _error("Empty body"), "413": _error("Body too large")},
        requestBody={"required": True, "content": {"application/yaml": {"schema": {"type": "string"}}}})},
    "/api/v1/datasets": {"get": _op("Datasets of the dataset store: cases, label status, versions", {
        "200": _json({"type": "object"})})},
    "/api/v1/fetch": {
        "post": _op("Ask the node to retrieve a study from a configured source (PACS) and segment it; answers at "
                    "once, the fetch runs in the node (docs/sources.md)", {
                        "202": {**_json(_ref("Fetch"), "Accepted: queued (Location: /api/v1/fetch/{fetch_id})"),
                                "headers": {"Location": {"schema": {"type": "string"}}}},
                        "400": _error("A bad body"), "404": _error("Unknown source, rule or profile")},
                    requestBody={"required": True, "content": {"application/json": {"schema": _ref("FetchBody")}}}),
        "get": _op("The recent fetch requests, newest first", {
            "200": _json({"type": "object", "properties": {"fetches": {"type": "array", "items": _ref("Fetch")}}}),
            "400": _error("A bad limit")}, parameters=[_LIMIT])},
    "/api/v1/fetch/{fetch_id}": {"get": _op("One fetch request: its state, who asked and when, the report or the "
                                            "reason it failed", {
        "200": _json(_ref("Fetch")), "400": _error("Not a number"), "404": _error("No such fetch request")},
        parameters=[{"name": "fetch_id", "in": "path", "required": True,
                     "schema": {"type": "integer", "minimum": 1}}])},
    "/viewer/": {"get": _op("The OHIF Viewer (HTML; docs/review.md, The viewer)", {
        "200": {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}},
        "503": {"description": "the viewer is not installed (make viewer)"}})},
    "/viewer/{file}": {"get": _op("A file of the OHIF Viewer, its app-config.js, or its page for OHIF's routes", {
        "200": {"description": "the file"}, "400": _error("Not a file name of the viewer"),
        "404": _error("No such file"), "503": {"description": "the viewer is not installed (make viewer)"}},
        parameters=[{"name": "file", "in": "path", "required": True, "schema": {"type": "string"}}])},
    "/dicomweb/{resource}": {"get": _op("QIDO-RS and WADO-RS (PS3.18) of the spool and the jobs' results", {
        "200": {"description": "application/dicom+json, or multipart/related parts"},
        "400": _error("A bad UID, attribute, frame list or parameter"), "404": _error("Not on this node"),
        "406": _error("A media type or transfer syntax the node cannot send")},
        parameters=[{"name": "resource", "in": "path", "required": True, "schema": {"type": "string"}}])},
}


def document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "segnode ops API", "version": VERSION,
                 "description": "Health, studies, jobs, routes and datasets of one segnode node. "
                                "Bound to loopback by default; when a token or accounts are configured "
                                "every operation except /healthz, /readyz and /login needs a login "
                                "(session cookie + CSRF token) or a bearer token."},
        "servers": [{"url": "http://127.0.0.1:8080"}],
        "security": [{"bearer": []}, {"session": []}],
        "paths": PATHS,
        "components": {"schemas": SCHEMAS, "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer"},
            "session": {"type": "apiKey", "in": "cookie", "name": "segnode_session",
                        "description": "from POST /login; state-changing requests also need X-CSRF-Token"}}},
    }


def document_bytes() -> bytes:
    return (json.dumps(document(), indent=1) + "\n").encode("utf-8")
