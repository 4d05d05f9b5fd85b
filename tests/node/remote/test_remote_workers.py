"""Remote workers through a real RabbitMQ broker: a node and three ``segnode worker`` processes.

The workers have their own state and weights folders and share nothing with
the node but its HTTP API (WADO-RS for the series, the result endpoint for
the outputs) and the broker.  The node's index is the source of truth: every
job ends ``done`` exactly once (one accepted result, one ``encoded`` event).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from pydicom import dcmread
from segnode.storage.index import Index, JobState

from tests.peers import (
    ROOT,
    SEGNODE,
    NodeProcess,
    free_port,
    node,
    store_statuses,
    storescu,
    wait_until,
    write_node_config,
)
from tests.phantoms import thorax_phantom, write_ct_series
from tests.rabbitmq_peer import RabbitMQ, rabbitmq, rabbitmq_available

pytestmark = [pytest.mark.peer, pytest.mark.slow,
              pytest.mark.skipif(not rabbitmq_available(), reason="Debian rabbitmq-server (make peers)")]


def small_series(root: Path, count: int, shape: tuple[int, int, int] = (10, 48, 48)) -> list[Path]:
    """``count`` synthetic chest series (one study each), written once per test."""
    folders = []
    for n in range(count):
        phantom = thorax_phantom(shape=shape, spacing=(6.0, 6.0, 8.0), seed=n)
        v = phantom.volume
        folder = root / f"series-{n:02d}"
        write_ct_series(v.hu, folder, v.spacing, v.origin, v.direction)
        folders.append(folder)
    return folders


def remote_config(tmp_path: Path, broker: RabbitMQ, **overrides: object) -> Path:
    routes = tmp_path / "routes.yaml"
    routes.write_text(yaml.safe_dump({"rules": [{"name": "everything", "fallback": True, "action": {
        "profile": "lungs", "backend": "hu_based", "queue": "cpu", "priority": "routine"}}]}))
    return write_node_config(tmp_path / "node.yaml", routes=str(routes),
                             broker={"url": broker.url, "queues": ["gpu", "cpu"], "result_timeout_s": 600},
                             dicomweb={"enabled": True, "port": free_port()}, **overrides)


@contextmanager
def workers(tmp_path: Path, broker: RabbitMQ, count: int) -> Iterator[dict[str, subprocess.Popen]]:
    """``count`` worker processes (own process groups, own folders); ready once the queue has their consumers."""
    procs: dict[str, subprocess.Popen] = {}
    try:
        for n in range(count):
            procs[f"w{n}"] = start_worker(tmp_path, broker, f"w{n}")
        wait_until(lambda: consumers(broker, "cpu") >= count, 90, f"{count} workers on the cpu queue", interval=0.2)
        yield procs
    finally:
        for proc in procs.values():
            kill_group(proc, signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                kill_group(proc, signal.SIGKILL)
                proc.wait()


def start_worker(tmp_path: Path, broker: RabbitMQ, name: str) -> subprocess.Popen:
    """``segnode worker`` in its own process group, with its folders under tmp/workers/NAME (kept on a restart)."""
    folder = tmp_path / "workers" / name
    (folder / "weights").mkdir(parents=True, exist_ok=True)
    with open(folder / "worker.log", "ab") as log:
        return subprocess.Popen(
            [*SEGNODE, "worker", "--broker", broker.url, "--queue", "cpu", "--name", name, "--state-dir",
             str(folder / "state"), "--weights-dir", str(folder / "weights"), "--device", "cpu"],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)


def job_files(state: Path) -> list[Path]:
    """Every file a worker's state folder holds for jobs (series in transit, outputs)."""
    return [p for p in (state / "jobs").rglob("*") if p.is_file()]


def kill_group(proc: subprocess.Popen, sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)  # the worker and its pool process, by the group we started
    except ProcessLookupError:
        pass


def consumers(broker: RabbitMQ, queue: str) -> int:
    from kombu import Connection

    try:
        with Connection(broker.url, connect_timeout=2) as conn:
            return int(conn.default_channel.queue_declare(queue, passive=True)[2])
    except Exception:  # noqa: BLE001 - not declared yet, or the broker is restarting
        return 0


