"""``/api/v1/fetch`` over a real socket against a scripted PACS (pynetdicom): 202 at once, the fetch in the node.

The PACS answers C-FIND and C-GET for one small CT study; its study-level
C-FIND holds until the test releases it, so a request stays ``running``
(and a third one ``queued`` behind the bound of two per source) for as long
as the test needs: the states, a node stopped with requests running and
queued, and the next start taking them up are all deterministic.
"""

from __future__ import annotations

import json
import threading
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import (
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)
from segnode.node.config import NodeConfig
from segnode.node.dicom_in.server import start_scp
from segnode.node.ops.accounts import AccountStore
from segnode.node.ops.audit import read_records
from segnode.node.ops.roles import Role
from segnode.node.ops.runner import Ops, audit_path
from segnode.node.sources.record import RetrievalLog
from segnode.routing import RulesHolder
from segnode.storage.index import Index
from segnode.storage.spool import Spool

from tests.node.ops.test_accounts import PASSWORD, Client
from tests.node.sources.helpers import Study, write_study
from tests.peers import free_port, wait_until

TOKEN = "fetch-api-shared-token-0123456789"
ACCESSION = "ACC-API"


@dataclass
class Pacs:
    """The scripted PACS: one study; study-level C-FINDs wait for ``release``; what it answered."""

    study: Study
    port: int = 0
    release: threading.Event = field(default_factory=threading.Event)
    gets: int = 0

    def find(self, event: Event) -> Iterator[tuple[int, Dataset | None]]:
        query = event.identifier
        if query.QueryRetrieveLevel == "STUDY":
            self.release.wait(30)
            if query.get("AccessionNumber") not in (ACCESSION, "", None):
                yield 0x0000, None
                return
            yield 0xFF00, _answer(StudyInstanceUID=self.study.study_uid, AccessionNumber=ACCESSION,
                                  QueryRetrieveLevel="STUDY")
        else:
            yield 0xFF00, _answer(StudyInstanceUID=self.study.study_uid, SeriesInstanceUID=self.study.series_uid,
                                  Modality="CT", QueryRetrieveLevel="SERIES")

    def get(self, event: Event) -> Iterator[object]:
        self.gets += 1
        files = sorted(self.study.folder.glob("*.dcm"))
        yield len(files)
        for path in files:
            yield 0xFF00, dcmread(path)


def _answer(**values: str) -> Dataset:
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Study:
    return write_study(tmp_path_factory.mktemp("study"), ACCESSION, slices=3)


@pytest.fixture
def pacs(study: Study) -> Iterator[Pacs]:
    script = Pacs(study, free_port())
    ae = AE(ae_title="FAKEPACS")
    for model in (StudyRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelGet):
        ae.add_supported_context(model)
    ae.add_supported_context(CTImageStorage, scu_role=True, scp_role=True)
    server = ae.start_server(("127.0.0.1", script.port), block=False,
                             evt_handlers=[(evt.EVT_C_FIND, script.find), (evt.EVT_C_GET, script.get)])
    try:
        yield script
    finally:
        script.release.set()
        server.shutdown()


@dataclass
class Node:
    config: NodeConfig
    service: types.SimpleNamespace
    ops: Ops

    @property
    def url(self) -> str:
        assert self.ops.http is not None
        return self.ops.http.url

    def restart(self) -> Ops:
        """The ops side stopped and started again over the same state (a node restart, as far as fetches go)."""
        before = self.ops
        before.stop()
        self.ops = Ops(self.service)
        self.ops.start()
        return before


