"""The index at a year's size, in small: every query path the node runs on a tick or a request uses an index
(no full scan of a big table, by EXPLAIN QUERY PLAN), and history retention deletes only what it should.

The year itself is measured by bench/index_scale.py (docs/reliability.md, "Index at a year's size").
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from segnode.node.config import NodeConfig
from segnode.node.http_in.base import Request
from segnode.node.ops.api import OpsApp
from segnode.node.ops.status_page import render_status
from segnode.node.ops.views import FAILURE_STATES, OpsDB
from segnode.node.sweep import CompletionSweep
from segnode.routing.reload import RulesHolder
from segnode.storage.index import Index, InstanceRecord, JobState
from segnode.storage.spool import Spool

from bench.index_scale import Shape, generate

#: tables that grow with the node's traffic
BIG = {"studies", "series", "instances", "jobs", "job_events", "deliveries", "delivery_objects"}
#: scans that are not full: bounded by LIMIT in the order of the rows or of the index named, or partial
BOUNDED = (
    re.compile(r"FROM jobs ORDER BY job_id DESC LIMIT"),
    re.compile(r"FROM studies ORDER BY last_received_at DESC LIMIT"),
)


@pytest.fixture(scope="module")
def year(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small year: 400 series, 12,000 instances, their jobs, events and deliveries."""
    path = tmp_path_factory.mktemp("year") / "index.sqlite"
    generate(path, Shape(instances=12_000, series=400, days=365, now=time.time()))
    return path


def _full_scans(db: sqlite3.Connection, statements: list[str]) -> list[str]:
    """Each ``SCAN`` of a big table that no index, partial index or LIMIT bounds, with its statement."""
    found = []
    for sql in statements:
        if not sql.lstrip().upper().startswith(("SELECT", "WITH")) or any(p.search(sql) for p in BOUNDED):
            continue
        aliases = dict(re.findall(r"(?:FROM|JOIN)\s+(\w+)(?:\s+(?:AS\s+)?(?!WHERE|JOIN|ON|ORDER|GROUP|LIMIT)(\w+))?",
                                  sql, re.IGNORECASE))
        names = {alias or table: table for table, alias in aliases.items()}
        for _, _, _, detail in db.execute("EXPLAIN QUERY PLAN " + sql):
            scan = re.match(r"SCAN (\w+)(.*)", detail)
            if scan is None or names.get(scan[1], scan[1]) not in BIG:
                continue
            partial = "series_unpurged" in scan[2]
            counts = "COVERING INDEX" in scan[2] and "GROUP BY state" in sql  # the queue's counts: an index's entries
            if not (partial or counts):
                found.append(f"{detail}: {sql}")
    return found


def _request(path: str, **query: str) -> Request:
    return Request(method="GET", path=path, query={k: [v] for k, v in query.items()}, body=b"",
                   client="127.0.0.1", params={})


def _ops_paths(db: OpsDB) -> list[Callable[[], object]]:
    def unused(*_: object) -> object:
        raise AssertionError("not called")

    app = OpsApp(db=db, retry=unused, metrics=lambda: b"", rules=None, readiness={}, validate_rules=unused,
                 datasets=dict, status_page=lambda: "")
    job = db.jobs(states=(JobState.DONE.value,), limit=1)[0]
    return [
        lambda: render_status(db, node="SEGNODE"),
        lambda: app.jobs(_request("/api/v1/jobs")),
        lambda: app.jobs(_request("/api/v1/jobs", state="failed")),
        lambda: app.jobs(_request("/api/v1/jobs", study=job["study_uid"])),
        lambda: app.studies(_request("/api/v1/studies")),
        lambda: (db.job(job["job_id"]), db.deliveries(job["job_id"]), db.delivery_objects(job["job_id"]),
                 db.series(job["series_uid"]), db.events_after(0), db.event_before(job["job_id"], 10**9),
                 db.jobs(states=FAILURE_STATES), db.counts(), db.last_event_id()),
    ]


def _node_paths(index: Index, tmp_path: Path) -> list[Callable[[], object]]:
    config = NodeConfig(port=0, state_dir=tmp_path / "state", completion={"quiet_period_s": 3600})
    spool = Spool(tmp_path / "spool")
    sweep = CompletionSweep(config, index, spool, RulesHolder(None), lambda _e: None, lambda d, _s, _p: d)
    job = index.jobs(state=JobState.DONE, limit=1)[0]
    now = index.clock()
    return [
        sweep.sweep, index.received_jobs, lambda: index.due_for_completion(60),
        lambda: index.due_for_completion(60, by_study=True),
        lambda: (index.study_series(job.study_uid), index.routed_in_study(job.study_uid),
                 index.earlier_results(job.series_uid, job.job_id + 1), index.instance_paths(job.series_uid),
                 index.series(job.series_uid), index.has_instance(f"{job.series_uid}.1"),
                 index.known_instances([f"{job.series_uid}.1", "1.2.3"])),
        index.due_deliveries, index.claim_next, lambda: index.purgeable_series(now - 86400),
        lambda: index.jobs(state=JobState.FAILED), lambda: index.prune_history(now - 400 * 86400),
    ]


