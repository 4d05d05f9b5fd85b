"""One verdict per series (routing/study.py): the node's completion sweep and ``segnode route test`` agree,
and a series that arrives after its study was routed is judged against the routed one.

Real headers: the study of tests/study_fixtures.py (localizer, thick, thin, coronal, dose report) plus a
returned SEG and an SR of the same study; the sweep runs on a real index and spool with a fake clock.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from segnode.node.cli import main as cli
from segnode.storage.index import Index, Job, JobState

from tests.node.test_completion import Clock, _receive, _sweep
from tests.study_fixtures import build_study

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
RULE = {"name": "chest", "match": {"tag": "Modality", "one_of": ["CT", "SEG", "SR"]},
        "action": {"profiles": ["lungs", "bone"], "backend": "hu_based",
                   "select": {"orientation": "axial", "prefer": ["thinnest"], "min_slices": 20}}}
ROUTES = {"rules": [RULE]}


def _non_image(source: Path, folder: Path, modality: str, sop_class: str, manufacturer: str) -> None:
    """One instance of a non-image object of the study (headers only, as a PACS would send it back)."""
    ds = dcmread(next(source.glob("*.dcm")), stop_before_pixels=True)
    out = copy.deepcopy(ds)
    out.SeriesInstanceUID, out.SOPInstanceUID = generate_uid(), generate_uid()
    out.SOPClassUID = out.file_meta.MediaStorageSOPClassUID = sop_class
    out.file_meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
    out.Modality, out.Manufacturer, out.SeriesDescription = modality, manufacturer, f"{modality} object"
    for keyword in ("ImageOrientationPatient", "ImagePositionPatient", "SliceThickness", "ImagesInAcquisition",
                    "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
                    "SamplesPerPixel", "PhotometricInterpretation", "RescaleIntercept", "RescaleSlope"):
        if keyword in out:
            delattr(out, keyword)
    folder.mkdir(parents=True)
    out.save_as(folder / "IM0001.dcm", enforce_file_format=True)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The study's series plus a returned SEG (segnode's own) and a third-party SR."""
    root = tmp_path_factory.mktemp("mixed")
    folders = build_study(root / "study")
    _non_image(folders["thin"], root / "study" / "seg", "SEG", SEG_STORAGE, "segnode")
    _non_image(folders["thin"], root / "study" / "sr", "SR", COMPREHENSIVE_SR, "Other vendor")
    return {**folders, "seg": root / "study" / "seg", "sr": root / "study" / "sr"}


def _route_test(routes: Path, path: Path, group_by: str, capsys: pytest.CaptureFixture[str]) -> dict[str, str]:
    """``segnode route test``'s verdict line per series UID."""
    assert cli.main(["route", "test", "--rules", str(routes), "--group-by", group_by, str(path)]) == 0
    out = capsys.readouterr().out
    verdicts: dict[str, str] = {}
    series = ""
    for line in out.splitlines():
        first = re.match(r"^(\S.*?)(?: \(\+\d+ more files of series (\S+)\))?$", line)
        if first and not line.startswith(("rules:", "study selection")):
            series = first[2] or str(dcmread(first[1], stop_before_pixels=True).SeriesInstanceUID)
        elif line.startswith("  => "):
            verdicts[series] = line[5:]
    return verdicts


def _node_verdict(job: Job) -> str:
    """The node's verdict on a job, in route test's words."""
    if job.state is JobState.SKIPPED:
        return f"skipped: {job.reason}"
    if job.state is JobState.NOT_ROUTED:
        return "not routed"
    assert job.state is JobState.COMPLETE, (job.state, job.reason)
    return f"rule {job.rule}: profile lungs, bone, backend hu_based, destinations (none), harvest (no)"


