"""The index at a year's size: generate one, then time the node's queries on it against their budgets.

    .venv/bin/python bench/index_scale.py [--instances 2000000] [--series 50000] [--days 365]
                                          [--index PATH] [--keep] [--no-generate] [--repeat 5]
                                          [--retention-days 180] [--vacuum]

Generates an index (``storage/index.py``'s schema, written directly in big
transactions) of a hospital's CT year: ``--series`` series in studies of 4–6
series, ``--instances`` instances spread over them (scouts, thick and thin
series), one job per series (more where a late instance superseded a result or
a route ran two profiles), each job's events (the audit log's source), and the
deliveries and delivered objects of every result; received times spread over
``--days``; the last day's jobs still on their way (received, complete,
segmenting, sending, held), a few failed or dead-lettered; series purged
after a day.  Then, on that index, it times what the node runs on every tick
or request (the median of ``--repeat`` runs, after one unmeasured run) and
prints each with its budget (docs/reliability.md, "Index at a year's size"):

- the status page (``node/ops/status_page.py``), the jobs API (list, filters,
  the largest page) and the studies API (``node/ops/api.py``), the metrics'
  counts, the audit log's next events;
- the completion sweep's tick (``node/sweep.py``) and the queries of a routing
  decision (a study's series and routed jobs, a series' earlier results and
  its instance paths);
- dispatch's due deliveries, a worker's claim of the next job;
- the start-up checks (opening the index, the spool check), an ingest group
  commit of 4 instances;
- housekeeping: the purgeable series, and history retention
  (:meth:`segnode.storage.index.Index.prune_history`) of one day's rows once
  the rows before the retention age are gone, then ``PRAGMA optimize``.

``EXPLAIN QUERY PLAN`` of each query is checked by tests/storage/test_index_scale.py.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segnode.node.config import NodeConfig  # noqa: E402
from segnode.node.http_in.base import Request  # noqa: E402
from segnode.node.ops.api import OpsApp  # noqa: E402
from segnode.node.ops.status_page import render_status  # noqa: E402
from segnode.node.ops.views import OpsDB  # noqa: E402
from segnode.node.sweep import CompletionSweep  # noqa: E402
from segnode.routing.reload import RulesHolder  # noqa: E402
from segnode.storage.group_commit import GroupCommit  # noqa: E402
from segnode.storage.index import Index, InstanceRecord, JobState  # noqa: E402
from segnode.storage.recovery import reindex_spool  # noqa: E402
from segnode.storage.spool import Spool  # noqa: E402

DAY = 86400.0
CT = "1.2.840.10008.5.1.4.1.1.2"
SEG = "1.2.840.10008.5.1.4.1.1.66.4"
SR = "1.2.840.10008.5.1.4.1.1.88.33"
ROOT = "1.2.826.0.1.3680043.10.1138"
#: a finished job's states in order, with the seconds each took (received … done)
DONE_PATH = ((JobState.RECEIVED, 0.0), (JobState.COMPLETE, 90.0), (JobState.SEGMENTING, 30.0),
             (JobState.ENCODED, 60.0), (JobState.SENDING, 1.0), (JobState.DONE, 2.0))
#: series sizes (instances) and how often each occurs; scaled to the instance total asked for
SIZES = ((1, 0.12), (3, 0.08), (30, 0.25), (60, 0.25), (120, 0.2), (300, 0.1))


# -- generation ---------------------------------------------------------------------------------


@dataclass
class Shape:
    instances: int
    series: int
    days: float
    now: float
    seed: int = 0


def generate(path: Path, shape: Shape) -> dict[str, int]:
    """Write the year's index at ``path`` (replaced); return the row counts."""
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    Index(path).close()  # the schema, as the node makes it
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=OFF")
    db.execute("PRAGMA synchronous=OFF")
    db.execute("PRAGMA cache_size=-1000000")
    rng = random.Random(shape.seed)
    series = list(_series_rows(shape, rng))
    db.execute("BEGIN")
    db.executemany("INSERT INTO studies VALUES (?, ?, ?)", _study_rows(series))
    db.executemany("INSERT INTO series (series_uid, study_uid, modality, calling_ae, called_ae, sender_host, "
                   "instance_count, duplicate_count, first_received_at, last_received_at, purged_at, released_at) "
                   "VALUES (?, ?, 'CT', 'CT_SCANNER', 'SEGNODE', '10.1.2.3', ?, 0, ?, ?, ?, ?)", series)
    db.execute("COMMIT")
    _instances(db)
    db.execute("BEGIN")
    _jobs(db, series, shape, rng)
    db.execute("COMMIT")
    db.execute("PRAGMA journal_mode=WAL")
    counts = {t: db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]  # noqa: S608 (fixed names)
              for t in ("studies", "series", "instances", "jobs", "job_events", "deliveries", "delivery_objects")}
    db.close()
    return counts


