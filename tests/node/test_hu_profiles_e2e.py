"""Two ``hu_based`` profiles on one route, and late series of a routed study, end to end.

DCMTK storescu → ``segnode serve`` → Orthanc.  The route asks for
``profiles: [lungs, bone]`` with ``backend: hu_based`` on the thinnest axial
series of a study (tests/study_fixtures.py, from the thorax CTA).  The series
arrive one association at a time, each after the study was routed:

1. the thick series (4.5 mm): routed; the lungs method and the bone method run
   once each; one SEG per profile in Orthanc;
2. the thin series (1.5 mm), better by the route's preference: routed, its
   results supersede the thick series' (both profiles);
3. a 3 mm series, worse than the thin one: skipped with the reason.

The quiet period is an hour: completion on evidence completes each series.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydicom import dcmread
from segnode.storage.index import Index, Job, JobState

from tests.peers import (
    node,
    orthanc,
    store_statuses,
    storescu,
    wait_until,
    write_node_config,
)
from tests.study_fixtures import _series, build_study

pytestmark = [pytest.mark.peer, pytest.mark.slow]

PROFILES = {"lungs": ["lung_left", "lung_right"], "bone": ["bone"]}
SETTLED = {JobState.DONE, JobState.FAILED, JobState.DEAD_LETTER, JobState.SKIPPED, JobState.NOT_ROUTED,
           JobState.SUPERSEDED}


def _uid(folder: Path) -> str:
    return str(dcmread(next(folder.glob("*.dcm")), stop_before_pixels=True).SeriesInstanceUID)


def _settled(index: Index, series_uid: str, count: int) -> list[Job] | None:
    jobs = [j for j in index.jobs(limit=1000) if j.series_uid == series_uid]
    return jobs if len(jobs) == count and all(j.state in SETTLED for j in jobs) else None


def _hu_runs(state_dir: Path, jobs: list[Job]) -> dict[str, int]:
    """How many times each HU method ran for these jobs (the backend's log line, in the jobs' worker logs)."""
    logs = [(state_dir / "results" / f"job-{j.job_id}" / "attempt-1" / "worker.log").read_text() for j in jobs]
    return {method: sum(log.count(f"hu_based {method} on ") for log in logs) for method in PROFILES}


def _segs_of(pacs, series_uid: str, tmp_path: Path) -> dict[str, list[str]]:  # type: ignore[no-untyped-def]
    """Orthanc's SEGs that reference ``series_uid``: their segment labels, by series description."""
    found: dict[str, list[str]] = {}
    for seg_series in pacs.series_by_modality("SEG"):
        [instance_id] = seg_series["Instances"]
        path = tmp_path / f"{instance_id}.dcm"
        path.write_bytes(pacs.get(f"/instances/{instance_id}/file"))
        seg = dcmread(path, stop_before_pixels=True)
        if seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid:
            labels = sorted(str(s.SegmentLabel) for s in seg.SegmentSequence)
            found[str(seg.SeriesInstanceUID)] = labels
    return found


def _rejected_series(pacs, tmp_path: Path) -> list[set[str]]:  # type: ignore[no-untyped-def]
    """The series each Key Object Selection (Rejected for Quality Reasons) in Orthanc references."""
    notes = []
    for series in pacs.series_by_modality("KO"):
        for instance_id in series["Instances"]:
            path = tmp_path / f"{instance_id}.dcm"
            path.write_bytes(pacs.get(f"/instances/{instance_id}/file"))
            kos = dcmread(path)
            assert kos.ConceptNameCodeSequence[0].CodeValue == "113001"
            notes.append({str(s.SeriesInstanceUID) for study in kos.CurrentRequestedProcedureEvidenceSequence
                          for s in study.ReferencedSeriesSequence})
    return notes


