"""Which finished jobs ``segnode reprocess`` picks, and the job it adds for each (a scripted index)."""

from __future__ import annotations

from pathlib import Path

from segnode.node.sources.fetch import Fetcher
from segnode.node.sources.record import RetrievalLog
from segnode.node.sources.reprocess import Model, candidates, refetch, reprocess
from segnode.node.sources.source import RetrieveResult, SourceError
from segnode.storage.index import Index, InstanceRecord, JobState

from tests.ops_helpers import T0, scripted_index


def test_the_newest_done_job_per_series_since_the_day_of_the_rule(tmp_path: Path) -> None:
    s = scripted_index(tmp_path / "index.sqlite")
    done = s.jobs["done"]
    assert [j.job_id for j in candidates(s.index, since=T0 - 1, rule=None)] == [done]  # not failed, dead, open
    assert candidates(s.index, since=T0 - 1, rule="another-rule") == []
    assert candidates(s.index, since=s.clock.now + 1, rule=None) == []  # created before the day


def test_a_reprocessed_job_runs_the_new_model_and_supersedes_the_old(tmp_path: Path) -> None:
    s = scripted_index(tmp_path / "index.sqlite")
    old = s.index.existing_job(s.jobs["done"])
    out = reprocess(s.index, old, Model.parse("nnunet/2.1"), by="tester")
    assert out.new_job is not None
    new = s.index.existing_job(out.new_job)
    assert (new.state, new.series_uid, new.rule, new.profile, new.destinations) == (
        JobState.COMPLETE, old.series_uid, old.rule, old.profile, old.destinations)
    assert (new.backend, new.options["supersedes"], new.options["model"]) == ("nnunet", [old.job_id], "nnunet/2.1")
    assert "re-processed with model nnunet/2.1 by tester" in (new.reason or "")
    # a series purged from the spool is left as it is without a source to fetch it from
    s.index.mark_purged(old.series_uid)
    purged = reprocess(s.index, old, Model.parse("hu_based"), by="tester")
    assert purged.new_job is None and "no longer in the spool" in purged.note


class Redelivers:
    """A source whose retrieve stores the series' instances again through the index (as the store path would)."""

    name = "pacs"

    def __init__(self, index: Index, fail: bool = False) -> None:
        self.index, self.fail = index, fail
        self.asked: list[str] = []

    def retrieve_series(self, study_uid: str, series_uid: str) -> RetrieveResult:
        self.asked.append(series_uid)
        if self.fail:
            raise SourceError("source pacs: no answer")
        for n in (1, 2):
            self.index.record_instance(InstanceRecord(
                sop_uid=f"{series_uid}.{n}", series_uid=series_uid, study_uid=study_uid,
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax_uid="1.2.840.10008.1.2.1", modality="CT",
                path=f"{study_uid}/{series_uid}/{n}.dcm", size_bytes=10, calling_ae="PACS", called_ae="SEGNODE",
                sender_host="127.0.0.1"))
        return RetrieveResult(study_uid, series_uid, "move", completed=2, failed=0, warning=0, refused=0)


def test_a_purged_series_is_fetched_again_and_run_with_the_new_model(tmp_path: Path) -> None:
    s = scripted_index(tmp_path / "index.sqlite")
    old = s.index.existing_job(s.jobs["done"])
    s.index.mark_purged(old.series_uid)
    source = Redelivers(s.index)
    fetcher = Fetcher(source, method="move", log=RetrievalLog(tmp_path / "retrievals.sqlite"),  # type: ignore[arg-type]
                      index=s.index, by="tester")
    out = refetch(s.index, fetcher, old, Model.parse("nnunet/2.1"))
    assert source.asked == [old.series_uid] and out.new_job is not None, out.note
    new = s.index.existing_job(out.new_job)
    assert (new.state, new.rule, new.profile, new.backend, new.destinations) == (
        JobState.COMPLETE, old.rule, old.profile, "nnunet", old.destinations)
    assert (new.options["supersedes"], new.options["model"]) == ([old.job_id], "nnunet/2.1")
    info = s.index.series(old.series_uid)
    assert info is not None and info.purged_at is None  # back in the spool
    failing = Fetcher(Redelivers(s.index, fail=True), method="move",  # type: ignore[arg-type]
                      log=RetrievalLog(tmp_path / "retrievals.sqlite"), index=s.index, by="tester")
    s.index.mark_purged(old.series_uid)
    assert refetch(s.index, failing, old, Model.parse("hu_based")).note == "not fetched again: source pacs: no answer"


def test_of_two_done_jobs_of_a_series_and_profile_the_newer_is_picked(tmp_path: Path) -> None:
    s = scripted_index(tmp_path / "index.sqlite")
    first = s.index.job(s.jobs["done"])
    assert first is not None and first.profile is not None

    def finished(profile: str) -> int:
        job_id = s.index.add_complete_job(first, reason="again", rule=first.rule or "r", profile=profile,
                                          backend=None, destinations=())
        claimed = s.index.claim_next()
        assert claimed is not None and claimed.job_id == job_id
        s.index.mark_encoded(job_id, seg_path=None, seg_series_uid=None, seg_sop_uid=None, backend_used="b",
                             model_version="2")
        job = s.index.job(job_id)
        assert job is not None and job.state is JobState.DONE, job
        return job_id

    newer, other_profile = finished(first.profile), finished("a-profile-of-its-own")
    assert [j.job_id for j in candidates(s.index, since=T0 - 1, rule=None)] == [newer, other_profile]
