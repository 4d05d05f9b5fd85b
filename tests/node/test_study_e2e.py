"""A whole CT study end to end: DCMTK storescu → ``segnode serve`` → Orthanc, studies not series.

The study (tests/study_fixtures.py, derived from the thorax CTA) has a
localizer, a thick and a thin axial series, a coronal reformat and a dose
report.  The route asks for three profiles on the thinnest axial series, run
by TotalSegmentator (the tiny committed model).  The quiet period is an hour:
only completion on evidence can complete the study within the test.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
import yaml
from pydicom import dcmread
from segnode.storage.index import Index, JobState

from tests.dl_fixtures import dl_models, dl_weights  # noqa: F401
from tests.peers import (
    free_port,
    node,
    orthanc,
    store_statuses,
    storescu,
    wait_until,
    write_node_config,
)
from tests.study_fixtures import build_study

pytestmark = [pytest.mark.peer, pytest.mark.slow]

PROFILES = ["liver", "spleen", "kidneys"]
FINAL = {JobState.DONE, JobState.FAILED, JobState.DEAD_LETTER, JobState.SKIPPED, JobState.NOT_ROUTED}


def test_study_gives_one_seg_per_profile_for_the_preferred_series(tmp_path: Path, dl_weights: Path) -> None:
    study = build_study(tmp_path / "study")
    series_uid = {k: str(dcmread(next(f.glob("*.dcm")), stop_before_pixels=True).SeriesInstanceUID)
                  for k, f in study.items()}
    routes = tmp_path / "routes.yaml"
    routes.write_text(yaml.safe_dump({"rules": [{"name": "chest", "fallback": True, "action": {
        "profiles": PROFILES, "backend": "totalsegmentator", "destinations": ["pacs"],
        "select": {"orientation": "axial", "prefer": ["thinnest"], "min_slices": 20}}}]}))
    http_port = free_port()
    with orthanc(tmp_path / "orthanc") as pacs:
        config = write_node_config(
            tmp_path / "node.yaml", routes=str(routes),
            destinations=[{"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.dicom_port}],
            completion={"group_by": "study", "quiet_period_s": 3600, "sweep_interval_s": 0.2},
            storage_classes=["SecondaryCaptureImageStorage"],
            worker={"device": "cpu", "weights_dir": str(dl_weights), "timeout_s": 600}, http={"port": http_port})
        with node(config) as n:
            sent = storescu(n.port, list(study.values()))
            assert store_statuses(sent.stderr).count("Success") == 1 + 55 + 164 + 5 + 1, sent.stderr[-2000:]
            index = Index(n.state_dir / "index.sqlite")

            def settled():  # type: ignore[no-untyped-def]
                jobs = index.jobs()
                done = len(jobs) == 4 + len(PROFILES) and all(j.state in FINAL for j in jobs)
                return jobs if done else None

            jobs = wait_until(settled, 900, "every job of the study to finish", interval=0.5)
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/api/v1/jobs?limit=50", timeout=10) as resp:
                api = {j["job_id"]: j for j in json.load(resp)["jobs"]}
        by_series: dict[str, list] = {}
        for job in jobs:
            by_series.setdefault(job.series_uid, []).append(job)
        thin = by_series[series_uid["thin"]]
        assert sorted(j.profile for j in thin) == sorted(PROFILES)
        assert all(j.state is JobState.DONE for j in thin), [(j.profile, j.state, j.reason) for j in thin]
        assert all(j.completion == "association released; 164 slices gap-free, ImagesInAcquisition=164 "
                                   "(grace 1.5 s)" for j in thin), thin[0].completion
        assert {api[j.job_id]["completion"] for j in thin} == {thin[0].completion}  # the job API shows it
        logs = [(n.state_dir / "results" / f"job-{j.job_id}" / "attempt-1" / "worker.log").read_text() for j in thin]
        assert sum("reusing the shared model run" in log for log in logs) == len(PROFILES) - 1  # one model run
        events = [reason for _, state, reason in index.events(thin[0].job_id) if state is JobState.COMPLETE]
        assert "selected: axial, 164 slices, 1.5 mm" in events[0]
        reasons = {k: by_series[uid][0].reason or "" for k, uid in series_uid.items() if k != "thin"}
        assert {k: by_series[uid][0].state for k, uid in series_uid.items() if k != "thin"} == dict.fromkeys(
            reasons, JobState.SKIPPED)
        assert "localizer" in reasons["localizer"]
        assert "secondary capture" in reasons["dose"]
        assert "coronal, not axial" in reasons["coronal"]
        assert "is preferred" in reasons["thick"] and series_uid["thin"] in reasons["thick"]

        segs = pacs.series_by_modality("SEG")
        assert len(segs) == len(PROFILES)
        described = []
        for seg_series in segs:
            [instance_id] = seg_series["Instances"]
            seg_file = tmp_path / f"{instance_id}.dcm"
            seg_file.write_bytes(pacs.get(f"/instances/{instance_id}/file"))
            seg = dcmread(seg_file, stop_before_pixels=True)
            assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid["thin"]
            described.append(sorted(s.SegmentLabel for s in seg.SegmentSequence))
        assert sorted(described) == [["kidney_left", "kidney_right"], ["liver"], ["spleen"]]