@pytest.fixture
def node(tmp_path: Path, pacs: Pacs) -> Iterator[Node]:
    (tmp_path / "token").write_text(TOKEN)
    (tmp_path / "token").chmod(0o600)
    config = NodeConfig(port=0, state_dir=tmp_path / "state", limits={"min_free_disk_mb": 1},
                        http={"port": 0, "token_file": str(tmp_path / "token")},
                        sources=[{"name": "pacs", "ae_title": "FAKEPACS", "host": "127.0.0.1", "port": pacs.port,
                                  "retrieve": "get", "query_timeout_s": 60, "idle_timeout_s": 60}])
    accounts = AccountStore.in_state_dir(config.state_dir)
    accounts.add("alice", frozenset({Role.REVIEWER}), PASSWORD["alice"])
    accounts.add("olga", frozenset({Role.OPS}), PASSWORD["olga"])
    index = Index(config.index_path)
    scp = start_scp(config, Spool(config.spool_dir), index)
    service = types.SimpleNamespace(config=config, index=index, rules=RulesHolder(None), scp=scp, listeners=[],
                                    remote=None, dicomweb=None, review=None)
    ops = Ops(service)
    ops.start()
    running = Node(config, service, ops)
    yield running
    pacs.release.set()
    running.ops.stop()
    running.ops.fetches.join(30)
    scp.stop()
    index.close()


def call(node: Node, method: str, path: str, body: dict[str, str] | None = None,
         token: str | None = TOKEN) -> tuple[int, dict[str, str], dict]:
    client = Client(node.url)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    status, response_headers, data = client.request(method, path, None if body is None else json.dumps(body).encode(),
                                                    headers)
    return status, dict(response_headers), json.loads(data)


def post(node: Node, body: dict[str, str]) -> tuple[int, dict[str, str], dict]:
    return call(node, "POST", "/api/v1/fetch", body)


def state_of(node: Node, fetch_id: int) -> dict:
    status, _, body = call(node, "GET", f"/api/v1/fetch/{fetch_id}")
    assert status == 200, body
    return body


def ended(node: Node, fetch_id: int) -> dict:
    return wait_until(lambda: (s := state_of(node, fetch_id))["state"] in {"done", "failed"} and s, 60,
                      f"fetch request {fetch_id} to end")


def test_post_answers_202_at_once_and_get_follows_the_request(node: Node, pacs: Pacs, study: Study) -> None:
    status, headers, body = post(node, {"source": "pacs", "accession": ACCESSION})
    assert status == 202, body  # while the PACS still holds the query: the fetch is not on the HTTP thread
    assert headers["Location"] == f"/api/v1/fetch/{body['id']}"
    assert (body["state"], body["source"], body["by"], body["query"]) == ("queued", "pacs", "shared-token",
                                                                          f"accession {ACCESSION}")
    first = body["id"]
    second = post(node, {"source": "pacs", "accession": ACCESSION})[2]["id"]
    third = post(node, {"source": "pacs", "accession": "NOPE"})[2]["id"]
    assert [state_of(node, n)["state"] for n in (first, second, third)] == ["running", "running", "queued"]
    listed = call(node, "GET", "/api/v1/fetch?limit=2")[2]["fetches"]
    assert [f["id"] for f in listed] == [third, second]  # newest first, bounded
    pacs.release.set()
    done = ended(node, first)
    assert (done["state"], done["error"], done["attempts"], done["by"]) == ("done", None, 1, "shared-token")
    assert done["requested_at"] <= done["started_at"] <= done["finished_at"]
    [series] = done["report"]["series"]
    assert (series["series_uid"], series["method"], series["completed"]) == (study.series_uid, "get", study.count)
    assert ended(node, second)["state"] == "done"
    failed = ended(node, third)
    assert failed["state"] == "failed" and "no study matches accession NOPE" in failed["error"]
    log = RetrievalLog(node.config.state_dir / "retrievals.sqlite").of_series(study.series_uid)
    assert [(r.by, r.method, r.completed) for r in log] == [("shared-token", "get", study.count)] * 2
    records = [r for r in read_records(audit_path(node.config)) if r["event"] == "fetch.requested"]
    assert len(records) == 3 and all(r["user"] == "shared-token" and r["via"] == "token" for r in records)


