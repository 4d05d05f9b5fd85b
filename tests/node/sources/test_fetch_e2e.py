"""``segnode fetch`` beside a running node, Orthanc as the PACS: by accession → retrieved, routed, one SEG in Orthanc.

C-MOVE (the node's receiver stores what Orthanc sends to its AE title) and
C-GET (``segnode fetch`` stores through the node's store path into the same
spool and index); either way the running node's sweep routes the series.
Through the node's HTTP API, ``POST /api/v1/fetch`` answers 202 and the test
follows ``GET /api/v1/fetch/{id}`` until the fetch, run in the node, is done.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from segnode.node.cli.main import main
from segnode.node.sources.record import RetrievalLog
from segnode.storage.index import Index, JobState
from segnode.storage.spool import Spool

from tests.node.sources.helpers import upload, write_study
from tests.peers import free_port, node, orthanc, port_open, wait_until, write_node_config

pytestmark = [pytest.mark.peer, pytest.mark.slow]


TOKEN = "a-shared-token-for-the-fetch-test"


def fetch_config(tmp_path: Path, port: int, dicom_port: int, method: str, http_port: int = 0) -> Path:
    routes = tmp_path / "routes.yaml"
    routes.write_text(yaml.safe_dump({"rules": [
        {"name": "everything", "fallback": True, "action": {"profile": "lungs", "destinations": ["pacs"]}}]}))
    pacs = {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": dicom_port}
    token = tmp_path / "token"
    token.write_text(TOKEN)
    token.chmod(0o600)
    return write_node_config(tmp_path / "node.yaml", port=port, routes=str(routes),
                             http={"port": http_port, "token_file": str(token)},
                             destinations=[{"name": "pacs", **pacs}],
                             sources=[{"name": "pacs", "retrieve": method, "idle_timeout_s": 30, **pacs}])


def api_call(http_port: int, path: str, body: dict[str, str] | None = None,
             token: str = TOKEN) -> tuple[int, dict[str, str], dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{http_port}{path}",
                                     data=None if body is None else json.dumps(body).encode(),
                                     method="GET" if body is None else "POST",
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())


def api_fetch(http_port: int, body: dict[str, str]) -> tuple[int, dict]:
    """``POST /api/v1/fetch`` (202 with its Location), then ``GET`` that until it ends: its state and report."""
    status, headers, accepted = api_call(http_port, "/api/v1/fetch", body)
    if status != 202:
        return status, accepted
    assert accepted["state"] == "queued" and headers["Location"] == f"/api/v1/fetch/{accepted['id']}"
    ended = wait_until(lambda: (s := api_call(http_port, headers["Location"])[2])["state"] in {"done", "failed"}
                       and s, 120, "the fetch request to end")
    return status, ended


@pytest.mark.parametrize(("method", "via"), [("move", "cli"), ("get", "api")])
def test_fetch_by_accession_one_seg_arrives_in_orthanc(tmp_path: Path, method: str, via: str,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    study = write_study(tmp_path / "study", "ACC-E2E", slices=60)
    other = write_study(tmp_path / "other", "ACC-OTHER", slices=10, seed=3)
    port = free_port()
    with orthanc(tmp_path / "orthanc", node_port=port) as pacs:
        upload(pacs, study)
        upload(pacs, other)
        http_port = free_port()
        config = fetch_config(tmp_path, port, pacs.dicom_port, method, http_port)
        with node(config) as n:
            wait_until(lambda: port_open(http_port), 30, "the ops API")
            if via == "cli":
                assert main(["fetch", "--config", str(config), "--from", "pacs", "--accession", "ACC-E2E",
                             "--by", "tester"]) == 0
                out = capsys.readouterr().out
                assert f"series {study.series_uid} (CT): retrieved, {study.count} instance(s)" in out
            else:
                status, fetch = api_fetch(http_port, {"source": "pacs", "accession": "ACC-E2E", "route": "everything"})
                assert (status, fetch["state"], fetch["by"]) == (202, "done", "shared-token"), fetch
                [series] = fetch["report"]["series"]
                assert (series["series_uid"], series["completed"], series["error"]) == (study.series_uid, study.count,
                                                                                        None)
                assert series["pinned_job"] is not None  # forced onto the route at once, before the sweep
                status, nope = api_fetch(http_port, {"source": "pacs", "accession": "NOPE"})
                assert (status, nope["state"]) == (202, "failed") and "no study matches" in nope["error"]
                assert api_fetch(http_port, {"source": "nope", "accession": "ACC-E2E"})[0] == 404
                assert api_fetch(http_port, {"source": "pacs", "accession": "x", "bogus": "1"})[0] == 400
            index = Index(n.state_dir / "index.sqlite")
            job = wait_until(lambda: next((j for j in index.jobs() if j.state in {
                JobState.DONE, JobState.FAILED, JobState.DEAD_LETTER, JobState.NOT_ROUTED}), None), 180, "a job")
            assert job.state is JobState.DONE, job.reason
            if via == "api":
                routed = next(reason for _, state, reason in index.events(job.job_id) if state is JobState.COMPLETE)
                assert "forced by a fetch from pacs by shared-token" in (routed or "")
            assert [j.series_uid for j in index.jobs()] == [study.series_uid]  # the other study stays on the PACS
            info = index.series(study.series_uid)
            assert info is not None and info.instance_count == study.count and info.calling_ae == "ORTHANC"
            if via == "cli":  # re-processed with another model run: the new result supersedes
                today = datetime.now(timezone.utc).date().isoformat()
                assert main(["reprocess", "--config", str(config), "--model", "hu_based", "--since", today]) == 0
                new = wait_until(lambda: next((j for j in index.jobs() if j.job_id != job.job_id and j.state in {
                    JobState.DONE, JobState.FAILED, JobState.DEAD_LETTER}), None), 180, "the re-processed job")
                assert (new.state, new.backend, new.options.get("supersedes")) == (JobState.DONE, "hu_based",
                                                                                   [job.job_id]), new.reason
                wait_until(lambda: index.job(job.job_id).state is JobState.SUPERSEDED, 30, "the old job superseded")
            else:  # after housekeeping removed the series: fetched again (C-GET) and re-processed, superseding
                Spool(n.state_dir / "spool").remove_series(study.study_uid, study.series_uid)
                index.mark_purged(study.series_uid)
                today = datetime.now(timezone.utc).date().isoformat()
                assert main(["reprocess", "--config", str(config), "--model", "hu_based", "--since", today,
                             "--from", "pacs"]) == 0
                assert "fetched again from pacs: job" in capsys.readouterr().out
                new = wait_until(lambda: next((j for j in index.jobs() if j.job_id != job.job_id and j.state in {
                    JobState.DONE, JobState.FAILED, JobState.DEAD_LETTER}), None), 180, "the re-fetched job")
                assert (new.state, new.backend, new.options.get("supersedes")) == (JobState.DONE, "hu_based",
                                                                                   [job.job_id]), new.reason
                wait_until(lambda: index.job(job.job_id).state is JobState.SUPERSEDED, 30, "the old job superseded")
                info = index.series(study.series_uid)
                assert info is not None and info.purged_at is None and info.instance_count == study.count
            index.close()
        entry, *again = RetrievalLog(n.state_dir / "retrievals.sqlite").of_series(study.series_uid)
        assert (entry.source, entry.method, entry.by, entry.completed, entry.error) == (
            "pacs", method, "tester" if via == "cli" else "shared-token", study.count, None)
        assert [(e.method, e.completed) for e in again] == ([] if via == "cli" else [("get", study.count)])
        segs = pacs.series_by_modality("SEG")
        assert len(segs) == 2  # re-processed: the new version beside the old
        for seg in segs:
            assert pacs.get(f"/studies/{seg['ParentStudy']}")["MainDicomTags"]["StudyInstanceUID"] == study.study_uid


def test_fetch_of_an_unknown_accession_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with orthanc(tmp_path / "orthanc") as pacs:
        config = fetch_config(tmp_path, free_port(), pacs.dicom_port, "move")
        code = main(["fetch", "--config", str(config), "--from", "pacs", "--accession", "NOPE-1"])
    assert code == 3
    assert "segnode: error: source pacs: no study matches accession NOPE-1" in capsys.readouterr().err
    assert not (tmp_path / "state" / "index.sqlite").exists() or Index(tmp_path / "state" / "index.sqlite").jobs() == []
