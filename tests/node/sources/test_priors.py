"""Priors: which earlier studies, which series, whose result (node/sources/priors.py), with a scripted source."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import pytest
from segnode.node.config import NodeConfig
from segnode.node.sources.priors import (
    CurrentStudy,
    earlier_result,
    find_prior_studies,
    pick_series,
    prior_options,
)
from segnode.node.sources.source import RetrieveResult, SeriesMatch, SourceError, StudyMatch, StudyQuery
from segnode.node.writers.sr_priors import PriorResult
from segnode.routing.rules import Priors, Select
from segnode.storage.index import Index, JobState
from segnode.storage.spool import Spool

from tests.node.sending.test_senders import sending_job

NOW = CurrentStudy("PAT-1", "1.2.1", date(2024, 2, 5), "CT")


@dataclass
class Scripted:
    name: str = "pacs"
    studies: list[StudyMatch] = field(default_factory=list)
    queries: list[StudyQuery] = field(default_factory=list)

    def find_studies(self, query: StudyQuery) -> list[StudyMatch]:
        self.queries.append(query)
        return self.studies

    def find_series(self, study_uid: str) -> list[SeriesMatch]:
        return []

    def retrieve_series(self, study_uid: str, series_uid: str) -> RetrieveResult:
        raise SourceError("not in this test")


def test_the_newest_earlier_studies_of_the_modality_within_the_age_are_asked_for_and_kept() -> None:
    source = Scripted(studies=[
        StudyMatch("1.2.1", study_date=date(2024, 2, 5), modalities=("CT",)),  # the current study itself
        StudyMatch("1.2.2", study_date=date(2022, 3, 1), modalities=("CT",)),
        StudyMatch("1.2.3", study_date=date(2023, 6, 1), modalities=("CT", "SR")),
        StudyMatch("1.2.4", study_date=date(2023, 9, 1), modalities=("MR",)),  # another modality
        StudyMatch("1.2.5", study_date=None, modalities=("CT",)),  # undated: no interval to give
    ])
    found = find_prior_studies(source, NOW, Priors(source="pacs", count=2, max_age_days=1095))
    assert [s.study_uid for s in found] == ["1.2.3", "1.2.2"]
    [query] = source.queries
    assert (query.patient_id, query.modality) == ("PAT-1", "CT")
    assert (query.since, query.before) == (date(2021, 2, 5), date(2024, 2, 5))
    assert [s.study_uid for s in find_prior_studies(source, NOW, Priors(source="pacs"))] == ["1.2.3"]


def test_the_series_is_picked_by_the_routes_select_at_query_level() -> None:
    series = [SeriesMatch("1", "1.1", "CT", description="SCOUT", instance_count=2),
              SeriesMatch("1", "1.2", "CT", description="Thorax 1.0 mm", instance_count=300),
              SeriesMatch("1", "1.3", "CT", description="Thorax 5 mm", instance_count=60),
              SeriesMatch("1", "1.4", "SEG", description="lungs", instance_count=1),
              SeriesMatch("1", "1.5", "SR", instance_count=1)]
    assert pick_series(series, "CT", None).series_uid == "1.2"  # type: ignore[union-attr]
    five = Select.model_validate({"description": "5 mm"})
    assert pick_series(series, "CT", five).series_uid == "1.3"  # type: ignore[union-attr]
    assert pick_series(series, "CT", Select.model_validate({"min_slices": 500})) is None
    assert pick_series(series[3:], "CT", None) is None  # only our own outputs


def result_job(index: Index, folder: Path, model_version: str) -> int:
    """A done job with a result folder holding a SEG and a summary (its statistics)."""
    job_id = sending_job(index, ("pacs",), ("5.1",))
    folder.mkdir(parents=True)
    (folder / "5.1.dcm").write_bytes(b"SEG")
    (folder / "summary_lungs_1.2.3.json").write_text(json.dumps({"segments": [
        {"tissue": "lung_left", "segment_number": 1, "volume_ml": 1200.5, "voxels": 10, "empty": False}]}))
    with sqlite3.connect(index.path) as db:  # what a finished job has
        db.execute("UPDATE jobs SET result_dir = ?, model_version = ?, profile = 'lungs', state = ? WHERE job_id = ?",
                   (str(folder), model_version, JobState.DONE.value, job_id))
    return job_id


def test_the_nodes_own_earlier_result_is_reused_with_its_model_version(tmp_path: Path) -> None:
    index = Index(tmp_path / "index.sqlite")
    job_id = result_job(index, tmp_path / "job-1", "v2")
    found = earlier_result(index, "1.2.3", "lungs")
    assert found == {"seg_path": str(tmp_path / "job-1" / "5.1.dcm"),
                     "summary_path": str(tmp_path / "job-1" / "summary_lungs_1.2.3.json"),
                     "model_version": "v2", "job_id": job_id}
    assert earlier_result(index, "1.2.3", "liver") is None  # another profile: not comparable
    assert earlier_result(index, "9.9", "lungs") is None
    prior = PriorResult.from_summary(Path(found["seg_path"]), Path(found["summary_path"]), found["model_version"])
    assert prior.model_version == "v2" and prior.statistics[0]["volume_ml"] == 1200.5


def test_a_source_that_cannot_answer_leaves_the_report_without_priors(tmp_path: Path) -> None:
    config = NodeConfig(state_dir=tmp_path / "state", sources=[
        {"name": "pacs", "kind": "dimse", "ae_title": "PACS", "host": "127.0.0.1", "port": 9, "connect_timeout_s": 1}])
    index, spool = Index(config.index_path), Spool(config.spool_dir)
    job_id = sending_job(index, ("pacs",), ("5.1",))
    job = index.job(job_id)
    assert job is not None
    assert prior_options(config, index, spool, job) == {}  # no priors: on the route: nothing asked
    with_priors = type(job)(**{**job.__dict__, "options": {"priors": {"source": "pacs"}}})
    answer = prior_options(config, index, spool, with_priors)  # the spool has no header for it
    assert answer == {"priors_found": [], "priors_note": "no patient ID, study date or modality in the series"}


@pytest.mark.parametrize("raw", [{"source": "pacs", "count": 0}, {"source": "pacs", "max_age_days": 0},
                                 {"count": 1}, {"source": "pacs", "extra": 1}])
def test_the_priors_option_is_validated(raw: dict) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValueError):
        Priors.model_validate(raw)
