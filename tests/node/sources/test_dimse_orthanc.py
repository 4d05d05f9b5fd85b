"""The DIMSE source against Orthanc as the PACS, cross-checked with DCMTK ``findscu`` and ``movescu``.

One Orthanc for the module, holding three studies of one patient (accessions
ACC-1..ACC-3) and knowing the AE title SEGNODE at a port kept for the node.
"""

from __future__ import annotations

import re
from datetime import date, timedelta
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from segnode.node.cli.main import main
from segnode.node.config import NodeConfig
from segnode.node.config.sources import SourceConfig
from segnode.node.sources.dimse import DimseSource
from segnode.node.sources.fetch import Fetcher
from segnode.node.sources.record import RetrievalLog
from segnode.node.sources.source import NoMatchError, SeriesMatch, SourceError, StudyQuery
from segnode.storage.index import JobState

from tests.node.sources.helpers import Study, store_path, upload, write_study
from tests.peers import DCMTK_ENV, OrthancPeer, free_port, orthanc, storescp

pytestmark = [pytest.mark.peer]


@pytest.fixture(scope="module")
def node_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> list[Study]:
    root = tmp_path_factory.mktemp("studies")
    return [write_study(root / f"acc{n}", f"ACC-{n}", slices=40, seed=n) for n in (1, 2, 3)]


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory, node_port: int, studies: list[Study]) -> Iterator[OrthancPeer]:
    with orthanc(tmp_path_factory.mktemp("orthanc"), node_port=node_port) as peer:
        for study in studies:
            upload(peer, study)
        yield peer


def settings(pacs: OrthancPeer, **overrides: object) -> SourceConfig:
    values: dict[str, object] = {"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1",
                                 "port": pacs.dicom_port, "query_timeout_s": 10, "idle_timeout_s": 10}
    return SourceConfig.model_validate({**values, **overrides})


def findscu_studies(pacs: OrthancPeer, **keys: str) -> list[str]:
    """The Study Instance UIDs DCMTK ``findscu`` gets for ``keys`` at STUDY level."""
    args = [a for k, v in {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "", **keys}.items()
            for a in ("-k", f"{k}={v}")]
    done = subprocess.run(["findscu", "-v", "-S", "-aet", "SEGNODE", "-aec", pacs.ae_title, *args, "127.0.0.1",
                           str(pacs.dicom_port)], capture_output=True, text=True, env=DCMTK_ENV, timeout=30)
    assert done.returncode == 0, done.stderr
    # an odd-length UID is printed with its NUL padding
    return re.findall(r"\(0020,000d\) UI \[([0-9.]+)\x00?\]", done.stdout + done.stderr)


def test_find_by_accession_answers_what_findscu_gets(pacs: OrthancPeer, studies: list[Study]) -> None:
    [match] = DimseSource(settings(pacs), node_ae="SEGNODE").find_studies(StudyQuery(accession="ACC-2"))
    assert match.study_uid == studies[1].study_uid
    assert match.accession == "ACC-2"
    assert findscu_studies(pacs, AccessionNumber="ACC-2") == [match.study_uid]


def test_since_bounds_the_study_date(pacs: OrthancPeer, studies: list[Study]) -> None:
    """The phantoms are dated today: from today on they match, from tomorrow on none does."""
    today = date.today()
    source = DimseSource(settings(pacs), node_ae="SEGNODE")
    assert len(source.find_studies(StudyQuery(patient_id="SRC-PAT-1", since=today))) == 3
    with pytest.raises(NoMatchError):
        source.find_studies(StudyQuery(patient_id="SRC-PAT-1", since=today + timedelta(days=1)))
    with pytest.raises(NoMatchError):  # priors: before today
        source.find_studies(StudyQuery(patient_id="SRC-PAT-1", before=today))
    assert len(findscu_studies(pacs, PatientID="SRC-PAT-1", StudyDate=f"{today:%Y%m%d}-")) == 3