def _series_rows(shape: Shape, rng: random.Random) -> Iterator[tuple[Any, ...]]:
    """(series, study, count, first, last, purged, released), oldest first; counts sum to ``instances``."""
    sizes, weights = zip(*SIZES)
    raw = rng.choices(sizes, weights, k=shape.series)
    scale = shape.instances / sum(raw)
    counts = [max(1, round(n * scale)) for n in raw]
    counts[-1] += shape.instances - sum(counts)
    start = shape.now - shape.days * DAY
    times = sorted(rng.uniform(start, shape.now - 600) for _ in range(shape.series))
    study, left = 0, 0
    for k, (n, t) in enumerate(zip(counts, times)):
        if left == 0:
            study, left, study_t = study + 1, rng.randint(4, 6), t
        left -= 1
        first = study_t + 30 * (k % 6)
        last = first + n * 0.05
        purged = last + DAY + 3600 if last < shape.now - 2 * DAY else None
        released = last + 0.5 if purged else None  # the last days' series wait for their quiet period
        yield (f"{ROOT}.2.{k + 1}", f"{ROOT}.1.{study}", n, first, last, purged, released)


def _study_rows(series: list[tuple[Any, ...]]) -> Iterator[tuple[str, float, float]]:
    spans: dict[str, list[float]] = {}
    for row in series:
        span = spans.setdefault(row[1], [row[3], row[4]])
        span[0], span[1] = min(span[0], row[3]), max(span[1], row[4])
    for uid, (first, last) in spans.items():
        yield uid, first, last


def _instances(db: sqlite3.Connection) -> None:
    """Every series' instances, made by SQLite itself (a recursive count joined to the series)."""
    db.execute("BEGIN")
    db.execute(
        "WITH RECURSIVE n(k) AS (SELECT 1 UNION ALL SELECT k + 1 FROM n WHERE k < "
        "(SELECT MAX(instance_count) FROM series)) "
        "INSERT INTO instances SELECT s.series_uid || '.' || n.k, s.series_uid, ?, '1.2.840.10008.1.2.1', "
        "s.study_uid || '/' || s.series_uid || '/' || s.series_uid || '.' || n.k || '.dcm', 525312, "
        "s.first_received_at + n.k * 0.05 FROM series s JOIN n ON n.k <= s.instance_count "
        "ORDER BY s.first_received_at, n.k", (CT,))
    db.execute("COMMIT")


def _jobs(db: sqlite3.Connection, series: list[tuple[Any, ...]], shape: Shape, rng: random.Random) -> None:
    """A job per series (with its events, deliveries and objects); recent ones still on their way."""
    recent = shape.now - DAY
    for uid, study, _n, _first, last, _purged, _released in series:
        state = _final_state(rng) if last < recent else rng.choice(
            (JobState.RECEIVED, JobState.RECEIVED, JobState.COMPLETE, JobState.SENDING, JobState.HELD, JobState.DONE))
        if state is JobState.SUPERSEDED:  # the superseded result, and the late instance's job that replaced it
            _job(db, uid, study, JobState.SUPERSEDED, last, rng)
            state = JobState.DONE
        _job(db, uid, study, state, last + (600 if state is JobState.DONE else 0), rng)


def _final_state(rng: random.Random) -> JobState:
    r = rng.random()
    for state, share in ((JobState.SKIPPED, 0.05), (JobState.NOT_ROUTED, 0.02), (JobState.SUPERSEDED, 0.04),
                         (JobState.FAILED, 0.004), (JobState.DEAD_LETTER, 0.002), (JobState.REJECTED, 0.004)):
        if r < share:
            return state
        r -= share
    return JobState.DONE


