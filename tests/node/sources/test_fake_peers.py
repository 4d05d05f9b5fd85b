"""The DIMSE source's bounds against scripted peers (pynetdicom SCPs): what Orthanc will not do on request.

A C-FIND answering thousands of matches, a C-MOVE that never finishes, a
C-GET that stalls after some instances, and one that sends an instance of a
series nobody asked for.
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import (
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from segnode.node.config import NodeConfig
from segnode.node.config.sources import SourceConfig
from segnode.node.sources.dimse import DimseSource
from segnode.node.sources.fetch import Fetcher
from segnode.node.sources.record import RetrievalLog
from segnode.node.sources.source import SeriesMatch, SourceError, StudyQuery
from segnode.storage.index import JobState

from tests.node.sources.helpers import Study, store_path, write_study
from tests.peers import free_port
from tests.tls_pki import make_pki


@dataclass
class Script:
    """What the fake PACS does, and what it saw."""

    matches: int = 0  # C-FIND: this many pending answers
    send: list[Dataset] = field(default_factory=list)  # C-GET: these instances, then...
    stall: bool = False  # ...never the final response (C-MOVE, C-GET)
    release: threading.Event = field(default_factory=threading.Event)
    stopped: threading.Event = field(default_factory=threading.Event)  # the peer saw a C-CANCEL or an abort

    def find(self, event: Event) -> Iterator[tuple[int, Dataset | None]]:
        for n in range(self.matches):
            if event.is_cancelled:
                self.stopped.set()
                yield 0xFE00, None
                return
            answer = Dataset()
            answer.QueryRetrieveLevel = "STUDY"
            answer.StudyInstanceUID = f"1.2.3.{n + 1}"
            yield 0xFF00, answer

    def move(self, event: Event) -> Iterator[object]:
        self.release.wait(30)  # stalled: not even the destination looked up, no response
        self.stopped.set()
        yield 0xA801, None

    def get(self, event: Event) -> Iterator[object]:
        yield len(self.send) + (1 if self.stall else 0)
        for ds in self.send:
            yield 0xFF00, ds
        if self.stall:
            self.release.wait(30)
            self.stopped.set()


@pytest.fixture
def fake_pacs() -> Iterator[tuple[int, Script]]:
    script = Script()
    ae = AE(ae_title="FAKEPACS")
    for model in (StudyRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelMove,
                  StudyRootQueryRetrieveInformationModelGet):
        ae.add_supported_context(model)
    ae.add_supported_context(CTImageStorage, scu_role=True, scp_role=True)
    port = free_port()
    handlers = [(evt.EVT_C_FIND, script.find), (evt.EVT_C_MOVE, script.move), (evt.EVT_C_GET, script.get),
                (evt.EVT_ABORTED, lambda event: script.stopped.set())]
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)
    try:
        yield port, script
    finally:
        script.release.set()
        server.shutdown()


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Study:
    return write_study(tmp_path_factory.mktemp("study"), "ACC-F", slices=4)


def source(port: int, store: object = None, **overrides: object) -> DimseSource:
    settings = SourceConfig.model_validate({"name": "fake", "ae_title": "FAKEPACS", "host": "127.0.0.1",
                                            "port": port, "query_timeout_s": 10, "idle_timeout_s": 10, **overrides})
    return DimseSource(settings, node_ae="SEGNODE", store=store)  # type: ignore[arg-type]


def instances(study: Study) -> list[Dataset]:
    return [dcmread(p) for p in sorted(study.folder.glob("*.dcm"))]


def test_thousands_of_matches_are_cancelled_at_the_bound(fake_pacs: tuple[int, Script]) -> None:
    port, script = fake_pacs
    script.matches = 5000
    with pytest.raises(SourceError, match="returned more than 100 matches; cancelled at the bound"):
        source(port, max_results=100).find_studies(StudyQuery(patient_id="P"))
    assert script.stopped.wait(10), "the peer saw neither a C-CANCEL nor an abort"


def test_a_stalled_move_is_cancelled_at_the_retrieve_deadline(fake_pacs: tuple[int, Script]) -> None:
    port, _ = fake_pacs
    with pytest.raises(SourceError, match=r"ran past 0.5 s \(sources\[\].retrieve_timeout_s\); cancelled"):
        source(port, retrieve_timeout_s=0.5, idle_timeout_s=2).retrieve_series("1.2.3", "1.2.3.4")


def test_a_silent_peer_is_aborted_after_the_idle_timeout(fake_pacs: tuple[int, Script]) -> None:
    port, _ = fake_pacs
    with pytest.raises(SourceError, match=r"no response during the retrieve .* for 0.5 s"):
        source(port, idle_timeout_s=0.5).retrieve_series("1.2.3", "1.2.3.4")


def test_a_get_that_stalls_part_way_leaves_no_job_waiting(fake_pacs: tuple[int, Script], study: Study,
                                                          tmp_path: Path) -> None:
    """Two of four instances arrive, then nothing: the error is logged and the partial series' job settled."""
    port, script = fake_pacs
    script.send, script.stall = instances(study)[:2], True
    config = NodeConfig(state_dir=tmp_path / "state")
    store, index = store_path(config)
    log = RetrievalLog(tmp_path / "retrievals.sqlite")
    try:
        fetcher = Fetcher(source(port, store, retrieve="get", idle_timeout_s=1.0), method="get", log=log,
                          index=index, by="tester")
        outcome = fetcher.retrieve(SeriesMatch(study.study_uid, study.series_uid, "CT"))
        assert not outcome.ok and outcome.error is not None and "no response during the retrieve" in outcome.error
        [job] = index.jobs()
        assert job.state is JobState.NOT_ROUTED
        assert job.reason is not None and job.reason.startswith("retrieve failed, partial series not segmented")
        info = index.series(study.series_uid)
        assert info is not None and info.instance_count == 2 and info.released_at is None
        [entry] = log.of_series(study.series_uid)
        assert (entry.source, entry.method, entry.by, entry.completed) == ("fake", "get", "tester", 0)
        assert entry.error == outcome.error
    finally:
        index.close()


