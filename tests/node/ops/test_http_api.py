"""The ops HTTP API over a real socket: every endpoint, authentication refusals, errors."""

from __future__ import annotations

import base64
import json
import re
import types

import numpy as np
import pytest
from segnode.errors import ConfigError
from segnode.node.config import NodeConfig
from segnode.node.config.http import HttpConfig
from segnode.node.dicom_in.server import start_scp
from segnode.node.ops.api import start_http
from segnode.node.ops.audit import read_records
from segnode.node.ops.runner import Ops, audit_path
from segnode.routing import RulesHolder
from segnode.storage.spool import Spool

from tests.ops_helpers import STUDY, http, json_of, scripted_index

TOKEN = "s3cret-token-0123456789abcdef"


def _node(tmp_path, *, token: bool, scp: bool = False, **config):
    http_cfg = {"port": 0}
    if token:
        (tmp_path / "token").write_text(TOKEN + "\n")
        (tmp_path / "token").chmod(0o600)
        http_cfg["token_file"] = str(tmp_path / "token")
    cfg = NodeConfig(port=0, state_dir=tmp_path / "state", http=http_cfg, limits={"min_free_disk_mb": 1}, **config)
    s = scripted_index(cfg.index_path)
    service = types.SimpleNamespace(config=cfg, index=s.index, rules=RulesHolder(None), scp=None, listeners=[], remote=None, dicomweb=None, review=None)
    if scp:
        service.scp = start_scp(cfg, Spool(cfg.spool_dir), s.index)
    ops = Ops(service)
    ops.start()
    return s, service, ops


@pytest.fixture
def api(tmp_path):
    s, service, ops = _node(tmp_path, token=False, scp=True,
                            destinations=({"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242},))
    yield s, ops.http.url, ops
    ops.stop()
    if service.scp.thread.is_alive():  # a test may have stopped it already
        service.scp.stop()


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    s, service, ops = _node(tmp_path_factory.mktemp("secured"), token=True)
    yield s, ops.http.url
    ops.stop()


# -- authentication ----------------------------------------------------------------------------

SECURED = [("GET", "/"), ("GET", "/status"), ("GET", "/metrics"), ("GET", "/api/v1/openapi.json"),
           ("GET", "/api/v1/studies"), ("GET", f"/api/v1/studies/{STUDY}"), ("GET", "/api/v1/jobs"),
           ("GET", "/api/v1/jobs/1"), ("POST", "/api/v1/jobs/2/retry"), ("GET", "/api/v1/routes"),
           ("POST", "/api/v1/routes/validate"), ("GET", "/api/v1/datasets")]


@pytest.mark.parametrize(("method", "path"), SECURED)
def test_every_endpoint_refuses_a_missing_or_wrong_token(secured, method, path):
    _, url = secured
    body = b"rules: []\n" if method == "POST" else None
    for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789abcdef"}, {"Authorization": TOKEN},
                    {"Authorization": "Basic " + base64.b64encode(b"ops:wrong").decode()}):
        status, resp_headers, data = http(url + path, method=method, body=body, headers=headers)
        assert status == 401, (headers, status)
        expected = "missing or wrong token" if headers else "log in, or send a bearer token"
        assert json.loads(data) == {"error": expected}
        assert "Bearer" in resp_headers["WWW-Authenticate"]


@pytest.mark.parametrize(("method", "path"), SECURED)
def test_every_endpoint_accepts_the_bearer_token(secured, method, path):
    _, url = secured
    body = b"rules: []\n" if method == "POST" else None
    status, _, _ = http(url + path, method=method, body=body, token=TOKEN)
    assert status not in (401, 403, 404, 405)


def test_basic_auth_is_not_accepted_browsers_log_in(secured):
    """Browsers replay cached Basic credentials on a cross-site form post: people log in instead."""
    _, url = secured
    basic = "Basic " + base64.b64encode(f"anyone:{TOKEN}".encode()).decode()
    status, headers, _ = http(url + "/status", headers={"Authorization": basic})
    assert status == 401 and "Basic" not in headers["WWW-Authenticate"]


def test_health_and_readiness_need_no_token(secured):
    _, url = secured
    assert http(url + "/healthz")[0] == 200
    status, _, body = http(url + "/readyz")
    assert status == 503  # this node has no DICOM listener
    assert json.loads(body)["checks"]["scp"]["ok"] is False


def test_an_exposed_bind_without_a_token_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="not a loopback address"):
        start_http(HttpConfig(host="0.0.0.0", port=0), app=None)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="not a loopback address"):
        start_http(HttpConfig(host="segnode.example.org", port=0), app=None)  # type: ignore[arg-type]
    assert HttpConfig(host="::1").is_loopback and HttpConfig(host="127.0.0.5").is_loopback
    assert HttpConfig(host="localhost").is_loopback


