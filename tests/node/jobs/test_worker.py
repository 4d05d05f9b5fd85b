"""Worker processes (node/jobs/worker.py): result, error and crash outcomes."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from segnode.node.jobs.worker import JobSpec, WorkerPool, run_job

from tests.paths import DATA

THORAX = DATA / "thorax_cta"


SERIES = "1.2.826.0.1.3680043.8.498.46463514962407163207046154574234073129"


@pytest.fixture
def pool() -> Iterator[WorkerPool]:
    with WorkerPool() as workers:
        yield workers


def spec(tmp_path: Path, input_dir: Path, **kw: object) -> JobSpec:
    return JobSpec(job_id=7, series_uid=SERIES, input_dir=str(input_dir), profile="lungs",
                   out_dir=str(tmp_path / "out"), **kw)


def test_spec_round_trips_through_json(tmp_path: Path) -> None:
    s = spec(tmp_path, THORAX, backend="hu_based", threads=2)
    assert JobSpec.from_json(s.to_json()) == s


def test_job_writes_a_seg_in_its_own_process(tmp_path: Path, pool: WorkerPool) -> None:
    source = dcmread(THORAX / "CT0001.dcm", stop_before_pixels=True)
    s = spec(tmp_path, THORAX, backend="hu_based")
    outcome = run_job(s, pool, timeout_s=300)
    assert outcome.ok and outcome.result is not None, outcome.message
    result = outcome.result
    assert not Path(result.seg.path).is_absolute() and result.missing(Path(s.out_dir)) == []  # relative, all there
    seg = dcmread(Path(s.out_dir) / result.seg.path)
    assert seg.Modality == "SEG" and seg.StudyInstanceUID == source.StudyInstanceUID
    assert result.seg.series_instance_uid == seg.SeriesInstanceUID and result.seg.kind == "seg"
    assert result.backend_used == "hu_based" and result.qc and result.pictures
    again = run_job(s, pool, timeout_s=300)  # deterministic UIDs: a rerun makes the same SEG identity
    assert again.result is not None and again.result.seg.sop_instance_uid == result.seg.sop_instance_uid


def test_bad_input_is_an_error_not_a_crash(tmp_path: Path, pool: WorkerPool) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    outcome = run_job(spec(tmp_path, empty), pool, timeout_s=300)
    assert not outcome.ok and outcome.error_kind == "InputError"


def test_killed_worker_is_reported_as_a_crash(tmp_path: Path, pool: WorkerPool) -> None:
    outcome = run_job(spec(tmp_path, THORAX), pool, timeout_s=300,
                      on_start=lambda pid: os.kill(pid, signal.SIGKILL))
    assert not outcome.ok and outcome.error_kind == "crash"
    assert "SIGKILL" in (outcome.message or "")


def test_worker_over_its_time_is_killed(tmp_path: Path, pool: WorkerPool) -> None:
    outcome = run_job(spec(tmp_path, THORAX), pool, timeout_s=0.2)
    assert not outcome.ok and outcome.error_kind == "timeout"


def test_nothing_is_started_or_held_at_import() -> None:
    """No pool at module level (it was created and registered with atexit at import): whoever runs jobs owns one."""
    import segnode.node.jobs.worker as worker_module

    assert not [name for name, value in vars(worker_module).items() if isinstance(value, WorkerPool)]


def test_a_closed_pool_stops_the_worker_given_back(tmp_path: Path) -> None:
    pids: list[int] = []
    pool = WorkerPool()
    assert run_job(spec(tmp_path, THORAX, backend="hu_based"), pool, timeout_s=300, on_start=pids.append).ok
    pool.shutdown()  # the idle worker leaves its loop and exits
    with pytest.raises(ProcessLookupError):
        os.kill(pids[0], 0)


def test_a_worker_stays_warm_across_jobs_and_a_crash_replaces_it(tmp_path: Path, pool: WorkerPool) -> None:
    pids: list[int] = []
    first = run_job(spec(tmp_path / "a", THORAX, backend="hu_based"), pool, timeout_s=300, on_start=pids.append)
    second = run_job(spec(tmp_path / "b", THORAX, backend="hu_based"), pool, timeout_s=300, on_start=pids.append)
    assert first.ok and second.ok
    assert pids[0] == pids[1]  # same process: its loaded models stay in memory
    log = (tmp_path / "b" / "out" / "worker.log").read_text()
    assert "job 7: SEG" in log and "job 7: SEG" in (tmp_path / "a" / "out" / "worker.log").read_text()
    crashed = run_job(spec(tmp_path / "c", THORAX), pool, timeout_s=300,
                      on_start=lambda pid: os.kill(pid, signal.SIGKILL))
    assert crashed.error_kind == "crash"
    after = run_job(spec(tmp_path / "d", THORAX, backend="hu_based"), pool, timeout_s=300, on_start=pids.append)
    assert after.ok and pids[-1] != pids[0]
