"""``segnode fetch`` beside a running node, Orthanc as the PACS: by accession → retrieved, routed, one SEG in Orthanc.

C-MOVE (the node's receiver stores what Orthanc sends to its AE title) and
C-GET (``segnode fetch`` stores through the node's store path into the same
spool and index); either way the running node's sweep routes the series.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from segnode.node.cli.main import main
from segnode.node.sources.record import RetrievalLog
from segnode.storage.index import Index, JobState

from tests.node.sources.helpers import upload, write_study
from tests.peers import free_port, node, orthanc, wait_until, write_node_config

pytestmark = [pytest.mark.peer, pytest.mark.slow]


def fetch_config(tmp_path: Path, port: int, dicom_port: int, method: str) -> Path:
    routes = tmp_path / "routes.yaml"
    routes.write_text(yaml.safe_dump({"rules": [
        {"name": "everything", "fallback": True, "action": {"profile": "lungs", "destinations": ["pacs"]}}]}))
    pacs = {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": dicom_port}
    return write_node_config(tmp_path / "node.yaml", port=port, routes=str(routes),
                             destinations=[{"name": "pacs", **pacs}],
                             sources=[{"name": "pacs", "retrieve": method, "idle_timeout_s": 30, **pacs}])


@pytest.mark.parametrize("method", ["move", "get"])
def test_fetch_by_accession_one_seg_arrives_in_orthanc(tmp_path: Path, method: str,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    study = write_study(tmp_path / "study", "ACC-E2E", slices=60)
    other = write_study(tmp_path / "other", "ACC-OTHER", slices=10, seed=3)
    port = free_port()
    with orthanc(tmp_path / "orthanc", node_port=port) as pacs:
        upload(pacs, study)
        upload(pacs, other)
        config = fetch_config(tmp_path, port, pacs.dicom_port, method)
        with node(config) as n:
            assert main(["fetch", "--config", str(config), "--from", "pacs", "--accession", "ACC-E2E",
                         "--by", "tester"]) == 0
            out = capsys.readouterr().out
            assert f"series {study.series_uid} (CT): retrieved, {study.count} instance(s)" in out
            index = Index(n.state_dir / "index.sqlite")
            job = wait_until(lambda: next((j for j in index.jobs() if j.state in {
                JobState.DONE, JobState.FAILED, JobState.DEAD_LETTER, JobState.NOT_ROUTED}), None), 180, "a job")
            assert job.state is JobState.DONE, job.reason
            assert [j.series_uid for j in index.jobs()] == [study.series_uid]  # the other study stays on the PACS
            info = index.series(study.series_uid)
            assert info is not None and info.instance_count == study.count and info.calling_ae == "ORTHANC"
            index.close()
        [entry] = RetrievalLog(n.state_dir / "retrievals.sqlite").of_series(study.series_uid)
        assert (entry.source, entry.method, entry.by, entry.completed, entry.error) == (
            "pacs", method, "tester", study.count, None)
        [seg] = pacs.series_by_modality("SEG")
        assert pacs.get(f"/studies/{seg['ParentStudy']}")["MainDicomTags"]["StudyInstanceUID"] == study.study_uid


def test_fetch_of_an_unknown_accession_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with orthanc(tmp_path / "orthanc") as pacs:
        config = fetch_config(tmp_path, free_port(), pacs.dicom_port, "move")
        code = main(["fetch", "--config", str(config), "--from", "pacs", "--accession", "NOPE-1"])
    assert code == 3
    assert "segnode: error: source pacs: no study matches accession NOPE-1" in capsys.readouterr().err
    assert not (tmp_path / "state" / "index.sqlite").exists() or Index(tmp_path / "state" / "index.sqlite").jobs() == []