def test_bad_token_files_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the HTTP token file"):
        start_http(HttpConfig(port=0, token_file=tmp_path / "missing"), app=None)  # type: ignore[arg-type]
    (tmp_path / "short").write_text("abc\n")
    with pytest.raises(ConfigError, match="at least 16 characters"):
        start_http(HttpConfig(port=0, token_file=tmp_path / "short"), app=None)  # type: ignore[arg-type]


def test_a_busy_port_is_a_config_error(api, tmp_path):
    _, url, ops = api
    port = int(url.rsplit(":", 1)[1])
    with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}"):
        start_http(HttpConfig(port=port), app=ops.app())


# -- health ------------------------------------------------------------------------------------


def test_healthz_and_readyz(api):
    _, url, ops = api
    assert json_of(http(url + "/healthz")) == {"status": "ok"}
    status, _, body = http(url + "/readyz")
    ready = json.loads(body)
    assert status == 200 and ready["ready"] is True
    assert set(ready["checks"]) == {"index", "scp", "disk", "rules", "audit"}
    ops.service.scp.stop()
    status, _, body = http(url + "/readyz")
    assert status == 503 and json.loads(body)["checks"]["scp"] == {"ok": False,
                                                                  "detail": "the DICOM listener is not running"}


# -- studies and jobs ----------------------------------------------------------------------------


def test_jobs_with_states_and_per_stage_timings(api):
    s, url, _ = api
    data = json_of(http(url + "/api/v1/jobs"))
    assert [j["job_id"] for j in data["jobs"]] == sorted(s.jobs.values(), reverse=True)
    assert data["counts"] == {"done": 1, "failed": 1, "not_routed": 1, "dead_letter": 1, "received": 1}
    done = next(j for j in data["jobs"] if j["job_id"] == s.jobs["done"])
    assert done["state"] == "done" and done["rule"] == "ct-lungs" and done["profile"] == "lungs"
    assert done["timings_s"] == {"ingest": 9.0, "queue": 2.0, "segment": 30.0, "dispatch": 3.0}
    failed = json_of(http(url + "/api/v1/jobs?state=failed"))["jobs"]
    assert [j["job_id"] for j in failed] == [s.jobs["failed"]]
    assert failed[0]["timings_s"] == {"ingest": 43.0, "queue": 0.0, "segment": 12.0}
    assert len(json_of(http(url + "/api/v1/jobs?limit=2"))["jobs"]) == 2
    assert len(json_of(http(url + f"/api/v1/jobs?study={STUDY}"))["jobs"]) == 5


@pytest.mark.parametrize(("query", "message"), [
    ("state=bogus", "unknown state 'bogus'"), ("limit=0", "limit must be between 1 and 1000"),
    ("limit=x", "limit must be an integer"), ("study=../../etc", "study is not a valid DICOM UID"),
])
def test_jobs_bad_queries_are_400(api, query, message):
    _, url, _ = api
    status, _, body = http(url + "/api/v1/jobs?" + query)
    assert status == 400 and message in json.loads(body)["error"]


