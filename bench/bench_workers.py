"""Remote workers: jobs per minute with 1, 2 and 3 workers, and the remote path's overhead for one job.

One run, one machine: a private RabbitMQ (Debian ``rabbitmq-server``), a
``segnode serve`` with ``broker:`` and DICOMweb, and 1–3 ``segnode worker``
processes (own folders, HTTP only), all on ``hu_based`` lungs; then the same
node without ``broker:`` (its embedded local worker) as the baseline.

* throughput: ``--series`` synthetic chest series sent by ``storescu``; remote: every job
  waits in the queue, then 1–3 workers start; jobs/min = jobs / (workers ready → last job done);
  local: after one warm-up job, jobs / (first job taken → last job done), from the index's events;
* overhead: ``--single`` series sent one at a time; per job the *segment* stage
  (``segmenting`` → ``encoded``: publish, WADO-RS fetch, run, result upload for a
  remote worker; spec, process hand-off, run for a local one), medians.

    .venv/bin/python bench/bench_workers.py [--series 12] [--single 5] [--shape 100,256,256]

Every process shares this machine's cores: the figures say what the remote
path costs and how the queue spreads work, not what three machines would do.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import yaml
from segnode.storage.index import Index, JobState

from tests.peers import node, storescu, wait_until, write_node_config
from tests.rabbitmq_peer import RabbitMQ, rabbitmq
from tests.node.remote.test_remote_workers import (
    remote_config,
    small_series,
    wait_all_done,
    workers,
)


def local_config(tmp: Path) -> Path:
    routes = tmp / "routes.yaml"
    routes.write_text(yaml.safe_dump({"rules": [{"name": "everything", "fallback": True, "action": {
        "profile": "lungs", "backend": "hu_based"}}]}))
    return write_node_config(tmp / "node.yaml", routes=str(routes), worker={"device": "cpu"})


def stage_times(index: Index, job_ids: list[int]) -> tuple[float, float, list[float]]:
    """(first complete, last done, per-job segmenting→encoded seconds)."""
    firsts, lasts, segment = [], [], []
    for job_id in job_ids:
        events = {state: at for at, state, _ in index.events(job_id)}  # the last of each state
        firsts.append(events[JobState.COMPLETE])
        lasts.append(events[JobState.DONE])
        segment.append(events[JobState.ENCODED] - events[JobState.SEGMENTING])
    return min(firsts), max(lasts), segment


def local_throughput(config: Path, folders: list[Path], warmup: Path) -> tuple[float, list[float]]:
    """jobs/min of the embedded local worker: first job taken → last job done (after one warm-up job)."""
    with node(config) as n:
        index = Index(n.state_dir / "index.sqlite")
        storescu(n.port, [warmup])  # starts the worker process and its imports
        wait_all_done(index, 1, timeout=600)
        for folder in folders:
            storescu(n.port, [folder])
        jobs = [j for j in wait_all_done(index, len(folders) + 1, timeout=1800) if j.job_id != 1]
        return _rate(index, jobs)


def remote_throughput(run: Path, broker: RabbitMQ, count: int, folders: list[Path]) -> tuple[float, list[float]]:
    """jobs/min of ``count`` remote workers: every job waiting in the queue, workers ready → last job done."""
    with node(remote_config(run, broker)) as n:
        index = Index(n.state_dir / "index.sqlite")
        for folder in folders:
            storescu(n.port, [folder])
        wait_until(lambda: sum(j.state is JobState.SEGMENTING for j in index.jobs()) == len(folders), 300,
                   "every job enqueued")
        with workers(run, broker, count):
            started = time.time()
            jobs = wait_all_done(index, len(folders), timeout=1800)
        return _rate(index, jobs, started)


def _rate(index: Index, jobs: list, started: float | None = None) -> tuple[float, list[float]]:
    bad = [j.reason for j in jobs if j.state is not JobState.DONE]
    assert not bad, bad
    ids = [j.job_id for j in jobs]
    _, last, segment = stage_times(index, ids)
    first = started if started is not None else min(
        at for job_id in ids for at, state, _ in index.events(job_id) if state is JobState.SEGMENTING)
    return len(jobs) / ((last - first) / 60), segment


def one_at_a_time(config: Path, folders: list[Path]) -> list[float]:
    with node(config) as n:
        index = Index(n.state_dir / "index.sqlite")
        for count, folder in enumerate(folders, 1):
            storescu(n.port, [folder])
            wait_until(lambda n=count: len([j for j in index.jobs() if j.state is JobState.DONE]) == n, 600, "the job")
        return stage_times(index, [j.job_id for j in index.jobs()])[2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--series", type=int, default=12)
    parser.add_argument("--single", type=int, default=5)
    parser.add_argument("--shape", default="100,256,256", help="slices,rows,columns of each synthetic series")
    args = parser.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split(","))
    with tempfile.TemporaryDirectory(prefix="segnode-bench-workers-") as tmp_name:
        tmp = Path(tmp_name)
        folders = small_series(tmp / "series", args.series, shape=shape)  # type: ignore[arg-type]
        singles = small_series(tmp / "singles", args.single, shape=shape)  # type: ignore[arg-type]
        print(f"{args.series} series of {shape} (hu_based lungs), {os.cpu_count()} CPUs, "
              f"load {os.getloadavg()[0]:.1f}", flush=True)
        rows = []
        with rabbitmq(tmp / "broker") as broker:
            for count in (1, 2, 3):
                run = tmp / f"remote-{count}"
                run.mkdir()
                rate, segment = remote_throughput(run, broker, count, folders)
                rows.append((f"remote, {count} worker(s)", rate))
                print(f"{rows[-1][0]:<26} {rate:6.1f} jobs/min", flush=True)
            run = tmp / "remote-single"
            run.mkdir()
            with workers(run, broker, 1):
                remote_one = one_at_a_time(remote_config(run, broker), singles)
        base = tmp / "local"
        base.mkdir()
        rate, segment = local_throughput(local_config(base), folders, singles[0])
        rows.append(("local worker (no broker)", rate))
        print(f"{rows[-1][0]:<26} {rate:6.1f} jobs/min (segment stage median {statistics.median(segment):.2f} s)",
              flush=True)
        single = tmp / "local-single"
        single.mkdir()
        local_one = one_at_a_time(local_config(single), singles)
    remote_med, local_med = statistics.median(remote_one), statistics.median(local_one)
    print(f"one job at a time, segment stage: remote {remote_med:.2f} s (runs {_fmt(remote_one)}), "
          f"local {local_med:.2f} s (runs {_fmt(local_one)}); remote path overhead {remote_med - local_med:+.2f} s")
    return 0


def _fmt(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


if __name__ == "__main__":
    sys.exit(main())