def accepted_results(state_dir: Path) -> dict[int, str]:
    """job id → the worker whose result the node accepted (results/job-N/attempt-M/remote.json)."""
    out = {}
    for path in (state_dir / "results").glob("job-*/attempt-*/remote.json"):
        job_id = int(path.parent.parent.name.split("-")[1])
        assert job_id not in out, f"two accepted results for job {job_id}"
        out[job_id] = json.loads(path.read_text())["worker"]
    return out


def wait_all_done(index: Index, count: int, timeout: float = 300) -> list:
    def check():  # type: ignore[no-untyped-def]
        jobs = index.jobs(limit=1000)
        finished = [j for j in jobs if j.state in (JobState.DONE, JobState.FAILED)]
        return jobs if len(jobs) >= count and len(finished) == len(jobs) else None

    return wait_until(check, timeout, f"{count} jobs to finish", interval=0.25)


def encoded_events(index: Index, job_id: int) -> int:
    return sum(1 for _, state, _ in index.events(job_id) if state is JobState.ENCODED)


def test_twenty_series_three_workers_each_result_exactly_once(tmp_path: Path) -> None:
    folders = small_series(tmp_path / "series", 20)
    with rabbitmq(tmp_path / "broker") as broker, node(remote_config(tmp_path, broker)) as n, \
            workers(tmp_path, broker, 3):
        for folder in folders:
            assert set(store_statuses(storescu(n.port, [folder]).stderr)) == {"Success"}
        index = Index(n.state_dir / "index.sqlite")
        jobs = wait_all_done(index, 20)
        assert len(jobs) == 20 and all(j.state is JobState.DONE for j in jobs), [j.reason for j in jobs]
        results = accepted_results(n.state_dir)
        assert sorted(results) == sorted(j.job_id for j in jobs)
        assert all(encoded_events(index, j.job_id) == 1 and j.segment_attempts == 1 for j in jobs)
        assert len(set(results.values())) >= 2, results  # the queue spread the work
        for job in jobs:  # each SEG came back whole, for its own source series
            seg = dcmread(job.file(job.seg_path))
            assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == job.series_uid
        for name in ("w0", "w1", "w2"):  # the workers kept nothing: their scratch folders are empty
            assert not any((tmp_path / "workers" / name / "state" / "jobs").glob("*"))

        ops = ops_url(n)  # what operators see: queues, workers, results
        page = urllib.request.urlopen(f"{ops}/status", timeout=10).read().decode()
        assert "Remote workers" in page and "<td>cpu</td><td class=n>0</td><td class=n>3</td>" in page
        metrics = urllib.request.urlopen(f"{ops}/metrics", timeout=10).read().decode()
        assert 'segnode_broker_queue_consumers{queue="cpu"} 3.0' in metrics
        assert 'segnode_remote_results_total{outcome="accepted"} 20.0' in metrics
        assert 'segnode_dicomweb_requests_total{kind="wado"} 20.0' in metrics


def ops_url(n: NodeProcess) -> str:
    """The ops API's URL from the node's second line ("segnode: ops HTTP API on URL")."""
    assert n.proc.stdout is not None
    line = n.proc.stdout.readline()
    assert "ops HTTP API on" in line, line
    return line.rsplit(" ", 1)[1].strip()


