"""Which finished jobs ``segnode reprocess`` picks, and the job it adds for each (a scripted index)."""

from __future__ import annotations

from pathlib import Path

from segnode.node.sources.reprocess import Model, candidates, reprocess
from segnode.storage.index import JobState

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
    # a series purged from the spool is left as it is (fetching it again is not done)
    s.index.mark_purged(old.series_uid)
    purged = reprocess(s.index, old, Model.parse("hu_based"), by="tester")
    assert purged.new_job is None and "no longer in the spool" in purged.note