@pytest.mark.parametrize("group_by", ["study", "series"])
def test_route_test_and_the_node_give_the_same_verdict(tmp_path: Path, mixed: dict[str, Path], group_by: str,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    clock = Clock()
    sweep, index, spool = _sweep(tmp_path, clock, ROUTES, group_by=group_by)
    uids = {name: _receive(index, spool, folder) for name, folder in mixed.items()}
    index.mark_released(list(uids.values()))
    clock.now += 2.0
    assert sweep.sweep()
    node = {j.series_uid: _node_verdict(j) for j in index.jobs() if j.profile in (None, "lungs")}
    routes = tmp_path / "routes.yaml"
    routes.write_text((tmp_path / "routes.yaml").read_text())
    tested = _route_test(routes, next(iter(mixed.values())).parent, group_by, capsys)
    assert tested == node  # every series: the same verdict
    assert tested[uids["seg"]] == "skipped: modality SEG is not an image series"
    assert tested[uids["sr"]] == "skipped: modality SR is not an image series"
    assert tested[uids["localizer"]] == "skipped: localizer (ImageType LOCALIZER)"
    assert tested[uids["thin"]].startswith("rule chest:")
    if group_by == "study":
        assert tested[uids["thick"]].startswith("skipped: rule 'chest': not selected: axial, 55 slices, 4.5 mm")
    # a returned SEG on its own, as a single file: skipped, not "not routed"
    single = _route_test(routes, next(mixed["seg"].glob("*.dcm")), group_by, capsys)
    assert single == {uids["seg"]: "skipped: modality SEG is not an image series"}


def _jobs(index: Index, uid: str) -> list[Job]:
    return [j for j in index.jobs(limit=1000) if j.series_uid == uid]


def _encode(index: Index, jobs: list[Job]) -> None:
    for job in jobs:
        claimed = index.claim_next()
        assert claimed is not None
        index.mark_encoded(claimed.job_id, seg_path=None, seg_series_uid=None, seg_sop_uid=None, backend_used="x",
                           model_version="1")


def test_a_worse_series_after_the_study_was_routed_is_skipped_with_the_reason(tmp_path: Path,
                                                                             mixed: dict[str, Path]) -> None:
    clock = Clock()
    sweep, index, spool = _sweep(tmp_path, clock, ROUTES, group_by="study")
    thin = _receive(index, spool, mixed["thin"])
    index.mark_released([thin])
    clock.now += 2.0
    assert sweep.sweep()
    _encode(index, _jobs(index, thin))
    clock.now += 4.0  # a second association, past the grace period
    thick = _receive(index, spool, mixed["thick"])
    index.mark_released([thick])
    clock.now += 2.0
    assert not sweep.sweep()
    [late] = _jobs(index, thick)
    assert late.state is JobState.SKIPPED
    assert late.reason == (f"study already routed to series {thin}, preferred by rule 'chest' (not selected: "
                           f"axial, 55 slices, 4.5 mm, 'Thorax 4.5 mm'; series {thin} is preferred)")
    assert {j.state for j in _jobs(index, thin)} == {JobState.DONE}  # no destinations: done at once


def test_a_better_series_after_the_study_was_routed_supersedes_it(tmp_path: Path, mixed: dict[str, Path]) -> None:
    clock = Clock()
    sweep, index, spool = _sweep(tmp_path, clock, ROUTES, group_by="study")
    thick = _receive(index, spool, mixed["thick"])
    index.mark_released([thick])
    clock.now += 2.0
    assert sweep.sweep()
    earlier = {j.profile: j for j in _jobs(index, thick)}
    _encode(index, list(earlier.values()))
    clock.now += 4.0
    thin = _receive(index, spool, mixed["thin"])
    index.mark_released([thin])
    clock.now += 2.0
    assert sweep.sweep()
    later = {j.profile: j for j in _jobs(index, thin)}
    assert {j.state for j in later.values()} == {JobState.COMPLETE} and set(later) == {"lungs", "bone"}
    for profile, job in later.items():  # each profile's job supersedes the earlier job of its profile
        assert job.options["supersedes"] == [earlier[profile].job_id]
        assert f"preferred over series {thick}, routed earlier" in (job.reason or "")
