"""Prometheus metrics: real DCMTK traffic into the real SCP, parsed back with prometheus_client's parser."""

from __future__ import annotations

import json
import types

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmread
from segnode.node.config import AllowedSender, NodeConfig
from segnode.node.dicom_in.server import start_scp
from segnode.node.events import Delivered, Event, InstanceRefused
from segnode.node.ops.metrics import NodeMetrics
from segnode.node.ops.runner import Ops, audit_path
from segnode.node.status import Category, Refusal, Status, category, reason
from segnode.routing import RulesHolder
from segnode.storage.index import Index, JobState
from segnode.storage.spool import Spool

from tests.ops_helpers import http, scripted_index
from tests.paths import DATA
from tests.peers import store_statuses, storescu

CT_FILES = sorted((DATA / "liver_3slice").glob("0*.dcm"))


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, keyed by (name, sorted labels)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(parsed, name: str, **labels: str) -> float:
    return parsed.get((name, tuple(sorted(labels.items()))), 0.0)


def fake_service(config: NodeConfig, index: Index) -> types.SimpleNamespace:
    """What :class:`segnode.node.ops.runner.Ops` needs of a service, without the scheduler and workers."""
    return types.SimpleNamespace(config=config, index=index, rules=RulesHolder(None), scp=None, listeners=[], remote=None, dicomweb=None, review=None)


@pytest.fixture
def scp_node(tmp_path):
    config = NodeConfig(port=0, state_dir=tmp_path / "state", http={"port": 0},
                        allowed_senders=(AllowedSender(ae_title="SCANNER", host="127.0.0.0/8"),),
                        limits={"min_free_disk_mb": 1})
    config.state_dir.mkdir(parents=True)
    index = Index(config.index_path)
    service = fake_service(config, index)
    ops = Ops(service)
    def fan_out(event: Event) -> None:
        for listener in service.listeners:
            listener(event)

    service.scp = start_scp(config, Spool(config.spool_dir), index, fan_out)
    ops.start()
    yield service, ops
    ops.stop()
    service.scp.stop()


