"""The DICOMweb source (QIDO-RS, WADO-RS through dicomweb-client) against Orthanc's DICOMweb plugin."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from segnode.node.config import NodeConfig
from segnode.node.config.sources import SourceConfig
from segnode.node.sources.source import NoMatchError, SourceError, StudyQuery
from segnode.node.sources.web import WebSource
from segnode.storage.index import JobState

from tests.node.sources.helpers import Study, store_path, upload, write_study
from tests.peers import ORTHANC_DICOMWEB_PLUGIN, OrthancPeer, orthanc

pytestmark = [pytest.mark.peer,
              pytest.mark.skipif(not ORTHANC_DICOMWEB_PLUGIN.exists(), reason="Orthanc DICOMweb plugin missing")]


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> list[Study]:
    root = tmp_path_factory.mktemp("studies")
    return [write_study(root / f"w{n}", f"WEB-{n}", patient_id="WEB-PAT", slices=12, seed=n) for n in (1, 2)]


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory, studies: list[Study]) -> Iterator[OrthancPeer]:
    with orthanc(tmp_path_factory.mktemp("orthanc"), dicomweb=True) as peer:
        for study in studies:
            upload(peer, study)
        yield peer


def source(pacs: OrthancPeer, store: object = None, **overrides: object) -> WebSource:
    settings = SourceConfig.model_validate({"name": "web", "kind": "dicomweb", "url": pacs.dicomweb_url,
                                            **overrides})
    return WebSource(settings, store=store)  # type: ignore[arg-type]


def test_qido_finds_the_study_and_its_series(pacs: OrthancPeer, studies: list[Study]) -> None:
    [match] = source(pacs).find_studies(StudyQuery(accession="WEB-2"))
    assert (match.study_uid, match.accession) == (studies[1].study_uid, "WEB-2")
    [series] = source(pacs).find_series(match.study_uid)
    assert (series.series_uid, series.modality, series.instance_count) == (studies[1].series_uid, "CT", 12)


def test_unknown_accession_and_the_bound(pacs: OrthancPeer) -> None:
    with pytest.raises(NoMatchError, match="no study matches accession WEB-404"):
        source(pacs).find_studies(StudyQuery(accession="WEB-404"))
    with pytest.raises(SourceError, match="returned more than 1 matches; stopped at the bound"):
        source(pacs, max_results=1).find_studies(StudyQuery(patient_id="WEB-PAT"))
    assert len(source(pacs, max_results=2).find_studies(StudyQuery(patient_id="WEB-PAT"))) == 2


def test_wado_retrieves_the_series_through_the_store_path(pacs: OrthancPeer, studies: list[Study],
                                                          tmp_path: Path) -> None:
    study = studies[0]
    store, index = store_path(NodeConfig(state_dir=tmp_path / "state"))
    try:
        result = source(pacs, store).retrieve_series(study.study_uid, study.series_uid)
        assert (result.method, result.completed, result.failed, result.refused) == ("wado", study.count, 0, 0)
        info = index.series(study.series_uid)
        assert info is not None and info.instance_count == study.count and info.calling_ae == "web"
        assert info.released_at is not None
        [job] = index.jobs(JobState.RECEIVED)
        assert job.series_uid == study.series_uid
    finally:
        index.close()


def test_an_unreachable_service_is_a_clear_error(tmp_path: Path) -> None:
    settings = SourceConfig(name="down", kind="dicomweb", url="http://127.0.0.1:9/dicom-web", retries=0,
                            connect_timeout_s=2)
    with pytest.raises(SourceError, match="source down: the query for accession X failed: ConnectionError"):
        WebSource(settings).find_studies(StudyQuery(accession="X"))