def test_fetch_list_shows_the_matches_without_retrieving(pacs: OrthancPeer, studies: list[Study], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump({"state_dir": str(tmp_path / "state"), "sources": [
        {"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.dicom_port}]}))
    assert main(["fetch", "--config", str(config), "--from", "pacs", "--accession", "ACC-3", "--list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"study {studies[2].study_uid} ") and "accession ACC-3" in out[0]
    assert out[1] == f"  series {studies[2].series_uid} CT #1 40 instance(s)"
    assert not (tmp_path / "state" / "index.sqlite").exists()  # nothing retrieved, nothing opened


def test_find_series_of_a_study(pacs: OrthancPeer, studies: list[Study]) -> None:
    [series] = DimseSource(settings(pacs), node_ae="SEGNODE").find_series(studies[0].study_uid)
    assert (series.series_uid, series.modality, series.instance_count) == (studies[0].series_uid, "CT", 40)


def test_unknown_accession_is_a_clear_no_match(pacs: OrthancPeer) -> None:
    with pytest.raises(NoMatchError, match="no study matches accession NOPE-404"):
        DimseSource(settings(pacs), node_ae="SEGNODE").find_studies(StudyQuery(accession="NOPE-404"))
    assert findscu_studies(pacs, AccessionNumber="NOPE-404") == []


def test_a_query_over_max_results_is_cancelled_at_the_bound(pacs: OrthancPeer) -> None:
    source = DimseSource(settings(pacs, max_results=2), node_ae="SEGNODE")
    with pytest.raises(SourceError, match="returned more than 2 matches; cancelled at the bound"):
        source.find_studies(StudyQuery(patient_id="SRC-PAT-1"))
    assert len(findscu_studies(pacs, PatientID="SRC-PAT-1")) == 3  # what a bound of 3 would have taken


def test_c_move_sends_the_series_as_movescu_does(pacs: OrthancPeer, studies: list[Study], node_port: int,
                                                 tmp_path: Path) -> None:
    """Our C-MOVE and DCMTK movescu, each into a storescp standing in for the node: the same instances."""
    study = studies[0]
    with storescp(tmp_path / "ours", port=node_port, ae_title="SEGNODE") as scp:
        result = DimseSource(settings(pacs), node_ae="SEGNODE").retrieve_series(study.study_uid, study.series_uid)
        ours = {p.name for p in scp.received()}
    with storescp(tmp_path / "dcmtk", port=node_port, ae_title="SEGNODE") as scp:
        done = subprocess.run(["movescu", "-S", "-aet", "SEGNODE", "-aec", pacs.ae_title, "-aem", "SEGNODE",
                               "-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={study.study_uid}",
                               "-k", f"SeriesInstanceUID={study.series_uid}", "127.0.0.1", str(pacs.dicom_port)],
                              capture_output=True, text=True, env=DCMTK_ENV, timeout=60)
        assert done.returncode == 0, done.stderr
        theirs = {p.name for p in scp.received()}
    assert (result.method, result.completed, result.failed) == ("move", study.count, 0)
    assert len(ours) == study.count and ours == theirs


def test_a_pacs_that_refuses_the_move_destination_is_a_clear_error(pacs: OrthancPeer, studies: list[Study]) -> None:
    source = DimseSource(settings(pacs, calling_ae_title="SEGNODE"), node_ae="STRANGER")
    with pytest.raises(SourceError, match="refused to move series .* to 'STRANGER' .*does the PACS know the node"):
        source.retrieve_series(studies[0].study_uid, studies[0].series_uid)


def test_c_get_stores_the_series_through_the_store_path(pacs: OrthancPeer, studies: list[Study],
                                                        tmp_path: Path) -> None:
    study = studies[2]
    config = NodeConfig(state_dir=tmp_path / "state")
    store, index = store_path(config)
    try:
        source = DimseSource(settings(pacs, retrieve="get"), node_ae="SEGNODE", store=store)
        result = source.retrieve_series(study.study_uid, study.series_uid)
        assert (result.method, result.completed, result.failed, result.refused) == ("get", study.count, 0, 0)
        info = index.series(study.series_uid)
        assert info is not None and info.instance_count == study.count and info.calling_ae == pacs.ae_title
        assert info.released_at is not None  # completion on evidence, as after a push
        [job] = index.jobs(JobState.RECEIVED)
        assert job.series_uid == study.series_uid
        # fetched again once the node has judged it: duplicates kept, no new job, the report says so
        assert index.transition(job.job_id, JobState.SKIPPED, "judged")
        fetcher = Fetcher(source, method="get", log=RetrievalLog(tmp_path / "log.sqlite"), index=index, by="t")
        again = fetcher.retrieve(SeriesMatch(study.study_uid, study.series_uid, "CT"))
        assert again.ok and (again.note or "").startswith("already held by the node: nothing new to route")
        assert [j.job_id for j in index.jobs()] == [job.job_id]
    finally:
        index.close()