@pytest.mark.peer
def test_counts_match_what_storescu_sent(scp_node, tmp_path):
    service, ops = scp_node
    port = service.scp.port
    sent = storescu(port, CT_FILES, calling="SCANNER")
    assert store_statuses(sent.stdout + sent.stderr) == ["Success"] * 3, sent.stdout + sent.stderr
    again = storescu(port, CT_FILES[:1], calling="SCANNER")  # a duplicate
    assert store_statuses(again.stdout + again.stderr) == ["Success"]
    intruder = storescu(port, CT_FILES[:1], calling="INTRUDER")
    wrong_called = storescu(port, CT_FILES[:1], calling="SCANNER", called="NOTUS")
    assert intruder.returncode != 0 and wrong_called.returncode != 0
    no_study = dcmread(CT_FILES[0])
    del no_study.StudyInstanceUID
    no_study.SOPInstanceUID = no_study.SOPInstanceUID + ".9"
    no_study.save_as(tmp_path / "no_study.dcm")
    refused = storescu(port, [tmp_path / "no_study.dcm"], calling="SCANNER")
    statuses = store_statuses(refused.stdout + refused.stderr)
    assert statuses and statuses[0] != "Success", refused.stderr

    status, headers, body = http(f"{ops.http.url}/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    parsed = samples(body.decode())
    spooled = sorted(p for p in service.config.spool_dir.rglob("*.dcm"))
    assert len(spooled) == 3
    assert value(parsed, "segnode_instances_received_total") == 3
    assert value(parsed, "segnode_bytes_received_total") == sum(p.stat().st_size for p in spooled)
    assert value(parsed, "segnode_duplicates_total") == 1
    assert value(parsed, "segnode_associations_total", result="accepted") == 3  # 3 files, duplicate, refused
    assert value(parsed, "segnode_associations_total", result="rejected") == 2
    assert value(parsed, "segnode_rejections_total", reason="sender_not_allowed") == 1
    assert value(parsed, "segnode_rejections_total", reason="called_ae_unknown") == 1
    assert value(parsed, "segnode_rejections_total", reason="invalid_uid") == 1
    assert value(parsed, "segnode_jobs", state="received") == 1
    assert value(parsed, "segnode_jobs", state="done") == 0
    assert value(parsed, "segnode_free_disk_bytes") > 1024 * 1024

    records = [json.loads(line) for line in audit_path(service.config).read_text().splitlines()]
    refusals = [r for r in records if r["event"] == "instance.refused"]
    assert [(r["calling_ae"], r["host"], r["sop_uid"], r["status"]) for r in refusals] == [
        ("SCANNER", "127.0.0.1", no_study.SOPInstanceUID, "0xC211")]
    assert "StudyInstanceUID" in refusals[0]["reason"]
    assert str(no_study.PatientName) not in json.dumps(refusals) and no_study.PatientID not in json.dumps(refusals)


def test_stage_histograms_jobs_and_dispatch_match_the_scripted_history(tmp_path):
    config = NodeConfig(port=0, state_dir=tmp_path / "state", http={"port": 0},
                        destinations=({"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242},))
    s = scripted_index(config.index_path)
    service = fake_service(config, s.index)
    ops = Ops(service)
    ops.start()
    try:
        for ok in (False, False, True):
            ops.on_event(Delivered(s.jobs["done"], "pacs", ok, "x"))
        ops.follower.poll()
        parsed = samples(ops.metrics.render().decode())
    finally:
        ops.stop()
    for stage in ("ingest", "queue", "segment", "dispatch"):
        seconds = s.stage_seconds(stage)
        assert value(parsed, "segnode_stage_duration_seconds_count", stage=stage) == len(seconds), stage
        assert value(parsed, "segnode_stage_duration_seconds_sum", stage=stage) == pytest.approx(sum(seconds))
    # the 30 s segmentation is in the 30 s bucket, not in the 10 s one
    assert value(parsed, "segnode_stage_duration_seconds_bucket", stage="segment", le="10.0") == 1  # 7 s
    assert value(parsed, "segnode_stage_duration_seconds_bucket", stage="segment", le="30.0") == 3
    counts = {state.value: 0 for state in JobState}
    counts.update({"done": 1, "failed": 1, "not_routed": 1, "dead_letter": 1, "received": 1})
    for state, n in counts.items():
        assert value(parsed, "segnode_jobs", state=state) == n, state
    assert value(parsed, "segnode_dispatch_attempts_total", destination="pacs") == 3
    assert value(parsed, "segnode_dispatch_failures_total", destination="pacs") == 2


def test_refusals_are_counted_by_the_reason_their_event_carries_never_by_the_comment(tmp_path):
    metrics = NodeMetrics(None, None)
    refused = [InstanceRefused(Status.OUT_OF_RESOURCES, "disk_full", "instance larger than the node accepts", "CT",
                               "127.0.0.1", "1.2.3"),  # the comment would say too_large; the event says disk_full
               InstanceRefused(Status.OUT_OF_RESOURCES, Refusal(Status.OUT_OF_RESOURCES, "x").reason, "write failed",
                               "CT", "127.0.0.1", "1.2.4"),  # the table's reason for 0xA700
               InstanceRefused(Status.CANNOT_DECODE, "cannot_decode", None, "CT", "127.0.0.1", "1.2.5")]
    for event in refused:
        metrics.on_event(event)
    parsed = samples(metrics.render().decode())
    assert value(parsed, "segnode_rejections_total", reason="disk_full") == 1
    assert value(parsed, "segnode_rejections_total", reason="too_large") == 0
    assert value(parsed, "segnode_rejections_total", reason="write_failed") == 0
    assert value(parsed, "segnode_rejections_total", reason="out_of_resources") == 1
    assert value(parsed, "segnode_rejections_total", reason="cannot_decode") == 1
    assert category(Status.OUT_OF_RESOURCES) is Category.RETRYABLE and reason(0xA700) == "out_of_resources"
