"""The node's side of remote workers without a broker: tokens, result paths, configuration."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from pydantic import ValidationError
from segnode.errors import InputError
from segnode.node.config import NodeConfig
from segnode.node.remote.jobs import RemoteJobs, rebase, safe_relative
from segnode.node.remote.worker import relative


def remote(tmp_path: Path, job: object | None) -> RemoteJobs:
    config = NodeConfig(state_dir=tmp_path, broker={"url": "amqp://guest:guest@127.0.0.1:1//"})
    index = SimpleNamespace(job=lambda job_id: job)
    return RemoteJobs(SimpleNamespace(config=config, index=index, dicomweb=None))


def test_job_tokens_are_bound_to_job_and_attempt(tmp_path: Path) -> None:
    from segnode.storage.index import JobState

    job = SimpleNamespace(state=JobState.SEGMENTING, segment_attempts=2, study_uid="1.2", series_uid="1.2.3")
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
    out = tmp_path / "out"
    record = {"seg_path": str(out / "seg.dcm"), "outputs": [{"path": str(out / "sub" / "rt.dcm")}], "n": 3}
    shipped = relative(record, out)
    assert shipped == {"seg_path": "@out/seg.dcm", "outputs": [{"path": "@out/sub/rt.dcm"}], "n": 3}
    node_out = tmp_path / "node"
    assert rebase(shipped, node_out)["outputs"][0]["path"] == str(node_out / "sub" / "rt.dcm")
    for bad in ("../x", "/etc/passwd", "a/../../b", "", ".hidden", "a//b"):
        with pytest.raises(InputError):
            safe_relative(bad)


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
