"""The corrections hub on a real index and spool, without a node process or peers.

A small synthetic CT is spooled and indexed, its job routed and encoded (held or
sent) with the node's own SEG; the SEG edited as a viewer would is then taken as
a correction or refused (:class:`segnode.node.corrections.Corrections`).
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid
from segnode.models.series import load_series
from segnode.models.volume import LabelMap
from segnode.node.config import NodeConfig
from segnode.node.correction_seg import CorrectionRefused
from segnode.node.corrections import Corrections
from segnode.node.events import Event, JobMoved
from segnode.node.status import Status
from segnode.node.supersede import supersede_options
from segnode.node.writers.seg import write_seg
from segnode.profiles import load_profile
from segnode.storage.index import DeliveryState, Index, InstanceRecord, Job, JobState, ObjectOutcome
from segnode.storage.spool import Spool

from tests.phantoms import write_ct_series

LUNGS = load_profile("lungs")


class Node:
    """A spool and an index holding one routed, encoded job of a small CT series, and its SEG."""

    def __init__(self, tmp: Path, *, hold: bool) -> None:
        self.config = NodeConfig(state_dir=tmp / "state")
        self.spool, self.index = Spool(self.config.spool_dir), Index(self.config.index_path)
        self.events: list[Event] = []
        self.corrections = Corrections(self.config, self.index, self.spool, self.events.append)
        study, series = generate_uid(), generate_uid()
        folder = self.spool.series_dir(study, series)
        write_ct_series(np.full((5, 20, 16), -800, dtype=np.int16), folder, (0.8, 0.8, 2.5), (0.0, 0.0, 0.0),
                        series_uid=series, study_uid=study)
        for path in sorted(folder.glob("*.dcm")):
            self.index.record_instance(InstanceRecord(
                str(dcmread(path, stop_before_pixels=True).SOPInstanceUID), series, study, "1.2.840.10008.5.1.4.1.1.2",
                "1.2.840.10008.1.2.1", "CT", str(path.relative_to(self.spool.root)), path.stat().st_size, "CT", "SEGNODE",
                "127.0.0.1"))
        self.job = self._encode(series, hold)

    def _encode(self, series: str, hold: bool) -> Job:
        [job] = self.index.jobs()
        self.index.mark_complete(job.job_id, rule="lungs", profile="lungs", backend="hu_based", destinations=("pacs",),
                                 options={"review": "always"} if hold else {})
        self.index.claim_next()
        volume = load_series(self.spool.root, series)
        array = np.zeros(volume.shape, dtype=np.uint8)
        array[1:4, 4:12, 2:7], array[1:4, 4:12, 9:14] = 1, 2
        folder = self.config.results_dir / "job-1" / "attempt-1"
        folder.mkdir(parents=True)
        seg = write_seg(volume, LabelMap(array, LUNGS.label_values(), backend="hu_based"), LUNGS, folder)
        output = {"kind": "seg", "sop_class_uid": "1.2.840.10008.5.1.4.1.1.66.4",
                  "sop_instance_uid": seg.sop_instance_uid, "series_instance_uid": seg.series_instance_uid,
                  "path": seg.path.name}
        self.index.mark_encoded(job.job_id, seg_path=seg.path.name, seg_series_uid=seg.series_instance_uid,
                                seg_sop_uid=seg.sop_instance_uid, backend_used="hu_based", model_version="1",
                                hold="QC pass" if hold else None, outputs=[output], result_dir=str(folder))
        if not hold:
            self.index.delivery_result(job.job_id, "pacs", ok=True, objects=[
                ObjectOutcome(seg.sop_instance_uid, DeliveryState.DONE)])
        return self.index.existing_job(job.job_id)

    def edited(self) -> Dataset:
        seg = dcmread(self.job.file(self.job.seg_path or ""))
        frames = seg.pixel_array.copy()
        frames[0] = 0  # the first frame (of the left lung) erased
        seg.PixelData = np.packbits(frames.astype(np.uint8).ravel(), bitorder="little").tobytes()
        seg.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
        seg.SeriesInstanceUID, seg.SOPInstanceUID = generate_uid(), generate_uid()
        return seg


def _part10(seg: Dataset) -> bytes:
    out = BytesIO()
    seg.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_a_held_jobs_correction_opens_a_correction_job_and_supersedes_it_at_once(tmp_path: Path) -> None:
    node = Node(tmp_path, hold=True)
    seg = node.edited()
    assert node.corrections.stored_seg(_part10(seg), "alice") is None
    [new] = [j for j in node.index.jobs() if j.job_id != node.job.job_id]
    assert new.state is JobState.COMPLETE and new.destinations == ("pacs",) and new.profile == "lungs"
    correction = new.options["correction"]
    assert correction["of_job"] == node.job.job_id and correction["author"] == "alice" and correction["sent"] == []
    assert new.options["supersedes"] == [node.job.job_id] and "review" not in new.options
    left = next(c for c in correction["changes"] if c["tissue"] == "lung_left")
    assert left["dice"] == pytest.approx(0.8)  # one slice of three erased: 2 * 80 / (120 + 80)
    assert left["corrected_ml"] == pytest.approx(left["model_ml"] * 2 / 3, rel=1e-3)
    assert new.reason.startswith(f"correction of job {node.job.job_id} by alice (counts as the review's approval): ")
    assert node.index.existing_job(node.job.job_id).state is JobState.SUPERSEDED
    assert supersede_options(node.index, new) == {"result_version": 2, "rejects": []}  # nothing was sent
    assert JobMoved(node.job.job_id, JobState.SUPERSEDED,
                    f"corrected by alice: job {new.job_id} sends the correction; this result is never sent") \
        in node.events
    labels = np.load(Path(correction["labels"]))["labels"]
    assert int((labels == 1).sum()) == 80 and int((labels == 2).sum()) == 120
    folder = node.config.results_dir / "corrections" / str(seg.SOPInstanceUID)
    assert (folder / "correction.dcm").read_bytes() == _part10(seg)

    # the superseded job is corrected no more (its correction is, once encoded)
    with pytest.raises(CorrectionRefused, match=f"job {node.job.job_id} has no result for the SEG's series"):
        node.corrections.correct(node.edited(), "bob", job_id=node.job.job_id)


def test_a_sent_jobs_correction_rejects_what_was_sent(tmp_path: Path) -> None:
    node = Node(tmp_path, hold=False)
    assert node.corrections.correct(node.edited(), "alice").of_job == node.job.job_id
    [new] = [j for j in node.index.jobs() if j.job_id != node.job.job_id]
    assert new.options["correction"]["sent"] == [node.job.seg_sop_uid]
    assert [o["sop_instance_uid"] for o in supersede_options(node.index, new)["rejects"]] == [node.job.seg_sop_uid]
    assert "review's approval" not in (new.reason or "")
    assert node.index.existing_job(node.job.job_id).state is JobState.DONE  # superseded once the correction is encoded
    # one correction of a job at a time
    with pytest.raises(CorrectionRefused, match=f"job {new.job_id} is still encoding a correction of job 1"):
        node.corrections.correct(node.edited(), "bob")


@pytest.mark.parametrize(("edit", "comment", "reason"), [
    ("shift", "frame 1 lies 3.00 mm off the source grid", "correction_geometry"),
    ("segment", "segment 'liver' unknown to profile lungs", "correction_segments"),
    ("series", "the SEG references no job's source series", "correction_no_job"),
])
def test_a_refused_correction_changes_nothing_and_keeps_the_file(tmp_path: Path, edit: str, comment: str,
                                                                 reason: str) -> None:
    node = Node(tmp_path, hold=True)
    seg = node.edited()
    if edit == "shift":
        for frame in seg.PerFrameFunctionalGroupsSequence:
            x, y, z = frame.PlanePositionSequence[0].ImagePositionPatient
            frame.PlanePositionSequence[0].ImagePositionPatient = [x, float(y) + 3.0, z]
    elif edit == "segment":
        seg.SegmentSequence[0].SegmentLabel = "liver"
        seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue = "10200004"
    else:
        seg.ReferencedSeriesSequence[0].SeriesInstanceUID = generate_uid()
    refusal = node.corrections.stored_seg(_part10(seg), "alice")
    assert refusal is not None and (refusal.status, refusal.comment, refusal.reason) == (
        Status.PROCESSING_FAILURE, comment, reason)
    assert [j.job_id for j in node.index.jobs()] == [node.job.job_id] and node.events == []
    assert node.index.existing_job(node.job.job_id).state is JobState.HELD
    kept = node.config.results_dir / "corrections" / "refused" / f"{seg.SOPInstanceUID}.dcm"
    assert kept.read_bytes() == _part10(seg)


def test_the_nodes_own_seg_coming_back_is_no_correction(tmp_path: Path) -> None:
    """A PACS that forwards the whole study sends the node's SEG back: stored as it is, nothing opened."""
    node = Node(tmp_path, hold=False)
    own = node.job.file(node.job.seg_path or "").read_bytes()
    assert node.corrections.stored_seg(own, "PACS") is None
    assert [j.job_id for j in node.index.jobs()] == [node.job.job_id] and node.events == []
    assert node.index.existing_job(node.job.job_id).state is JobState.DONE
