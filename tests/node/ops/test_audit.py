"""The audit log: append-only JSON lines, one writer, rotation, no keys outside the schema, resume."""

from __future__ import annotations

import json
import os

import pytest
from segnode.errors import StorageError
from segnode.node.ops.audit import (
    FIELDS,
    AuditFollower,
    AuditLog,
    last_index_event,
    read_records,
)
from segnode.node.ops.views import OpsDB

from tests.ops_helpers import STUDY, scripted_index


def test_records_are_json_lines_with_time_node_and_sorted_keys(tmp_path):
    log = AuditLog(tmp_path / "a" / "audit.jsonl", node="SEGNODE", clock=lambda: 1_700_000_000.25)
    log.write("association.rejected", calling_ae="EVIL", host="127.0.0.9", reason="not an allowed sender")
    log.close()
    lines = (tmp_path / "a" / "audit.jsonl").read_text().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record == {"event": "association.rejected", "time": "2023-11-14T22:13:20.250Z", "node": "SEGNODE",
                      "calling_ae": "EVIL", "host": "127.0.0.9", "reason": "not an allowed sender"}
    assert list(record) == sorted(record)


def test_keys_outside_the_schema_are_refused_and_nothing_is_written(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl", node="N")
    for phi_key in ("PatientName", "patient_id", "PatientBirthDate"):
        with pytest.raises(ValueError, match="outside the audit schema"):
            log.write("job.received", **{phi_key: "x"})
    with pytest.raises(ValueError, match="delivery entry"):
        log.write("job.done", deliveries=[{"destination": "pacs", "PatientName": "x"}])
    log.close()
    assert (tmp_path / "audit.jsonl").read_text() == ""
    assert not {k.lower() for k in FIELDS} & {"patientname", "patientid", "patient_name", "patient_id"}


def test_one_writer_per_file(tmp_path):
    first = AuditLog(tmp_path / "audit.jsonl", node="N")
    with pytest.raises(StorageError, match="held by another running node"):
        AuditLog(tmp_path / "audit.jsonl", node="N")
    first.close()
    AuditLog(tmp_path / "audit.jsonl", node="N").close()  # free again once closed


def test_appends_never_truncate(tmp_path):
    path = tmp_path / "audit.jsonl"
    for n in range(3):
        log = AuditLog(path, node="N")
        log.write("api.retry", job_id=n, state="complete", client="127.0.0.1")
        log.close()
    assert [r["job_id"] for r in read_records(path)] == [0, 1, 2]


def test_rotation_renames_and_the_new_file_carries_the_cursor(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, node="N", rotate_bytes=4096)
    n = 0
    while len(list(tmp_path.glob("audit.jsonl.*"))) < 2:
        n += 1
        log.write("job.received", index_event=n, job_id=n, state="received", study_uid=STUDY)
    log.close()
    rotated = sorted(tmp_path.glob("audit.jsonl.*"))
    assert len(rotated) == 2
    for old in rotated:
        assert 4096 <= old.stat().st_size < 4096 + 400
    current = read_records(path)
    assert current[0]["event"] == "audit.rotated" and current[0]["previous"] == rotated[-1].name
    assert last_index_event(path) == n
    every = [r["index_event"] for f in [*rotated, path] for r in read_records(f) if r["event"] == "job.received"]
    assert every == list(range(1, n + 1))  # nothing lost or repeated across files


def test_follower_records_every_job_event_with_the_decision_and_the_sender(tmp_path):
    s = scripted_index(tmp_path / "index.sqlite")
    log = AuditLog(tmp_path / "audit.jsonl", node="SEGNODE")
    spans = []
    follower = AuditFollower(log, OpsDB(tmp_path / "index.sqlite"), on_spans=spans.extend)
    assert follower.poll() == len(OpsDB(tmp_path / "index.sqlite").events_after(0))
    log.close()
    records = read_records(tmp_path / "audit.jsonl")
    by_job = {}
    for r in records:
        by_job.setdefault(r["job_id"], []).append(r)
    done = by_job[s.jobs["done"]]
    assert [r["event"] for r in done] == ["job.received", "job.complete", "job.segmenting", "job.encoded",
                                          "job.sending", "job.done"]
    received, complete = done[0], done[1]
    assert received["calling_ae"] == "SCANNER1" and received["host"] == "127.0.0.1" and received["study_uid"] == STUDY
    assert complete["rule"] == "ct-lungs" and complete["profile"] == "lungs" and complete["destinations"] == ["pacs"]
    assert complete["instances"] == 2 and complete["bytes"] == 2000
    assert done[3]["seg_sop_uid"] == "1.2.3.4.1" and done[3]["backend_used"] == "hu_based"
    assert done[5]["deliveries"][0]["destination"] == "pacs" and done[5]["deliveries"][0]["state"] == "done"
    failed = by_job[s.jobs["failed"]][-1]
    assert failed["event"] == "job.failed" and failed["reason"] == "BackendError: model crashed"
    dead = by_job[s.jobs["dead"]][-1]
    assert dead["event"] == "job.dead_letter"
    assert dead["deliveries"][0]["last_error"] == "association rejected permanently"
    assert by_job[s.jobs["not_routed"]][-1]["event"] == "job.not_routed"
    assert sorted((sp.stage, sp.seconds) for sp in spans) == sorted(s.spans)


def test_follower_resumes_after_a_restart_without_loss_or_repeat(tmp_path):
    s = scripted_index(tmp_path / "index.sqlite")
    db = OpsDB(tmp_path / "index.sqlite")
    log = AuditLog(tmp_path / "audit.jsonl", node="N")
    follower = AuditFollower(log, db)
    follower.start()
    follower.stop()
    log.close()
    first = read_records(tmp_path / "audit.jsonl")
    s.clock.advance(1)
    s.index.retry(s.jobs["failed"])  # a new event while the node is down
    log = AuditLog(tmp_path / "audit.jsonl", node="N")
    follower = AuditFollower(log, db)
    assert follower.cursor == db.last_event_id() - 1
    follower.start()
    follower.stop()
    log.close()
    records = read_records(tmp_path / "audit.jsonl")
    job_records = [r["index_event"] for r in records if r["event"].startswith("job.")]
    assert job_records == list(range(1, db.last_event_id() + 1))
    assert records[-1]["event"] == "job.complete" and records[-1]["reason"] == "retry requested"
    assert len(records) == len(first) + 2  # audit.opened + the retry


def test_fsync_policy_always_syncs_each_record(tmp_path, monkeypatch):
    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd)))
    log = AuditLog(tmp_path / "audit.jsonl", node="N", fsync=True)
    log.write("api.retry", job_id=1)
    log.write("api.retry", job_id=2)
    log.close()
    assert len(calls) == 2
    calls.clear()
    log = AuditLog(tmp_path / "audit.jsonl", node="N", fsync=False)
    log.write("api.retry", job_id=3)
    log.close()
    assert calls == []