def test_worker_killed_mid_job_another_finishes_it_once_and_the_restarted_one_keeps_nothing(tmp_path: Path) -> None:
    """kill -9 of a worker mid-job: the job completes once, by redelivery; restarted with the same state folder,
    the killed worker holds none of the job's files (patient data) and its folder stays private."""
    [folder] = small_series(tmp_path / "series", 1, shape=(60, 160, 160))  # a few seconds of hu_based
    with rabbitmq(tmp_path / "broker") as broker, node(remote_config(tmp_path, broker)) as n, \
            workers(tmp_path, broker, 3) as procs:
        assert set(store_statuses(storescu(n.port, [folder]).stderr)) == {"Success"}

        def busy() -> str | None:  # the worker whose scratch folder holds the job's series
            for name in procs:
                if any((tmp_path / "workers" / name / "state" / "jobs").glob("*job-*/input/*.dcm")):
                    return name
            return None

        victim = wait_until(busy, 120, "a worker to take the job", interval=0.02)
        kill_group(procs[victim], signal.SIGKILL)
        procs[victim].wait()
        index = Index(n.state_dir / "index.sqlite")
        [job] = wait_all_done(index, 1)
        assert job.state is JobState.DONE, job.reason
        results = accepted_results(n.state_dir)
        assert list(results) == [job.job_id] and results[job.job_id] != victim
        assert encoded_events(index, job.job_id) == 1
        assert job.segment_attempts == 1  # the broker redelivered the same attempt; the node did not re-enqueue

        state = tmp_path / "workers" / victim / "state"
        assert job_files(state)  # what the kill left: the job's series, in the victim's folder
        procs[victim] = start_worker(tmp_path, broker, victim)  # same name, same --state-dir
        wait_until(lambda: consumers(broker, "cpu") >= 3, 90, "the restarted worker on the cpu queue", interval=0.2)
        assert job_files(state) == []
        assert state.stat().st_mode & 0o777 == 0o700 and (state / "jobs").stat().st_mode & 0o777 == 0o700


def test_broker_restarted_mid_run_nothing_lost(tmp_path: Path) -> None:
    folders = small_series(tmp_path / "series", 12)
    with rabbitmq(tmp_path / "broker") as broker, node(remote_config(tmp_path, broker)) as n, \
            workers(tmp_path, broker, 3):
        index = Index(n.state_dir / "index.sqlite")
        for folder in folders[:6]:
            assert set(store_statuses(storescu(n.port, [folder]).stderr)) == {"Success"}
        wait_until(lambda: any(j.state is JobState.DONE for j in index.jobs()), 120, "a first job done")
        broker.stop()
        for folder in folders[6:]:  # the node takes them while the broker is down; they wait in the index
            assert set(store_statuses(storescu(n.port, [folder]).stderr)) == {"Success"}
        wait_until(lambda: sum(j.state is JobState.COMPLETE for j in index.jobs()) >= 1, 60,
                   "a job waiting for the broker")
        broker.start()
        jobs = wait_all_done(index, 12)
        assert all(j.state is JobState.DONE for j in jobs), [j.reason for j in jobs]
        results = accepted_results(n.state_dir)
        assert sorted(results) == sorted(j.job_id for j in jobs)
        assert all(encoded_events(index, j.job_id) == 1 for j in jobs)


def test_route_priority_urgent_jobs_first(tmp_path: Path) -> None:
    folders = small_series(tmp_path / "series", 5)
    routes = tmp_path / "routes.yaml"
    with rabbitmq(tmp_path / "broker") as broker:
        config = remote_config(tmp_path, broker)  # then its routes replaced: ER's series urgent, the rest research
        routes.write_text(yaml.safe_dump({"rules": [
            {"name": "er", "match": {"calling_ae": {"glob": "ER*"}},
             "action": {"profile": "lungs", "backend": "hu_based", "queue": "cpu", "priority": "urgent"}},
            {"name": "research", "fallback": True,
             "action": {"profile": "lungs", "backend": "hu_based", "queue": "cpu", "priority": "research"}}]}))
        with node(config) as n:
            index = Index(n.state_dir / "index.sqlite")
            for folder in folders[:4]:
                assert set(store_statuses(storescu(n.port, [folder]).stderr)) == {"Success"}
            wait_until(lambda: sum(j.state is JobState.SEGMENTING for j in index.jobs()) == 4, 60, "4 enqueued")
            assert set(store_statuses(storescu(n.port, [folders[4]], calling="ER_CT1").stderr)) == {"Success"}
            wait_until(lambda: sum(j.state is JobState.SEGMENTING for j in index.jobs()) == 5, 60, "5 enqueued")
            urgent = next(j for j in index.jobs() if j.rule == "er")
            with workers(tmp_path, broker, 1):  # one worker, started once every message waits in the queue
                jobs = wait_all_done(index, 5)
            assert all(j.state is JobState.DONE for j in jobs)
            accepted = {j.job_id: json.loads(next((n.state_dir / "results" / f"job-{j.job_id}").glob(
                "attempt-*/remote.json")).read_text())["accepted_at"] for j in jobs}
            assert min(accepted, key=accepted.get) == urgent.job_id  # the last enqueued, the first run