def test_a_get_refuses_an_instance_of_a_series_not_asked_for(fake_pacs: tuple[int, Script], study: Study,
                                                            tmp_path: Path) -> None:
    port, script = fake_pacs
    stray = instances(study)[3]
    stray.SeriesInstanceUID = generate_uid()
    script.send = [*instances(study)[:3], stray]
    config = NodeConfig(state_dir=tmp_path / "state")
    store, index = store_path(config)
    try:
        result = source(port, store, retrieve="get").retrieve_series(study.study_uid, study.series_uid)
        assert (result.completed, result.failed, result.refused) == (3, 1, 1)
        assert result.ok  # the only failure is our refusal
        assert index.series(stray.SeriesInstanceUID) is None
        info = index.series(study.series_uid)
        assert info is not None and info.instance_count == 3
    finally:
        index.close()


def test_a_tls_source_is_queried_over_tls_with_our_certificate(tmp_path: Path) -> None:
    """``tls:`` as a destination's: the PACS's CA trusted, host name checked, our client certificate shown."""
    pki = make_pki(tmp_path / "pki")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca))
    server.verify_mode = ssl.CERT_REQUIRED
    server.load_cert_chain(str(pki.cert("server")), str(pki.key("server")))
    script = Script(matches=2)
    ae = AE(ae_title="FAKEPACS")
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    port = free_port()
    scp = ae.start_server(("127.0.0.1", port), block=False, ssl_context=server,
                          evt_handlers=[(evt.EVT_C_FIND, script.find)])
    try:
        tls = {"ca": str(pki.ca), "cert": str(pki.cert("client")), "key": str(pki.key("client"))}
        assert len(source(port, tls=tls).find_studies(StudyQuery(patient_id="P"))) == 2
        with pytest.raises(SourceError, match=r"source fake \(FAKEPACS@127.0.0.1:\d+\) could not be reached"):
            source(port, tls={"ca": str(pki.ca)}).find_studies(StudyQuery(patient_id="P"))  # no client certificate
    finally:
        scp.shutdown()
