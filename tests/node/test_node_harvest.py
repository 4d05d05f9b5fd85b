"""A route with ``harvest:`` puts a de-identified copy of the job into the dataset store.

The job's folder (``job.json``, ``result.json``, ``worker.log``) and the node's
logs never name the case ID, which would link it to the original series UID.
"""

from __future__ import annotations

import json
import secrets
import urllib.request
from pathlib import Path

import pytest
import yaml
from segnode.storage.dataset import DatasetStore
from segnode.storage.index import Index, JobState

from tests.paths import DATA
from tests.peers import (
    NodeProcess,
    node,
    store_statuses,
    storescu,
    wait_until,
    write_node_config,
)

pytestmark = pytest.mark.peer  # DCMTK storescu sends the series

THORAX = DATA / "thorax_cta"
PHI = (b"Synthetic^Clara", b"SYN-TS-CTA-002", b"19490302", b"SYNACC22061102")


def _config(tmp_path: Path, secret_file: Path | None, store: Path | None = None) -> Path:
    """A node harvesting every series; the store is ``store`` (default tmp/store), None: left to the environment."""
    routes = tmp_path / "routes.yaml"
    routes.write_text(yaml.safe_dump({"rules": [
        {"name": "chest-to-dataset", "fallback": True, "action": {"profile": "lungs", "harvest": "lungs_v1"}}]}))
    extra: dict[str, object] = {"deid_secret_file": str(secret_file)} if secret_file else {}
    if store is not None:
        extra["dataset_store"] = str(store)
    return write_node_config(tmp_path / "node.yaml", routes=str(routes), **extra)


def _done_job(tmp_path: Path) -> dict:
    index = Index(tmp_path / "state" / "index.sqlite")
    job = wait_until(lambda: next((j for j in index.jobs() if j.state is JobState.DONE), None), 180, "job done")
    assert job.harvest == "lungs_v1"
    return json.loads(next((tmp_path / "state" / "results").rglob("result.json")).read_text())


def test_harvested_case_is_in_the_store_without_phi(tmp_path: Path) -> None:
    secret = tmp_path / "secret.key"
    secret.write_bytes(secrets.token_bytes(32))
    with node(_config(tmp_path, secret, tmp_path / "store")) as n:
        assert set(store_statuses(storescu(n.port, [THORAX]).stderr)) == {"Success"}
        result = _done_job(tmp_path)
    assert result["harvest"] == {"dataset": "lungs_v1", "status": "harvested"}
    assert result["objects"][0]["path"] == Path(result["objects"][0]["path"]).name  # relative to the job folder
    store = DatasetStore.open_read_only(tmp_path / "store")
    cases = store.cases("lungs_v1")
    assert len(cases) == 1
    case_id, case = next(iter(cases.items()))
    assert case.profile == "lungs" and case.backend == "hu_based" and case.rule == "chest-to-dataset"
    for file in (tmp_path / "store").rglob("*"):
        if file.is_file():
            data = file.read_bytes()
            assert not [token for token in PHI if token in data], file
    # the state and log folders hold the original series UID: never next to the case ID
    outside = [f for f in tmp_path.rglob("*") if f.is_file() and not f.is_relative_to(tmp_path / "store")]
    assert any(f.name == "worker.log" for f in outside) and any(f.name == "job.json" for f in outside)
    assert not [f.name for f in outside if case_id.encode() in f.read_bytes()]


def test_without_a_secret_the_seg_is_still_made_and_the_reason_recorded(tmp_path: Path) -> None:
    with node(_config(tmp_path, None, tmp_path / "store")) as n:
        assert set(store_statuses(storescu(n.port, [THORAX]).stderr)) == {"Success"}
        result = _done_job(tmp_path)
    assert result["objects"][0]["kind"] == "seg" and result["harvest"]["status"] == "not harvested"
    assert "no de-identification secret" in result["harvest"]["reason"]


def test_the_store_from_the_environment_is_where_harvest_writes_and_what_the_api_lists(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``$SEGNODE_DATASET_STORE`` with no ``dataset_store`` in node.yaml: harvest and /api/v1/datasets agree."""
    secret = tmp_path / "secret.key"
    secret.write_bytes(secrets.token_bytes(32))
    env_store = tmp_path / "env-store"
    monkeypatch.setenv("SEGNODE_DATASET_STORE", str(env_store))  # the node process inherits it
    with node(_config(tmp_path, secret, store=None)) as n:
        assert set(store_statuses(storescu(n.port, [THORAX]).stderr)) == {"Success"}
        result = _done_job(tmp_path)
        listed = json.loads(urllib.request.urlopen(f"{_ops_url(n)}/api/v1/datasets", timeout=10).read())
    assert result["harvest"] == {"dataset": "lungs_v1", "status": "harvested"}
    assert listed["store"] == str(env_store) and listed["exists"]
    assert [(d["name"], d["cases"]) for d in listed["datasets"]] == [("lungs_v1", 1)]
    assert len(DatasetStore.open_read_only(env_store).cases("lungs_v1")) == 1  # where harvest wrote
    assert not (tmp_path / "state" / "datasets").exists()  # not in the default place


def _ops_url(n: NodeProcess) -> str:
    """The ops API's URL from the node's second line ("segnode: ops HTTP API on URL")."""
    assert n.proc.stdout is not None
    line = n.proc.stdout.readline()
    assert "ops HTTP API on" in line, line
    return line.rsplit(" ", 1)[1].strip()
