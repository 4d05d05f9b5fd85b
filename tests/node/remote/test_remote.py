"""The node's side of remote workers without a broker: tokens, result paths, configuration."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from pydantic import ValidationError
from segnode.errors import InputError
from segnode.node.config import NodeConfig
from segnode.node.jobs.result import safe_relative
from segnode.node.remote.jobs import RemoteJobs
from segnode.node.remote.worker import prepare_state, sweep_orphans


def remote(tmp_path: Path, job: object | None) -> RemoteJobs:
    config = NodeConfig(state_dir=tmp_path, broker={"url": "amqp://guest:guest@127.0.0.1:1//"})
    index = SimpleNamespace(job=lambda job_id: job)
    return RemoteJobs(SimpleNamespace(config=config, index=index, dicomweb=None))


def test_job_tokens_are_bound_to_job_and_attempt(tmp_path: Path) -> None:
    from segnode.storage.index import JobState

    job = SimpleNamespace(state=JobState.SEGMENTING, segment_attempts=2, study_uid="1.2", series_uid="1.2.3", options={})
    jobs = remote(tmp_path, job)
    token = jobs.token(7, 2)
    grant = jobs.grant(token)
    assert grant is not None and grant.current and (grant.job_id, grant.attempt, grant.series_uid) == (7, 2, "1.2.3")
    assert jobs.grant(jobs.token(7, 1)).current is False  # an earlier attempt: valid, no longer waited for
    forged = token[:-3] + ("AAA" if not token.endswith("AAA") else "BBB")
    assert jobs.grant(forged) is None and jobs.grant("job.7.2") is None
    assert jobs.grant(token.replace("job.7.", "job.8.")) is None  # the MAC covers the job id
    assert (tmp_path / "remote.secret").stat().st_mode & 0o077 == 0
    assert remote(tmp_path, job).token(7, 2) == token  # the secret persists across restarts


def test_result_paths_stay_inside_the_job_folder(tmp_path: Path) -> None:
    assert safe_relative("sub/rt.dcm") == "sub/rt.dcm"
    for bad in ("../x", "/etc/passwd", "a/../../b", "", ".hidden", "a//b", "a/b/c/d/e"):
        with pytest.raises(InputError):
            safe_relative(bad)


def test_a_remote_result_naming_a_file_not_sent_fails_the_job(tmp_path: Path) -> None:
    from tests.node.jobs.test_job_result import a_result

    result = a_result()
    (tmp_path / "summary_lungs_1.json").write_text("{}")
    outcome = RemoteJobs._outcome({"ok": True, "result": result.to_dict()}, tmp_path)
    assert not outcome.ok and "seg-1.dcm" in (outcome.message or "")
    (tmp_path / "seg-1.dcm").write_bytes(b"x")
    (tmp_path / "review").mkdir()
    (tmp_path / "review" / "lung_left_axial.png").write_bytes(b"x")
    outcome = RemoteJobs._outcome({"ok": True, "result": result.to_dict()}, tmp_path)
    assert outcome.ok and outcome.result == result  # carried as is: no path rewritten
    bad = {**result.to_dict(), "summary": "/etc/passwd"}
    assert RemoteJobs._outcome({"ok": True, "result": bad}, tmp_path).error_kind == "InputError"


def test_worker_state_folder_is_private_and_keeps_only_live_jobs(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    left = state / "jobs" / "999999999-job-1-attempt-1" / "input"  # a killed worker's job (no such pid)
    left.mkdir(parents=True)
    (left / "CT1.dcm").write_bytes(b"patient data")
    jobs = prepare_state(state)
    assert state.stat().st_mode & 0o777 == 0o700 and jobs.stat().st_mode & 0o777 == 0o700
    assert list(jobs.iterdir()) == []
    import os

    mine = jobs / f"{os.getpid()}-job-2-attempt-1"  # this process: alive, kept
    gone = jobs / "999999999-job-3-attempt-1"
    old = jobs / "job-4-attempt-1"  # the layout before the owner's pid was in the name
    for folder in (mine, gone, old):
        folder.mkdir()
    assert sorted(sweep_orphans(jobs)) == [gone.name, old.name]
    assert [f.name for f in jobs.iterdir()] == [mine.name]


def test_destination_is_dimse_or_dicomweb_and_broker_queues_checked() -> None:
    NodeConfig(destinations=[{"name": "web", "dicomweb": {"url": "https://pacs/dicom-web", "auth": "bearer",
                                                          "token_file": "t"}}])
    with pytest.raises(ValidationError, match="not both"):
        NodeConfig(destinations=[{"name": "x", "ae_title": "A", "host": "h", "port": 104,
                                  "dicomweb": {"url": "http://p/dicom-web"}}])
    with pytest.raises(ValidationError, match="ae_title, host and port"):
        NodeConfig(destinations=[{"name": "x", "ae_title": "A"}])
    with pytest.raises(ValidationError, match="bearer needs token_file"):
        NodeConfig(destinations=[{"name": "x", "dicomweb": {"url": "http://p/dicom-web", "auth": "bearer"}}])
    with pytest.raises(ValidationError, match="default_queue"):
        NodeConfig(broker={"url": "amqp://h//", "queues": ["gpu"], "default_queue": "cpu"})
