"""A late instance while the series' job is still queued or segmenting: one current result, the newer one.

Before, only an earlier job with a result was superseded: a job still queued or
segmenting when its series was re-opened went on, and its result came after the
newer job's (or beside it) and was taken for the current one.  Now a queued job
never runs, and a running one sends nothing when it ends while the newer job
lives; if the newer job fails, the older one's result stands.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from segnode.node.config import NodeConfig
from segnode.node.jobs.worker import JobOutcome
from segnode.node.service import Service
from segnode.storage.index import Index, JobState
from segnode.storage.spool import Spool

from tests.node.test_completion import Clock, _receive, _sweep
from tests.study_fixtures import THORAX

FAILED = JobOutcome(ok=False, error_kind="BackendError", message="the model fell over")


def one_short(tmp_path: Path) -> tuple[Path, Path]:
    """The thorax series without its last instance, and that instance alone (the late one)."""
    files = sorted(THORAX.glob("*.dcm"))
    first, late = tmp_path / "first", tmp_path / "late"
    first.mkdir()
    late.mkdir()
    for f in files[:-1]:
        shutil.copy(f, first / f.name)
    shutil.copy(files[-1], late / files[-1].name)
    return first, late


def routed_then_late(tmp_path: Path, claim_first: bool) -> tuple[Index, Spool, int, int]:
    clock = Clock()
    sweep, index, spool = _sweep(tmp_path, clock)
    first, late = one_short(tmp_path)
    _receive(index, spool, first)
    clock.now += 11.0
    assert sweep.sweep()
    [old] = index.jobs(JobState.COMPLETE)
    if claim_first:
        claimed = index.claim_next()
        assert claimed is not None and claimed.job_id == old.job_id
    clock.now += 1.0
    _receive(index, spool, late)
    clock.now += 11.0
    assert sweep.sweep()
    [new] = index.jobs(JobState.COMPLETE)
    assert new.job_id != old.job_id and new.options["supersedes"] == [old.job_id]
    return index, spool, old.job_id, new.job_id


def state(index: Index, job_id: int) -> tuple[JobState, str]:
    job = index.job(job_id)
    assert job is not None
    return job.state, job.reason or ""


def test_a_queued_job_is_superseded_before_it_runs(tmp_path: Path) -> None:
    index, _, old, new = routed_then_late(tmp_path, claim_first=False)
    assert state(index, old) == (JobState.SUPERSEDED, f"superseded by job {new} before it ran")
    claimed = index.claim_next()
    assert claimed is not None and claimed.job_id == new and index.claim_next() is None


def test_a_running_job_sends_nothing_when_it_ends_after_its_series_was_routed_again(tmp_path: Path) -> None:
    index, _, old, new = routed_then_late(tmp_path, claim_first=True)
    assert state(index, old)[0] is JobState.SEGMENTING  # still running: it is left to end
    service = Service(_config(tmp_path))
    job = index.job(old)
    assert job is not None
    service.finish_job(job, FAILED, 0.0)
    assert state(index, old) == (JobState.SUPERSEDED,
                                 f"superseded by job {new}, routed while this one ran; its result is not sent")
    assert index.deliveries(old) == []


def test_if_the_newer_job_failed_the_older_ones_outcome_stands(tmp_path: Path) -> None:
    index, _, old, new = routed_then_late(tmp_path, claim_first=True)
    claimed = index.claim_next()
    assert claimed is not None and claimed.job_id == new
    assert index.transition(new, JobState.FAILED, "the model fell over")
    service = Service(_config(tmp_path))
    job = index.job(old)
    assert job is not None and index.superseded_by(job) is None
    service.finish_job(job, FAILED, 0.0)
    assert state(index, old) == (JobState.FAILED, "BackendError: the model fell over")


def test_an_outcome_for_a_job_superseded_meanwhile_is_not_recorded(tmp_path: Path) -> None:
    index, _, old, new = routed_then_late(tmp_path, claim_first=True)
    assert index.transition(old, JobState.SUPERSEDED, f"superseded by job {new}")  # the newer job was encoded first
    service = Service(_config(tmp_path))
    job = index.job(old)
    assert job is not None
    service.finish_job(job, FAILED, 0.0)
    assert state(index, old) == (JobState.SUPERSEDED, f"superseded by job {new}")


def _config(tmp_path: Path) -> NodeConfig:
    return NodeConfig(state_dir=tmp_path / "state", completion={"quiet_period_s": 10})  # as _sweep's