@pytest.mark.parametrize("statistics", [False, True], ids=["no-statistics", "analyzed"])
def test_every_tick_and_request_uses_an_index(year: Path, tmp_path: Path, statistics: bool) -> None:
    index = Index(year)  # opened as the node opens it: the indexes are created on the way
    if statistics:  # the planner's choices with statistics (housekeeping's PRAGMA optimize), as at a year's size
        _year_statistics(index._db())
    db = OpsDB(year)
    found = []
    for paths, conn in ((_ops_paths(db), db._db()), (_node_paths(index, tmp_path), index._db())):
        for run in paths:
            statements: list[str] = []
            conn.set_trace_callback(statements.append)  # each statement as run, its values bound
            run()
            conn.set_trace_callback(None)
            found += _full_scans(conn, statements)
    if statistics:
        index._db().execute("DROP TABLE IF EXISTS sqlite_stat1")
    assert found == []


def _year_statistics(db: sqlite3.Connection, scale: int = 150) -> None:
    """``ANALYZE``, then each table's row count scaled to a year's (the rows per key kept): 400 series → 60,000."""
    db.execute("ANALYZE")
    for tbl, idx, stat in db.execute("SELECT tbl, idx, stat FROM sqlite_stat1").fetchall():
        rows, *rest = stat.split()
        db.execute("UPDATE sqlite_stat1 SET stat = ? WHERE tbl = ? AND idx IS ?",
                   (" ".join([str(int(rows) * scale), *rest]), tbl, idx))
    db.execute("ANALYZE sqlite_schema")  # reload the statistics


def test_the_check_finds_a_full_scan(year: Path) -> None:
    db = sqlite3.connect(year)
    assert _full_scans(db, ["SELECT * FROM jobs WHERE reason = 'x'",
                            "SELECT s.* FROM series s WHERE s.modality = 'CT'"]) == [
        "SCAN jobs: SELECT * FROM jobs WHERE reason = 'x'",
        "SCAN s: SELECT s.* FROM series s WHERE s.modality = 'CT'"]


# -- retention ----------------------------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _job(index: Index, clock: _Clock, k: int, to: JobState) -> int:
    """A job on series ``k``, taken to ``to`` (with a delivery and its objects once encoded)."""
    index.record_instance(InstanceRecord(f"1.{k}.1", f"1.{k}", "1", "1.2", "1.2", "CT", f"p{k}", 1, "A", "B", "h"))
    job = index.received_jobs()[-1].job_id
    if to in (JobState.SKIPPED, JobState.NOT_ROUTED):
        index.transition(job, to, "not for us")
        return job
    index.mark_complete(job, rule="r", profile="lungs", backend=None, destinations=("pacs",))
    index.claim_next()
    if to is JobState.FAILED:
        index.transition(job, JobState.FAILED, "broken")
        return job
    outputs = [{"sop_instance_uid": f"1.{k}.9", "kind": "seg", "sop_class_uid": "1.2", "path": "seg.dcm"}]
    index.mark_encoded(job, seg_path="seg.dcm", seg_series_uid=f"1.{k}.8", seg_sop_uid=f"1.{k}.9",
                       backend_used="b", model_version="1", outputs=outputs,
                       hold="review" if to is JobState.HELD else None)
    if to is JobState.DONE:
        index.delivery_result(job, "pacs", ok=True)
    return job


def _history(index: Index, job_id: int) -> tuple[int, int, int]:
    return (len(index.events(job_id)), len(index.deliveries(job_id)), len(index.delivery_objects(job_id)))


def test_retention_deletes_only_finished_jobs_history_older_than_the_age(tmp_path: Path) -> None:
    clock = _Clock()
    index = Index(tmp_path / "index.sqlite", clock=clock)
    old = {state: _job(index, clock, k, state) for k, state in enumerate(
        (JobState.DONE, JobState.SKIPPED, JobState.NOT_ROUTED, JobState.FAILED, JobState.HELD))}
    clock.now += 200 * 86400
    recent = _job(index, clock, 9, JobState.DONE)
    kept = {job: _history(index, job) for job in (*old.values(), recent)}
    assert kept[old[JobState.DONE]] == (6, 1, 1) and kept[old[JobState.HELD]] == (5, 1, 1)

    assert index.prune_history(clock.now - 180 * 86400) == 3  # done, skipped and not_routed, 200 days ago
    for state in (JobState.DONE, JobState.SKIPPED, JobState.NOT_ROUTED):
        assert _history(index, old[state]) == (0, 0, 0)
        assert index.existing_job(old[state]).state is state  # the job itself stays
    for job in (old[JobState.FAILED], old[JobState.HELD], recent):  # waiting for someone, or too young
        assert _history(index, job) == kept[job]
    assert index.instance_count() == 6 and index.series("1.0") is not None
    assert index.prune_history(clock.now - 180 * 86400) == 0  # nothing new since

    clock.now += 200 * 86400
    assert index.prune_history(clock.now - 180 * 86400) == 1  # the recent one's turn
    assert _history(index, recent) == (0, 0, 0)
    assert _history(index, old[JobState.FAILED]) == kept[old[JobState.FAILED]]
    index.optimize()
