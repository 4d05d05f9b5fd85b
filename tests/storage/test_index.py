"""The index's state machine, with a fake clock (storage/index.py)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from segnode.errors import StorageError
from segnode.storage.index import (
    DeliveryState,
    Index,
    InstanceRecord,
    JobState,
    ObjectOutcome,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def record(sop: str, series: str = "1.2.3", study: str = "1.2") -> InstanceRecord:
    return InstanceRecord(sop_uid=sop, series_uid=series, study_uid=study, sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                          transfer_syntax_uid="1.2.840.10008.1.2.1", modality="CT", path=f"{study}/{series}/{sop}.dcm",
                          size_bytes=10, calling_ae="SCANNER", called_ae="SEGNODE", sender_host="127.0.0.1")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def index(tmp_path: Path, clock: Clock) -> Index:
    return Index(tmp_path / "index.sqlite", clock=clock)


def test_database_is_in_wal_mode_with_schema_version(index: Index) -> None:
    db = sqlite3.connect(index.path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == "1"


def test_first_instance_opens_one_received_job_and_duplicates_are_refused(index: Index) -> None:
    assert index.record_instance(record("1.1"))
    assert index.record_instance(record("1.2"))
    assert not index.record_instance(record("1.1"))
    jobs = index.jobs()
    assert [(j.state, j.series_uid) for j in jobs] == [(JobState.RECEIVED, "1.2.3")]
    assert index.series("1.2.3").instance_count == 2
    assert index.instance_paths("1.2.3") == ["1.2/1.2.3/1.1.dcm", "1.2/1.2.3/1.2.dcm"]


def test_series_completes_only_after_the_quiet_period(index: Index, clock: Clock) -> None:
    index.record_instance(record("1.1"))
    clock.now += 5
    index.record_instance(record("1.2"))
    clock.now += 9
    assert index.due_for_completion(10) == []
    clock.now += 1
    assert [j.series_uid for j in index.due_for_completion(10)] == ["1.2.3"]


def test_study_grouping_waits_for_the_whole_study(index: Index, clock: Clock) -> None:
    index.record_instance(record("1.1", series="1.2.3"))
    clock.now += 8
    index.record_instance(record("2.1", series="1.2.4"))
    clock.now += 3
    assert [j.series_uid for j in index.due_for_completion(10)] == ["1.2.3"]
    assert index.due_for_completion(10, by_study=True) == []
    clock.now += 8
    assert {j.series_uid for j in index.due_for_completion(10, by_study=True)} == {"1.2.3", "1.2.4"}


def test_full_path_to_done_records_every_state_with_time(index: Index, clock: Clock) -> None:
    index.record_instance(record("1.1"))
    job = index.jobs()[0]
    assert index.mark_complete(job.job_id, rule="r", profile="lungs", backend=None, destinations=("pacs",))
    claimed = index.claim_next()
    assert claimed.state is JobState.SEGMENTING and claimed.segment_attempts == 1
    assert index.claim_next() is None
    index.mark_encoded(job.job_id, seg_path="/x/seg.dcm", seg_series_uid="2.1", seg_sop_uid="2.2",
                       backend_used="hu_based", model_version="1")
    assert index.job(job.job_id).state is JobState.SENDING
    [(due_job, delivery)] = index.due_deliveries()
    assert delivery.destination == "pacs" and delivery.state is DeliveryState.PENDING
    clock.now += 1
    index.delivery_result(job.job_id, "pacs", ok=True)
    assert index.job(job.job_id).state is JobState.DONE
    states = [s for _, s, _ in index.events(job.job_id)]
    assert states == [JobState.RECEIVED, JobState.COMPLETE, JobState.SEGMENTING, JobState.ENCODED,
                      JobState.SENDING, JobState.DONE]


def test_no_destination_goes_straight_to_done(index: Index) -> None:
    index.record_instance(record("1.1"))
    job_id = index.jobs()[0].job_id
    index.mark_complete(job_id, rule="r", profile="lungs", backend=None, destinations=())
    index.claim_next()
    index.mark_encoded(job_id, seg_path="/x", seg_series_uid=None, seg_sop_uid=None, backend_used="b",
                       model_version="1")
    assert index.job(job_id).state is JobState.DONE


def _sending_job(index: Index) -> int:
    index.record_instance(record("1.1"))
    job_id = index.jobs()[0].job_id
    index.mark_complete(job_id, rule="r", profile="lungs", backend=None, destinations=("a", "b"))
    index.claim_next()
    index.mark_encoded(job_id, seg_path="/x", seg_series_uid="2", seg_sop_uid="3", backend_used="b",
                       model_version="1")
    return job_id


def test_retry_later_is_not_due_before_its_time(index: Index, clock: Clock) -> None:
    job_id = _sending_job(index)
    index.delivery_result(job_id, "a", ok=False, error="refused", retry_at=clock.now + 30)
    assert [d.destination for _, d in index.due_deliveries()] == ["b"]
    clock.now += 31
    assert {d.destination for _, d in index.due_deliveries()} == {"a", "b"}
    assert index.job(job_id).state is JobState.SENDING


def test_dead_delivery_dead_letters_the_job_and_retry_resends_only_it(index: Index) -> None:
    job_id = _sending_job(index)
    index.delivery_result(job_id, "a", ok=True)
    index.delivery_result(job_id, "b", ok=False, error="rejected")
    job = index.job(job_id)
    assert job.state is JobState.DEAD_LETTER and "rejected" in job.reason
    assert index.retry(job_id) is JobState.SENDING
    assert [d.destination for _, d in index.due_deliveries()] == ["b"]
    index.delivery_result(job_id, "b", ok=True)
    assert index.job(job_id).state is JobState.DONE


def _obj(kind: str, uid: str) -> dict:
    return {"kind": kind, "profile": "lungs", "path": f"/x/{uid}.dcm", "sop_class_uid": "1.2.840.10008.5.1.4.1.1.7",
            "sop_instance_uid": uid, "series_instance_uid": "9"}


def test_each_destination_tracks_the_objects_it_takes_and_a_retry_resends_only_the_dead_ones(index: Index) -> None:
    index.record_instance(record("1.1"))
    job_id = index.jobs()[0].job_id
    index.mark_complete(job_id, rule="r", profile="lungs", backend=None, destinations=("a", "b"))
    index.claim_next()
    outputs = [_obj("seg", "5.1"), _obj("rtstruct", "5.2"), _obj("overlay", "5.3"), _obj("overlay", "5.4")]
    index.mark_encoded(job_id, seg_path="/x/5.1.dcm", seg_series_uid="2", seg_sop_uid="5.1", backend_used="b",
                       model_version="1", outputs=outputs, takes={"b": ("rtstruct", "overlay")})
    assert [o["kind"] for o in index.job(job_id).outputs] == ["seg", "rtstruct", "overlay", "overlay"]
    assert len(index.delivery_objects(job_id, "a")) == 4  # absent from takes: everything
    assert {o.kind for o in index.delivery_objects(job_id, "b")} == {"rtstruct", "overlay"}
    index.delivery_result(job_id, "a", ok=True, objects=[ObjectOutcome(u, DeliveryState.DONE)
                                                         for u in ("5.1", "5.2", "5.3", "5.4")])
    index.delivery_result(job_id, "b", ok=False, error="rtstruct: refused", objects=[
        ObjectOutcome("5.2", DeliveryState.DEAD, "refused"), ObjectOutcome("5.3", DeliveryState.DONE),
        ObjectOutcome("5.4", DeliveryState.DONE)])
    assert index.job(job_id).state is JobState.DEAD_LETTER
    index.retry(job_id)
    states = {o.sop_instance_uid: o.state for o in index.delivery_objects(job_id, "b")}
    assert states == {"5.2": DeliveryState.PENDING, "5.3": DeliveryState.DONE, "5.4": DeliveryState.DONE}
    assert all(o.state is DeliveryState.DONE and o.delivered_at for o in index.delivery_objects(job_id, "a"))


def test_an_index_from_before_output_objects_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    Index(path).close()
    db = sqlite3.connect(path)
    db.execute("ALTER TABLE jobs DROP COLUMN outputs")
    db.execute("DROP TABLE delivery_objects")
    db.commit()
    db.close()
    index = Index(path)
    index.record_instance(record("1.1"))
    assert index.jobs()[0].outputs == [] and index.delivery_objects(index.jobs()[0].job_id) == []


def test_recover_returns_interrupted_segmentation_to_complete(index: Index) -> None:
    index.record_instance(record("1.1"))
    job_id = index.jobs()[0].job_id
    index.mark_complete(job_id, rule="r", profile="lungs", backend=None, destinations=())
    index.claim_next()
    assert index.recover() == [job_id]
    assert index.job(job_id).state is JobState.COMPLETE
    assert index.events(job_id)[-1][2] == "resumed after restart"
    assert index.claim_next().segment_attempts == 2


def test_illegal_transitions_are_refused(index: Index) -> None:
    index.record_instance(record("1.1"))
    job_id = index.jobs()[0].job_id
    assert not index.transition(job_id, JobState.DONE)
    assert index.job(job_id).state is JobState.RECEIVED
    with pytest.raises(StorageError, match="only failed, dead_letter or not_routed"):
        index.retry(job_id)


def test_new_instance_after_completion_opens_a_new_job(index: Index) -> None:
    index.record_instance(record("1.1"))
    first = index.jobs()[0].job_id
    index.transition(first, JobState.NOT_ROUTED, "no rule")
    index.record_instance(record("1.2"))
    assert [j.state for j in index.jobs()] == [JobState.RECEIVED, JobState.NOT_ROUTED]


def test_a_purged_series_received_again_starts_over(index: Index, clock: Clock) -> None:
    """Fetched again or re-sent after housekeeping removed its files: stored, counted afresh, a new job."""
    for sop in ("1.1", "1.2"):
        index.record_instance(record(sop))
    [first] = index.jobs()
    index.mark_complete(first.job_id, rule="r", profile="lungs", backend=None, destinations=())
    assert index.record_instance(record("1.1")) is False and index.holds_instance("1.1")  # a duplicate
    index.mark_purged("1.2.3")
    assert index.has_instance("1.1") and not index.holds_instance("1.1")  # its file is gone
    assert index.record_instance(record("1.1")) is True  # stored again
    assert index.record_instance(record("1.1")) is False  # and now a duplicate again
    assert index.record_instance(record("1.2")) is True
    info = index.series("1.2.3")
    assert info is not None and (info.purged_at, info.instance_count) == (None, 2)
    assert [(j.job_id == first.job_id, j.state) for j in index.jobs()] == [
        (False, JobState.RECEIVED), (True, JobState.COMPLETE)]


def test_done_series_become_purgeable_after_retention(index: Index, clock: Clock) -> None:
    index.record_instance(record("1.1"))
    job_id = index.jobs()[0].job_id
    index.mark_complete(job_id, rule="r", profile="lungs", backend=None, destinations=())
    index.claim_next()
    index.mark_encoded(job_id, seg_path="/x", seg_series_uid=None, seg_sop_uid=None, backend_used="b",
                       model_version="1")
    assert index.purgeable_series(clock.now - 10) == []
    assert [s.series_uid for s in index.purgeable_series(clock.now)] == ["1.2.3"]
    index.mark_purged("1.2.3")
    assert index.purgeable_series(clock.now + 100) == []