def test_job_detail_has_rule_profile_backend_errors_and_history(api):
    s, url, _ = api
    done = json_of(http(url + f"/api/v1/jobs/{s.jobs['done']}"))
    assert (done["rule"], done["profile"], done["backend"]) == ("ct-lungs", "lungs", "hu_based")
    assert done["backend_used"] == "hu_based" and done["seg_sop_uid"] == "1.2.3.4.1"
    assert done["sender"] == {"calling_ae": "SCANNER1", "called_ae": "SEGNODE", "host": "127.0.0.1"}
    assert [e["state"] for e in done["events"]] == ["received", "complete", "segmenting", "encoded", "sending",
                                                    "done"]
    assert done["deliveries"][0]["state"] == "done" and done["errors"] == []
    failed = json_of(http(url + f"/api/v1/jobs/{s.jobs['failed']}"))
    assert failed["errors"] == [{"at": failed["events"][-1]["at"], "state": "failed",
                                 "reason": "BackendError: model crashed"}]
    dead = json_of(http(url + f"/api/v1/jobs/{s.jobs['dead']}"))
    reasons = [e["reason"] for e in dead["errors"]]
    assert "pacs: association rejected permanently" in reasons and "association rejected permanently" in reasons


def test_job_detail_errors(api):
    _, url, _ = api
    assert http(url + "/api/v1/jobs/999")[0] == 404
    status, _, body = http(url + "/api/v1/jobs/abc")
    assert status == 400 and "must be a number" in json.loads(body)["error"]


def test_retry_moves_a_failed_job_and_is_audited(api):
    s, url, ops = api
    status, _, body = http(url + f"/api/v1/jobs/{s.jobs['failed']}/retry", method="POST", body=b"")
    assert status == 200 and json.loads(body) == {"job_id": s.jobs["failed"], "state": "complete"}
    assert s.index.job(s.jobs["failed"]).state.value == "complete"
    status, _, body = http(url + f"/api/v1/jobs/{s.jobs['done']}/retry", method="POST", body=b"")
    assert status == 409 and "only failed, dead_letter or not_routed" in json.loads(body)["error"]
    assert http(url + "/api/v1/jobs/999/retry", method="POST", body=b"")[0] == 404
    assert http(url + f"/api/v1/jobs/{s.jobs['failed']}/retry")[0] == 405  # GET
    records = [r for r in read_records(audit_path(ops.config)) if r["event"] == "api.retry"]
    assert records == [{"event": "api.retry", "time": records[0]["time"], "node": "SEGNODE",
                        "job_id": s.jobs["failed"], "state": "complete", "client": "127.0.0.1"}]


def test_studies_list_and_detail(api):
    s, url, _ = api
    studies = json_of(http(url + "/api/v1/studies"))["studies"]
    assert [st["study_uid"] for st in studies] == [STUDY]
    series = studies[0]["series"]
    assert len(series) == 5 and all(x["instances"] == 2 and x["bytes"] == 2000 for x in series)
    assert {x["jobs"][0]["state"] for x in series} == {"done", "failed", "not_routed", "dead_letter", "received"}
    one = json_of(http(url + f"/api/v1/studies/{STUDY}"))
    assert one["study_uid"] == STUDY and len(one["series"]) == 5
    assert http(url + "/api/v1/studies/1.2.3.999")[0] == 404
    assert http(url + "/api/v1/studies/not-a-uid")[0] == 400


# -- routes -----------------------------------------------------------------------------------------


def test_routes_shows_the_rules_in_force(api):
    _, url, _ = api
    data = json_of(http(url + "/api/v1/routes"))
    assert data == {"source": "(built-in default)",
                    "rules": [{"name": "fallback", "fallback": True, "action": {"profile": "lungs",
                                                                                 "destinations": []}}]}


GOOD_RULES = b"""\
rules:
  - name: ct-chest
    match: {tag: BodyPartExamined, one_of: [CHEST, LUNG]}
    action: {profile: lungs, destinations: [pacs]}
  - name: rest
    fallback: true
    action: {profile: lungs}
"""