@pytest.mark.parametrize(("body", "status", "message"), [
    ({"accession": ACCESSION}, 400, "a JSON object with 'source'"),
    ({"source": "pacs", "accession": ACCESSION, "bogus": "1"}, 400, "unknown keys: bogus"),
    ({"source": "pacs"}, 400, "a query needs an accession number"),
    ({"source": "pacs", "accession": ACCESSION, "since": "yesterday"}, 400, "since:"),
    ({"source": "pacs", "accession": ACCESSION, "route": "r", "profile": "lungs"}, 400, "not both"),
    ({"source": "nope", "accession": ACCESSION}, 404, "unknown source 'nope'"),
    ({"source": "pacs", "accession": ACCESSION, "route": "nope"}, 404, "unknown rule 'nope'"),
    ({"source": "pacs", "accession": ACCESSION, "profile": "nope"}, 404, "unknown profile 'nope'"),
])
def test_a_bad_request_is_refused_before_it_is_accepted(node: Node, body: dict[str, str], status: int,
                                                         message: str) -> None:
    answer = post(node, body)
    assert (answer[0], message in answer[2]["error"]) == (status, True), answer
    assert call(node, "GET", "/api/v1/fetch")[2] == {"fetches": []}
    assert call(node, "GET", "/api/v1/fetch/1")[0] == 404
    assert call(node, "GET", "/api/v1/fetch/x")[0] == 400


def test_roles_csrf_and_origin(node: Node, pacs: Pacs) -> None:
    body = json.dumps({"source": "pacs", "accession": ACCESSION}).encode()
    assert call(node, "POST", "/api/v1/fetch", {"source": "pacs", "accession": ACCESSION}, token=None)[0] == 401
    assert call(node, "GET", "/api/v1/fetch", token=None)[0] == 401
    alice, olga = Client(node.url), Client(node.url)
    alice.login("alice", PASSWORD["alice"])
    olga.login("olga", PASSWORD["olga"])
    json_type = {"Content-Type": "application/json"}
    assert alice.request("POST", "/api/v1/fetch", body, {**json_type, "Origin": node.url,
                                                         "X-CSRF-Token": alice.csrf or ""})[0] == 403  # a reviewer
    assert alice.request("GET", "/api/v1/fetch")[0] == 403
    assert olga.request("POST", "/api/v1/fetch", body, {**json_type, "Origin": node.url})[0] == 403  # no CSRF token
    assert olga.request("POST", "/api/v1/fetch", body, {**json_type, "Origin": "http://evil.example",
                                                        "X-CSRF-Token": olga.csrf or ""})[0] == 403
    assert call(node, "GET", "/api/v1/fetch")[2] == {"fetches": []}  # nothing refused was accepted
    status, _, data = olga.request("POST", "/api/v1/fetch", body, {**json_type, "Origin": node.url,
                                                                   "X-CSRF-Token": olga.csrf or ""})
    assert status == 202 and json.loads(data)["by"] == "olga"
    [record] = [r for r in read_records(audit_path(node.config)) if r["event"] == "fetch.requested"]
    assert (record["user"], record["via"], record["state"]) == ("olga", "session", "queued")
    pacs.release.set()
    assert ended(node, json.loads(data)["id"])["by"] == "olga"


def test_a_restart_takes_up_what_was_running_and_queued(node: Node, pacs: Pacs, study: Study) -> None:
    ids = [post(node, {"source": "pacs", "accession": ACCESSION})[2]["id"] for _ in range(3)]
    assert [state_of(node, n)["state"] for n in ids] == ["running", "running", "queued"]
    before = node.restart()  # stopped with two fetches held in their query and one waiting
    assert [state_of(node, n)["state"] for n in ids] == ["running", "running", "queued"]  # taken up again
    pacs.release.set()
    outcomes = [ended(node, n) for n in ids]
    assert [(o["state"], o["attempts"]) for o in outcomes] == [("done", 2), ("done", 2), ("done", 1)]
    assert all(o["report"]["series"][0]["completed"] == study.count for o in outcomes)
    assert before.fetches.join(30)  # the runs begun before the stop ended; their outcome was not kept
    assert [(o["state"], o["attempts"]) for o in map(lambda n: state_of(node, n), ids)] == [
        ("done", 2), ("done", 2), ("done", 1)]
    assert pacs.gets == 5  # each run retrieved the series; storing it again is harmless
    info = node.service.index.series(study.series_uid)
    assert info is not None and info.instance_count == study.count