def _job(db: sqlite3.Connection, series: str, study: str, state: JobState, at: float, rng: random.Random) -> None:
    path = _path_to(state)
    times = [at]
    for _, seconds in path[1:]:
        times.append(times[-1] + seconds * rng.uniform(0.5, 2.0))
    routed = state not in (JobState.RECEIVED, JobState.SKIPPED, JobState.NOT_ROUTED)
    destinations = ["pacs", "archive"] if routed and rng.random() < 0.3 else (["pacs"] if routed else [])
    cur = db.execute(
        "INSERT INTO jobs (series_uid, study_uid, state, reason, rule, profile, backend, destinations, "
        "segment_attempts, seg_path, seg_series_uid, seg_sop_uid, backend_used, model_version, result_dir, "
        "completion, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (series, study, state.value, f"{state.value} (generated)", "chest" if routed else None,
         "lungs" if routed else None, "hu_based" if routed else None, json.dumps(destinations), int(routed),
         "seg.dcm" if routed else None, f"{series}.9" if routed else None, f"{series}.9.1" if routed else None,
         "hu_based" if routed else None, "1" if routed else None, f"/var/lib/segnode/results/{series}",
         "released" if state is not JobState.RECEIVED else None, times[0], times[-1]))
    job_id = cur.lastrowid
    db.executemany("INSERT INTO job_events (job_id, at, state, reason) VALUES (?, ?, ?, ?)",
                   [(job_id, t, s.value, None) for (s, _), t in zip(path, times)])
    if JobState.ENCODED in (s for s, _ in path) and destinations:
        _deliveries(db, job_id, series, destinations, state, times[-1])


def _path_to(state: JobState) -> tuple[tuple[JobState, float], ...]:
    """The states a job passed through to reach ``state`` (with each step's nominal seconds)."""
    if state in (JobState.SKIPPED, JobState.NOT_ROUTED):
        return (DONE_PATH[0], (state, 60.0))
    if state is JobState.FAILED:
        return (*DONE_PATH[:3], (state, 40.0))
    if state in (JobState.HELD, JobState.REJECTED):
        return (*DONE_PATH[:4], (JobState.HELD, 0.1), *(((state, 3600.0),) if state is JobState.REJECTED else ()))
    if state in (JobState.DEAD_LETTER, JobState.SUPERSEDED):
        return (*DONE_PATH[:5], (state, 7200.0))
    steps = [s for s, _ in DONE_PATH]
    return DONE_PATH[:steps.index(state) + 1]


def _deliveries(db: sqlite3.Connection, job_id: int | None, series: str, destinations: list[str],
                state: JobState, at: float) -> None:
    done = state in (JobState.DONE, JobState.SUPERSEDED)
    delivery = "done" if done else ("dead" if state is JobState.DEAD_LETTER else "pending")
    for name in destinations:
        db.execute("INSERT INTO deliveries VALUES (?, ?, ?, ?, ?, ?, ?)",
                   (job_id, name, delivery, 1 if done else 3, at, None if done else "no association", at if done
                    else None))
        db.executemany("INSERT INTO delivery_objects (job_id, destination, sop_instance_uid, kind, sop_class_uid, "
                       "path, state, last_error, delivered_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       [(job_id, name, f"{series}.9.{k}", kind, cls, f"{kind}.dcm", delivery, None,
                         at if done else None) for k, (kind, cls) in enumerate((("seg", SEG), ("sr", SR)), 1)])


# -- measurement --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    what: str
    budget_ms: float
    first_ms: float
    median_ms: float

    @property
    def within(self) -> bool:
        return self.median_ms <= self.budget_ms


def timed(what: str, budget_ms: float, run: Callable[[], object], repeat: int) -> Timing:
    start = time.perf_counter()
    run()
    first = (time.perf_counter() - start) * 1000
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        runs.append((time.perf_counter() - start) * 1000)
    return Timing(what, budget_ms, first, statistics.median(runs))


def _request(path: str, **query: str) -> Request:
    return Request(method="GET", path=path, query={k: [v] for k, v in query.items()}, body=b"",
                   client="127.0.0.1", params={})


def _ops_app(db: OpsDB) -> OpsApp:
    def unused(*_: object) -> Any:
        raise AssertionError("not measured")

    return OpsApp(db=db, retry=unused, metrics=lambda: b"", rules=None, readiness={}, validate_rules=unused,
                  datasets=dict, status_page=lambda: render_status(db, node="SEGNODE"))