def test_two_hu_profiles_one_run_per_method_and_late_series(tmp_path: Path) -> None:
    study = build_study(tmp_path / "study")
    thorax = sorted(study["thin"].glob("*.dcm"))
    medium = tmp_path / "study" / "medium"
    _series([dcmread(p) for p in thorax[::2]], medium, 5, "Thorax 3 mm", SliceThickness=3.0)
    uids = {name: _uid(folder) for name, folder in (*study.items(), ("medium", medium))}
    routes = tmp_path / "routes.yaml"
    routes.write_text(yaml.safe_dump({"rules": [{"name": "chest", "fallback": True, "action": {
        "profiles": list(PROFILES), "backend": "hu_based", "destinations": ["pacs"],
        "select": {"orientation": "axial", "prefer": ["thinnest"], "min_slices": 20}}}]}))
    with orthanc(tmp_path / "orthanc") as pacs:
        config = write_node_config(
            tmp_path / "node.yaml", routes=str(routes),
            destinations=[{"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.dicom_port,
                           "rejection_notes": True}],
            completion={"group_by": "study", "quiet_period_s": 3600, "sweep_interval_s": 0.2},
            worker={"device": "cpu", "timeout_s": 600})
        with node(config) as n:
            index = Index(n.state_dir / "index.sqlite")

            # 1. the thick series: routed, each HU method once, one SEG per profile
            sent = storescu(n.port, [study["thick"]])
            assert store_statuses(sent.stderr).count("Success") == 55, sent.stderr[-2000:]
            thick = wait_until(lambda: _settled(index, uids["thick"], 2), 600, "the thick series' jobs")
            assert {j.state for j in thick} == {JobState.DONE}, [(j.profile, j.state, j.reason) for j in thick]
            assert _hu_runs(n.state_dir, thick) == {"lungs": 1, "bone": 1}
            assert sorted(_segs_of(pacs, uids["thick"], tmp_path).values()) == sorted(PROFILES.values())

            # 2. the thin series, a second association later: preferred, it supersedes the thick series
            sent = storescu(n.port, [study["thin"]])
            assert store_statuses(sent.stderr).count("Success") == 164, sent.stderr[-2000:]
            thin = wait_until(lambda: _settled(index, uids["thin"], 2), 600, "the thin series' jobs")
            assert {j.state for j in thin} == {JobState.DONE}, [(j.profile, j.state, j.reason) for j in thin]
            routed = [r for j in thin for _, state, r in index.events(j.job_id) if state is JobState.COMPLETE]
            assert len(routed) == 2 and all(f"preferred over series {uids['thick']}, routed earlier" in (r or "")
                                            for r in routed), routed
            assert _hu_runs(n.state_dir, thin) == {"lungs": 1, "bone": 1}
            wait_until(lambda: {j.state for j in _settled(index, uids["thick"], 2) or ()} == {JobState.SUPERSEDED},
                       60, "the thick series' results superseded")
            assert sorted(_segs_of(pacs, uids["thin"], tmp_path).values()) == sorted(PROFILES.values())
            # an IOCM Rejection Note per superseded result, naming exactly the thick series' SEGs among its objects
            notes = wait_until(lambda: (lambda k: k if len(k) == 2 else None)(_rejected_series(pacs, tmp_path)), 120,
                               "a rejection note per superseded result in Orthanc")
            assert set().union(*notes) >= set(_segs_of(pacs, uids["thick"], tmp_path))
            assert not set().union(*notes) & set(_segs_of(pacs, uids["thin"], tmp_path))

            # 3. a 3 mm series, later still: worse than the thin one, skipped with the reason
            sent = storescu(n.port, [medium])
            assert store_statuses(sent.stderr).count("Success") == 82, sent.stderr[-2000:]
            [late] = wait_until(lambda: _settled(index, uids["medium"], 1), 120, "the 3 mm series judged")
            assert late.state is JobState.SKIPPED
            assert (late.reason or "").startswith(
                f"study already routed to series {uids['thin']}, preferred by rule 'chest' (not selected: axial, "
                "82 slices, 3 mm"), late.reason
        assert len(pacs.series_by_modality("SEG")) == 4  # two results per routed series, none for the 3 mm one