def test_validate_a_candidate_rules_file_without_applying_it(api):
    _, url, _ = api
    ok = json_of(http(url + "/api/v1/routes/validate", method="POST", body=GOOD_RULES,
                      headers={"Content-Type": "application/yaml"}))
    assert ok == {"valid": True, "errors": [], "rules": ["ct-chest", "rest"]}
    bad = GOOD_RULES.replace(b"profile: lungs, destinations", b"profile: lungz, destinations")
    result = json_of(http(url + "/api/v1/routes/validate", method="POST", body=bad))
    assert result["valid"] is False
    assert re.search(r"candidate\.yaml:4: .*unknown profile 'lungz'", result["errors"][0]), result
    unknown_dest = GOOD_RULES.replace(b"[pacs]", b"[nowhere]")
    assert "nowhere" in json_of(http(url + "/api/v1/routes/validate", method="POST", body=unknown_dest))["errors"][0]
    assert json_of(http(url + "/api/v1/routes/validate", method="POST", body=b"rules: [\n"))["valid"] is False
    assert json_of(http(url + "/api/v1/routes"))["source"] == "(built-in default)"  # nothing applied
    assert http(url + "/api/v1/routes/validate", method="POST", body=b"  \n")[0] == 400
    status, _, _ = http(url + "/api/v1/routes/validate", method="POST", body=b"#" * (1024 * 1024 + 1))
    assert status == 413


# -- datasets, metrics, status page, OpenAPI ------------------------------------------------------------


def test_datasets_without_and_with_a_store(api, monkeypatch, tmp_path):
    _, url, _ = api
    monkeypatch.setenv("SEGNODE_DATASET_STORE", str(tmp_path / "store"))
    assert json_of(http(url + "/api/v1/datasets")) == {"store": str(tmp_path / "store"), "exists": False,
                                                       "datasets": [], "quarantined": 0}
    from segnode.storage.dataset import CaseInput, DatasetStore
    from segnode.storage.manifest import LabelStatus

    store = DatasetStore.open(tmp_path / "store", b"k" * 32)
    store.add_case(CaseInput(case_id="C0123456789ABCDE", dataset="lungs", patient="P1",
                             image=np.zeros((4, 4, 4), np.int16), affine_lps=np.eye(4),
                             label=np.ones((4, 4, 4), np.uint8), label_names={1: "lung"},
                             label_status=LabelStatus.AUTO))
    store.freeze("lungs")
    data = json_of(http(url + "/api/v1/datasets"))
    assert data["exists"] is True and data["quarantined"] == 0
    assert data["datasets"] == [{"name": "lungs", "cases": 1, "label_status": {"auto": 1}, "versions": [1]}]


def test_metrics_and_status_page_content_types(api):
    _, url, _ = api
    status, headers, body = http(url + "/metrics")
    assert status == 200 and b"segnode_jobs{state=\"failed\"} 1.0" in body
    for path in ("/", "/status"):
        status, headers, body = http(url + path)
        assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
        assert b"BackendError: model crashed" in body


def test_openapi_describes_exactly_the_served_routes(api):
    _, url, ops = api
    doc = json_of(http(url + "/api/v1/openapi.json"))
    assert doc["openapi"].startswith("3.")
    described = {(method.upper(), path) for path, ops_ in doc["paths"].items() for method in ops_}
    served = set()
    for method, pattern, _, _ in ops.http.server.app.routes:  # the served app: with /login and /logout
        path = re.sub(r"\(\?P<(\w+)>[^)]*\)", r"{\1}", pattern.pattern)
        path = path.replace("/(status)?", "/")
        served.add((method, path))
    served.add(("GET", "/status"))
    assert described == served
    for path, item in doc["paths"].items():
        for op in item.values():
            assert ("security" in op) == (path in ("/healthz", "/readyz", "/login")), path


def test_unknown_paths_and_methods(api):
    _, url, _ = api
    status, _, body = http(url + "/api/v2/nothing")
    assert status == 404 and "no such endpoint" in json.loads(body)["error"]
    assert http(url + "/api/v1/jobs", method="DELETE")[0] == 405