def measure(path: Path, work: Path, repeat: int, retention_days: float) -> list[Timing]:
    """Every query path on the index at ``path`` (opened as the node opens it, with its migrations)."""
    out: list[Timing] = []
    start = time.perf_counter()
    index = Index(path)
    out.append(Timing("open the index (schema check, migrations)", 2000, (time.perf_counter() - start) * 1000, 0))
    db, app = OpsDB(path), _ops_app(OpsDB(path))
    jobs = index.jobs(limit=1000)
    study = jobs[len(jobs) // 2].study_uid
    series = jobs[len(jobs) // 2].series_uid
    last = index.jobs(limit=1)[0].job_id
    cursor = max(0, db.last_event_id() - 500)
    for what, budget, run in (
        ("status page (render_status)", 200, lambda: render_status(db, node="SEGNODE")),
        ("jobs API: latest 100", 100, lambda: app.jobs(_request("/api/v1/jobs"))),
        ("jobs API: state=failed", 100, lambda: app.jobs(_request("/api/v1/jobs", state="failed"))),
        ("jobs API: state=done, limit=1000", 300, lambda: app.jobs(_request("/api/v1/jobs", state="done",
                                                                              limit="1000"))),
        ("jobs API: one study", 100, lambda: app.jobs(_request("/api/v1/jobs", study=study))),
        ("studies API: latest 50 with series and jobs", 200, lambda: app.studies(_request("/api/v1/studies"))),
        ("job detail (events, deliveries, objects, series)", 50, lambda: (db.job(last), db.events_of([last]),
                                                                          db.deliveries(last),
                                                                          db.delivery_objects(last),
                                                                          db.series(series))),
        ("metrics: job counts", 50, db.counts),
        ("audit: next 500 events", 50, lambda: db.events_after(cursor)),
    ):
        out.append(timed(what, budget, run, repeat))
    out += _measure_node(index, path, work, repeat)
    out += _measure_housekeeping(index, repeat, retention_days if hasattr(index, "prune_history") else None)
    index.close()
    return out


def _measure_node(index: Index, path: Path, work: Path, repeat: int) -> list[Timing]:
    # the last day's received series are all within the quiet period: a tick judges each and routes none
    config = NodeConfig(port=0, state_dir=work / "state", completion={"quiet_period_s": 2 * DAY})
    spool = Spool(work / "spool")
    sweep = CompletionSweep(config, index, spool, RulesHolder(None), lambda _e: None, lambda d, _s, _p: d)
    study_cfg = config.model_copy(update={"completion": config.completion.model_copy(update={"group_by": "study"})})
    by_study = CompletionSweep(study_cfg, index, spool, RulesHolder(None), lambda _e: None, lambda d, _s, _p: d)
    job = index.jobs(state=JobState.DONE, limit=1)[0]
    received = len(index.received_jobs())
    out = [timed(what, budget, run, repeat) for what, budget, run in (
        (f"sweep tick (group_by: series; {received} received jobs)", 100, sweep.sweep),
        (f"sweep tick (group_by: study; {received} received jobs)", 100, by_study.sweep),
        ("routing: a study's series and routed jobs", 20, lambda: (index.study_series(job.study_uid),
                                                                   index.routed_in_study(job.study_uid))),
        ("routing: a series' earlier results, instance paths", 20, lambda: (
            index.earlier_results(job.series_uid, job.job_id + 1), index.instance_paths(job.series_uid))),
        ("dispatch: due deliveries", 50, index.due_deliveries),
        ("worker: claim the next job (none complete)", 20, _claim_none(index)),
    )]
    commit = GroupCommit(spool, index)
    counter = iter(range(10**9))
    out.append(timed("ingest: 4 instances stored together (group commit)", 100,
                     lambda: _commit_four(commit, spool, counter), repeat))
    spooled = sum(1 for _ in spool.instances())
    out.append(timed(f"start-up spool check ({spooled} spooled files)", 500,
                     lambda: reindex_spool(spool, index, called_ae="SEGNODE"), repeat))
    return out


def _claim_none(index: Index) -> Callable[[], object]:
    """Claims of the next ``complete`` job, each put back (the worker's poll when one is waiting)."""
    def run() -> object:
        job = index.claim_next()
        if job is not None:
            index.transition(job.job_id, JobState.COMPLETE, "put back (bench)")
        return job
    return run


def _commit_four(commit: GroupCommit, spool: Spool, counter: Iterator[int]) -> None:
    """Four writers arriving together (their syncs and one transaction shared)."""
    writers = [threading.Thread(target=_write_one, args=(commit, spool, next(counter))) for _ in range(4)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()


def _write_one(commit: GroupCommit, spool: Spool, k: int) -> None:
    sop, series, study = f"{ROOT}.3.0.{k}", f"{ROOT}.3.0", f"{ROOT}.3"
    path = spool.instance_path(study, series, sop)
    commit.commit((b"\0" * 4096,), InstanceRecord(sop, series, study, CT, "1.2.840.10008.1.2.1", "CT",
                                                   str(path.relative_to(spool.root)), 4096, "BENCH", "SEGNODE",
                                                   "127.0.0.1"))


def _measure_housekeeping(index: Index, repeat: int, retention_days: float | None) -> list[Timing]:
    now = index.clock()
    out = [timed("housekeeping: purgeable series", 100, lambda: index.purgeable_series(now - DAY), repeat)]
    if retention_days is None:  # an Index without retention (measuring the code before it)
        return out
    start = time.perf_counter()
    first = index.prune_history(now - (retention_days + 1) * DAY)
    out.append(Timing(f"retention: first prune ({first} jobs' history, older than {retention_days + 1:g} days)",
                      60_000, (time.perf_counter() - start) * 1000, 0))
    start = time.perf_counter()
    daily = index.prune_history(now - retention_days * DAY)
    out.append(Timing(f"retention: one day's prune ({daily} jobs' history)", 1000,
                      (time.perf_counter() - start) * 1000, 0))
    out.append(timed("housekeeping: PRAGMA optimize", 1000, index.optimize, repeat))
    return out


def vacuum(path: Path) -> Timing:
    """``VACUUM`` of the whole file (offline maintenance; the node never runs it), and the size it left."""
    before = path.stat().st_size
    start = time.perf_counter()
    db = sqlite3.connect(path)
    db.execute("VACUUM")
    db.close()
    took = (time.perf_counter() - start) * 1000
    return Timing(f"VACUUM, offline ({before / 1e6:,.0f} → {path.stat().st_size / 1e6:,.0f} MB)", 300_000, took, 0)


def report(timings: list[Timing], counts: dict[str, int], seconds: float, size_mb: float) -> bool:
    print(f"index: {', '.join(f'{n:,} {t}' for t, n in counts.items())}; {size_mb:,.0f} MB; generated in "
          f"{seconds:.0f} s")
    print("| query | budget (ms) | first (ms) | median (ms) | within |\n|---|---|---|---|---|")
    for t in timings:
        median = f"{t.median_ms:.1f}" if t.median_ms else "—"
        ok = t.within if t.median_ms else t.first_ms <= t.budget_ms
        print(f"| {t.what} | {t.budget_ms:g} | {t.first_ms:.1f} | {median} | {'yes' if ok else '**no**'} |")
    return all(t.within if t.median_ms else t.first_ms <= t.budget_ms for t in timings)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=2_000_000)
    parser.add_argument("--series", type=int, default=50_000)
    parser.add_argument("--days", type=float, default=365.0)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--retention-days", type=float, default=180.0)
    parser.add_argument("--index", type=Path, help="where to write the index (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the generated index")
    parser.add_argument("--no-generate", action="store_true", help="measure the index at --index as it is")
    parser.add_argument("--vacuum", action="store_true", help="also time an offline VACUUM at the end")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="segnode-index-"))
    path = args.index or work / "index.sqlite"
    try:
        start = time.perf_counter()
        if args.no_generate:
            counts = {}
        else:
            counts = generate(path, Shape(args.instances, args.series, args.days, time.time()))
        seconds = time.perf_counter() - start
        size_mb = path.stat().st_size / 1e6
        timings = measure(path, work, args.repeat, args.retention_days)
        if args.vacuum:
            timings.append(vacuum(path))
        ok = report(timings, counts, seconds, size_mb)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
            if args.index and not args.no_generate:
                for suffix in ("", "-wal", "-shm"):
                    Path(f"{path}{suffix}").unlink(missing_ok=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
