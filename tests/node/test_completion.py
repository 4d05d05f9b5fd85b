"""Completion on evidence (node/completion.py) and series selection (routing/selection.py) on real headers.

Headers come from real files: the thorax CTA in tests/data (164 axial slices)
and series derived from it the way a scanner's study holds them
(tests/study_fixtures.py).  The sweep tests run :class:`segnode.node.sweep.CompletionSweep`
on a real index and spool with a fake clock.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from pydicom import dcmread
from segnode.node.completion import judge, read_facts
from segnode.node.config import NodeConfig
from segnode.node.sweep import CompletionSweep
from segnode.routing.reload import RulesHolder
from segnode.routing.rules import Select
from segnode.routing.selection import choose, ineligible
from segnode.storage.index import Index, InstanceRecord, JobState
from segnode.storage.spool import Spool

from tests.study_fixtures import THORAX, build_study


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_study(tmp_path_factory.mktemp("study"))


def facts_of(folder: Path, drop: int | None = None):  # type: ignore[no-untyped-def]
    files = sorted(folder.glob("*.dcm"))
    if drop is not None:
        del files[drop]
    uid = str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    return read_facts(uid, files)


def test_whole_axial_series_is_gap_free() -> None:
    verdict = judge(facts_of(THORAX))
    assert verdict.whole and verdict.reason == "164 slices gap-free, ImagesInAcquisition=164", verdict.reason


def test_a_missing_slice_is_a_gap() -> None:
    verdict = judge(facts_of(THORAX, drop=80))
    assert not verdict.whole and "not evenly spaced" in verdict.reason and "3 mm" in verdict.reason


def test_a_missing_last_slice_is_caught_by_images_in_acquisition(study: dict[str, Path]) -> None:
    whole = judge(facts_of(study["thin"]))
    assert whole.whole and "ImagesInAcquisition=" in whole.reason, whole.reason
    verdict = judge(facts_of(study["thin"], drop=-1))  # still evenly spaced, one short of the header
    assert not verdict.whole and "ImagesInAcquisition" in verdict.reason


def test_ineligible_series_are_named(study: dict[str, Path]) -> None:
    assert "localizer" in (ineligible(facts_of(study["localizer"])) or "")
    assert "secondary capture" in (ineligible(facts_of(study["dose"])) or "")
    assert ineligible(facts_of(study["thin"])) is None and ineligible(facts_of(study["coronal"])) is None


def test_selection_prefers_thin_axial_with_reasons(study: dict[str, Path]) -> None:
    candidates = [facts_of(study[k]) for k in ("thick", "thin", "coronal")]
    choice = choose(candidates, Select())
    thin, thick, coronal = (c.series_uid for c in (candidates[1], candidates[0], candidates[2]))
    assert choice.chosen == thin and "axial" in choice.reason and "1.5 mm" in choice.reason
    assert "coronal, not axial" in choice.skipped[coronal]
    assert "is preferred" in choice.skipped[thick]
    thickest = choose(candidates, Select(prefer=("thickest",)))
    assert thickest.chosen == thick
    assert choose(candidates, Select(min_slices=1000)).chosen is None


# -- the sweep on a real index -------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _receive(index: Index, spool: Spool, folder: Path) -> str:
    series_uid = ""
    for file in sorted(folder.glob("*.dcm")):
        ds = dcmread(file, stop_before_pixels=True)
        series_uid = str(ds.SeriesInstanceUID)
        target = spool.series_dir(str(ds.StudyInstanceUID), series_uid)
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(file, target / f"{ds.SOPInstanceUID}.dcm")
        index.record_instance(InstanceRecord(
            str(ds.SOPInstanceUID), series_uid, str(ds.StudyInstanceUID), str(ds.SOPClassUID), "1.2.840.10008.1.2.1",
            str(ds.Modality), str((target / f"{ds.SOPInstanceUID}.dcm").relative_to(spool.root)), 1,
            "STORESCU", "SEGNODE", "127.0.0.1"))
    return series_uid


def _sweep(tmp_path: Path, clock: Clock, rules: dict | None = None,  # type: ignore[no-untyped-def]
           **completion: object):
    config = NodeConfig(state_dir=tmp_path / "state", completion={"quiet_period_s": 10, **completion})
    index = Index(config.index_path, clock=clock)
    spool = Spool(config.spool_dir, fsync=False)
    holder = RulesHolder(None)
    if rules is not None:
        path = tmp_path / "routes.yaml"
        path.write_text(yaml.safe_dump(rules))
        holder = RulesHolder(path)
    return CompletionSweep(config, index, spool, holder, lambda event: None,
                           lambda names, ae, host: tuple(names)), index, spool


def test_release_and_a_whole_volume_complete_after_the_grace_not_the_quiet_period(tmp_path: Path) -> None:
    clock = Clock()
    sweep, index, spool = _sweep(tmp_path, clock)
    uid = _receive(index, spool, THORAX)
    clock.now += 1.0
    assert not sweep.sweep()  # not released: nothing yet
    index.mark_released([uid])
    clock.now += 1.0
    assert not sweep.sweep()  # released, still in the grace period (1.5 s)
    clock.now += 1.0
    assert sweep.sweep()
    [job] = index.jobs()
    assert job.state is JobState.COMPLETE
    assert job.completion == "association released; 164 slices gap-free, ImagesInAcquisition=164 (grace 1.5 s)"


def test_without_release_the_quiet_period_completes_and_says_so(tmp_path: Path) -> None:
    clock = Clock()
    sweep, index, spool = _sweep(tmp_path, clock)
    _receive(index, spool, THORAX)
    clock.now += 9.0
    assert not sweep.sweep()
    clock.now += 1.0
    assert sweep.sweep()
    assert index.jobs()[0].completion == "quiet period 10 s"


def test_released_but_with_a_gap_waits_for_the_quiet_period(tmp_path: Path, study: dict[str, Path]) -> None:
    clock = Clock()
    sweep, index, spool = _sweep(tmp_path, clock)
    gappy = tmp_path / "gappy"
    shutil.copytree(THORAX, gappy)
    sorted(gappy.glob("*.dcm"))[80].unlink()
    uid = _receive(index, spool, gappy)
    index.mark_released([uid])
    clock.now += 5.0
    assert not sweep.sweep()
    clock.now += 5.0
    assert sweep.sweep()
    assert index.jobs()[0].completion.startswith("quiet period 10 s (released, but slice positions not evenly")


def test_a_late_instance_reopens_and_supersedes(tmp_path: Path) -> None:
    clock = Clock()
    sweep, index, spool = _sweep(tmp_path, clock)
    late = tmp_path / "late"
    late.mkdir()
    files = sorted(THORAX.glob("*.dcm"))
    for f in files[:-1]:
        shutil.copy(f, late / f.name)
    uid = _receive(index, spool, late)
    index.mark_released([uid])
    clock.now += 2.0
    assert not sweep.sweep()  # one short of ImagesInAcquisition: no evidence
    clock.now += 10.0
    assert sweep.sweep()  # the quiet period
    first = index.claim_next()
    index.mark_encoded(first.job_id, seg_path=None, seg_series_uid=None, seg_sop_uid=None,  # type: ignore[union-attr]
                       backend_used="x", model_version="1")
    shutil.copy(files[-1], late / files[-1].name)
    only_last = tmp_path / "only_last"
    only_last.mkdir()
    shutil.copy(files[-1], only_last / files[-1].name)
    clock.now += 1.0
    _receive(index, spool, only_last)
    index.mark_released([uid])
    clock.now += 2.0
    assert sweep.sweep()
    second = index.jobs(JobState.COMPLETE)[0]
    assert second.options["supersedes"] == [first.job_id]  # type: ignore[union-attr]
    assert "re-opened by a late instance" in (second.reason or "")


def test_study_selection_skips_and_picks_with_reasons(tmp_path: Path, study: dict[str, Path]) -> None:
    clock = Clock()
    rules = {"rules": [{"name": "abdomen", "fallback": True,
                        "action": {"profiles": ["liver", "spleen"], "select": {"prefer": ["thinnest"]}}}]}
    sweep, index, spool = _sweep(tmp_path, clock, rules, group_by="study")
    uids = {k: _receive(index, spool, study[k]) for k in ("localizer", "thick", "thin", "coronal", "dose")}
    index.mark_released(list(uids.values()))
    clock.now += 2.0
    assert sweep.sweep()
    jobs = {(j.series_uid, j.profile): j for j in index.jobs()}
    states = {k: {j.state for (s, _), j in jobs.items() if s == uid} for k, uid in uids.items()}
    assert states == {"localizer": {JobState.SKIPPED}, "thick": {JobState.SKIPPED}, "thin": {JobState.COMPLETE},
                      "coronal": {JobState.SKIPPED}, "dose": {JobState.SKIPPED}}
    assert {p for (s, p) in jobs if s == uids["thin"]} == {"liver", "spleen"}
    reasons = {k: next(j.reason for (s, _), j in jobs.items() if s == uid) for k, uid in uids.items()}
    assert "localizer" in reasons["localizer"] and "secondary capture" in reasons["dose"]
    assert "coronal, not axial" in reasons["coronal"] and "is preferred" in reasons["thick"]
    assert "selected: axial" in reasons["thin"]
    thin_jobs = [j for (s, _), j in jobs.items() if s == uids["thin"]]
    assert len({j.options["shared_run"] for j in thin_jobs}) == 1  # one model run for both profiles


# -- the receiver records the release ------------------------------------------------------


@pytest.mark.peer
def test_the_receiver_records_a_release_and_not_an_abort(tmp_path: Path) -> None:
    """An association ended by A-RELEASE marks its series released; one ended by A-ABORT (storescu --abort) does not."""
    from segnode.node.events import AssociationReleased, Event
    from segnode.node.service import Service

    from tests.peers import store_statuses, storescu, wait_until

    config = NodeConfig(port=0, state_dir=tmp_path / "state", completion={"quiet_period_s": 3600},
                        limits={"min_free_disk_mb": 1},
                        allowed_senders=[{"ae_title": "SCANNER", "host": "127.0.0.1"}])
    service = Service(config)
    events: list[Event] = []
    service.listeners.append(events.append)
    port = service.start()
    try:
        files = sorted(THORAX.glob("*.dcm"))
        assert store_statuses(storescu(port, files[:3], extra=["--abort"]).stderr) == ["Success"] * 3
        uid = str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
        assert service.index.series(uid).released_at is None  # type: ignore[union-attr]
        assert store_statuses(storescu(port, files[3:6]).stderr) == ["Success"] * 3
        wait_until(lambda: service.index.series(uid).released_at,  # type: ignore[union-attr]
                   10, "the release to be recorded")
        assert AssociationReleased((uid,)) in events
    finally:
        service.stop()


def test_each_instance_header_is_read_once_from_completion_to_routing(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The first instance is read whole once, for the facts and the rules; every other one once, for the facts."""
    import segnode.node.completion as completion
    import segnode.node.sweep as sweep_module

    reads: dict[str, int] = {}

    def counting(path: Path, **kwargs: object):  # type: ignore[no-untyped-def]
        reads[Path(path).name] = reads.get(Path(path).name, 0) + 1
        return dcmread(path, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(completion, "dcmread", counting)
    monkeypatch.setattr(sweep_module, "dcmread", counting)
    clock = Clock()
    sweep, index, spool = _sweep(tmp_path, clock)
    uid = _receive(index, spool, THORAX)
    index.mark_released([uid])
    clock.now += 2.0
    assert sweep.sweep()
    assert index.jobs()[0].state is JobState.COMPLETE
    assert len(reads) == 164 and set(reads.values()) == {1}, sorted(reads.items(), key=lambda kv: -kv[1])[:3]
