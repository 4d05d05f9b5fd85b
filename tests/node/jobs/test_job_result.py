"""The typed job result (node/jobs/result.py): strict JSON, paths relative to the job folder, read by the index."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from segnode.errors import InputError
from segnode.models.qc import Finding, Outcome
from segnode.node.jobs.result import Harvest, JobResult, Picture, job_folder
from segnode.node.writers.record import EncodedObject
from segnode.storage.index import Index, InstanceRecord


def a_result(**changes: object) -> JobResult:
    seg = EncodedObject(kind="seg", profile="lungs", path="seg-1.dcm", sop_class_uid="1.2.840.10008.5.1.4.1.1.66.4",
                        sop_instance_uid="2.25.1", series_instance_uid="2.25.2")
    fields: dict[str, object] = {
        "objects": (seg,), "backend_used": "hu_based", "model_version": "1", "weights_hash": "",
        "summary": "summary_lungs_1.json", "qc": (Finding("volume_ml", "lung_left", Outcome.PASS, 1200.5, "500-4000"),),
        "pictures": (Picture("lung_left", "axial", "review/lung_left_axial.png"),), "harvest": None}
    fields.update(changes)
    return JobResult(**fields)  # type: ignore[arg-type]


def test_round_trips_through_json() -> None:
    result = a_result(harvest=Harvest("lungs_v1", "not harvested", "no secret"))
    assert JobResult.from_json(result.to_json()) == result
    assert JobResult.from_dict(json.loads(result.to_json())) == result
    assert json.loads(a_result().to_json())["harvest"] is None


@pytest.mark.parametrize("change", [
    lambda d: d.update(extra=1),  # unknown key
    lambda d: d.pop("summary"),  # missing key
    lambda d: d.update(summary="/etc/passwd"),  # absolute
    lambda d: d.update(summary="../outside.json"),  # climbs out of the job folder
    lambda d: d["objects"][0].update(path="a/../../b.dcm"),
    lambda d: d["objects"][0].update(path="@out/seg-1.dcm"),  # the old rebasing prefix
    lambda d: d["objects"][0].update(colour="red"),  # unknown key in an object
    lambda d: d["objects"][0].update(sop_instance_uid=7),  # wrong type
    lambda d: d.update(objects=[]),  # nothing encoded
    lambda d: d["qc"][0].update(outcome="great"),
    lambda d: d["qc"][0].update(figure="12"),
    lambda d: d["pictures"][0].update(file="/tmp/x.png"),
    lambda d: d.update(harvest={"dataset": "x", "status": "harvested", "case_id": "c"}),
    lambda d: d.update(backend_used=None),
])
def test_from_json_is_strict(change) -> None:  # type: ignore[no-untyped-def]
    data = json.loads(a_result().to_json())
    change(data)
    with pytest.raises(InputError):
        JobResult.from_json(json.dumps(data))


def test_not_json_is_an_input_error() -> None:
    with pytest.raises(InputError):
        JobResult.from_json(b"{not json")


def test_the_main_object_is_the_first_seg() -> None:
    rt = EncodedObject("rtstruct", "lungs", "rt.dcm", "1.2.840.10008.5.1.4.1.1.481.3", "2.25.3", "2.25.4")
    result = a_result(objects=(rt, *a_result().objects))
    assert result.seg.kind == "seg" and result.seg.path == "seg-1.dcm"
    assert a_result(objects=(rt,)).seg is rt
    assert result.files() == ("rt.dcm", "seg-1.dcm", "summary_lungs_1.json", "review/lung_left_axial.png")


def _encoded_job(index: Index, **kw: object) -> int:
    index.record_instance(InstanceRecord("1.1", "1.2", "1.3", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1",
                                         "CT", "1.3/1.2/1.1.dcm", 10, "A", "B", "127.0.0.1"))
    job = index.jobs()[0]
    assert index.mark_complete(job.job_id, rule="r", profile="lungs", backend=None, destinations=("pacs",))
    index.claim_next()
    index.mark_encoded(job.job_id, seg_series_uid="2.25.2", seg_sop_uid="2.25.1", backend_used="b", model_version="1",
                       **kw)  # type: ignore[arg-type]
    return job.job_id


def test_the_index_stores_paths_relative_and_resolves_them_against_the_job_folder(tmp_path: Path) -> None:
    index = Index(tmp_path / "index.sqlite")
    folder = job_folder(tmp_path / "results", 1, 1)
    result = a_result()
    job_id = _encoded_job(index, seg_path=result.seg.path, outputs=[o.to_json() for o in result.objects],
                          result_dir=str(folder))
    job = index.job(job_id)
    assert job is not None and job.seg_path == "seg-1.dcm" and job.outputs[0]["path"] == "seg-1.dcm"
    assert job.file(job.seg_path) == folder / "seg-1.dcm"
    [obj] = index.delivery_objects(job_id)  # what the sender opens
    assert obj.path == "seg-1.dcm" and job.file(obj.path) == folder / "seg-1.dcm"


def test_a_job_recorded_before_relative_paths_still_resolves(tmp_path: Path) -> None:
    """An index from before the ``result_dir`` column: absolute paths, read as they are."""
    path = tmp_path / "index.sqlite"
    _encoded_job(Index(path), seg_path="/old/results/job-1/attempt-1/seg.dcm",
                 outputs=[{**a_result().objects[0].to_json(), "path": "/old/results/job-1/attempt-1/seg.dcm"}])
    with sqlite3.connect(path) as db:  # as the old schema had it: no result_dir column at all
        db.execute("ALTER TABLE jobs DROP COLUMN result_dir")
    job = Index(path).jobs()[0]  # opening it adds the column back, empty
    assert job.result_dir is None
    assert job.file(job.seg_path or "") == Path("/old/results/job-1/attempt-1/seg.dcm")
    assert job.file(job.outputs[0]["path"]) == Path("/old/results/job-1/attempt-1/seg.dcm")
