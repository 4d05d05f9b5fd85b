"""A full run — storescu → ``segnode serve`` → SEG to a PACS — leaves no patient name or ID in any log.

Two studies with invented, unique names and IDs are sent by DCMTK's
``storescu``; the node segments them (``hu_based``) and sends the SEGs to a
DCMTK ``storescp`` and to a destination that is down.  Then the audit log,
the node's stdout/stderr, its log files and the worker logs are searched for
every part of the names and IDs: none may appear.  The same search finds
them in the spooled images (the search works), and the audit log must say
who sent what and what went where.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmread
from segnode.node.ops.audit import read_records

from tests.ops_helpers import http, json_of
from tests.paths import DATA
from tests.peers import (
    ROOT,
    free_port,
    stop_process,
    storescp,
    storescu,
    wait_until,
    write_node_config,
)

PATIENTS = {  # folder → (name, ID): invented, and unlike anything else in the code or the data
    "thorax_cta": ("Quillfeather^Ombretta^Zs", "ZQX-PID-48213"),
    "liver_3slice": ("Vantongeren^Brisbane", "ZQX-PID-99071"),
}
TERMINAL = {"done", "failed", "dead_letter", "not_routed"}


def canaries() -> list[str]:
    out = []
    for name, pid in PATIENTS.values():
        out += [name, pid, *[part for part in name.split("^") if len(part) > 3]]
    return out


def _copy_study(src: Path, dst: Path, name: str, pid: str) -> list[Path]:
    dst.mkdir(parents=True)
    files = []
    for path in sorted(src.glob("*.dcm")):
        ds = dcmread(path)
        if ds.SOPClassUID.name != "CT Image Storage":
            continue
        ds.PatientName, ds.PatientID = name, pid
        ds.save_as(dst / path.name)
        files.append(dst / path.name)
    return files


def _log_files(state: Path, run_dir: Path) -> list[Path]:
    logs = [run_dir / "stdout.txt", run_dir / "stderr.txt"]
    logs += sorted((state / "audit").glob("audit.jsonl*"))
    logs += sorted((state / "logs").glob("*"))
    logs += sorted((state / "results").rglob("*.log"))
    logs += sorted((state / "results").rglob("*.json"))  # worker result / error records
    return [p for p in logs if p.is_file()]


def _found(paths: list[Path]) -> dict[str, list[str]]:
    hits: dict[str, list[str]] = {}
    for path in paths:
        text = path.read_bytes().decode("utf-8", "replace").lower()
        for canary in canaries():
            if canary.lower() in text:
                hits.setdefault(str(path), []).append(canary)
    return hits


@pytest.mark.peer
def test_full_run_logs_and_audit_hold_no_patient_name_or_id(tmp_path):
    studies = {folder: _copy_study(DATA / folder, tmp_path / "send" / folder, *PATIENTS[folder])
               for folder in PATIENTS}
    down_port = free_port()  # nothing listens there: every attempt fails
    with storescp(tmp_path / "pacs") as pacs:
        routes = tmp_path / "routes.yaml"
        routes.write_text(yaml.safe_dump({"rules": [{
            "name": "ct-lungs", "match": {"tag": "Modality", "equals": "CT"},
            "action": {"profile": "lungs", "backend": "hu_based", "destinations": ["pacs", "down"]}}]}))
        config = write_node_config(
            tmp_path / "node.yaml", routes=str(routes),
            destinations=[{"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.port},
                          {"name": "down", "ae_title": "DOWN", "host": "127.0.0.1", "port": down_port}],
            dispatch={"max_attempts": 2, "backoff_initial_s": 0.2, "backoff_max_s": 0.5, "poll_interval_s": 0.2,
                      "timeout_s": 5})
        state = Path(yaml.safe_load(config.read_text())["state_dir"])
        out, err = open(tmp_path / "stdout.txt", "w"), open(tmp_path / "stderr.txt", "w")
        proc = subprocess.Popen([sys.executable, "-m", "segnode.node.cli.main", "-v", "--log-json", "serve", "--config",
                                 str(config)], stdout=out, stderr=err, cwd=ROOT, text=True)
        try:
            line = wait_until(lambda: re.search(r"ops HTTP API on (\S+)", (tmp_path / "stdout.txt").read_text())
                              or proc.poll() is not None, 60, "segnode serve")
            assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()[-3000:]
            api = line.group(1)
            node_port = int(re.search(r"listening on [\d.]+:(\d+)", (tmp_path / "stdout.txt").read_text())[1])
            for files in studies.values():
                sent = storescu(node_port, files, calling="SCANNER")
                assert sent.returncode == 0, sent.stderr[-2000:]

            def finished():
                jobs = json_of(http(api + "/api/v1/jobs"))["jobs"]
                return jobs if len(jobs) == 2 and all(j["state"] in TERMINAL for j in jobs) else None

            jobs = wait_until(finished, 300, "both jobs to finish", interval=0.5)
            metrics = {(s.name, tuple(sorted(s.labels.items()))): s.value
                       for f in text_string_to_metric_families(http(api + "/metrics")[2].decode()) for s in f.samples}
            spooled = list((state / "spool").rglob("*.dcm"))
        finally:
            stop_process(proc)
            out.close()
            err.close()

    # the search works: the spooled images do hold the names and IDs
    assert spooled and _found(spooled[:1])
    logs = _log_files(state, tmp_path)
    assert any("audit.jsonl" in p.name for p in logs) and any(p.name == "segnode.log" for p in logs)
    assert _found(logs) == {}

    # and the audit log says who sent what, what was decided and what went where
    records = read_records(state / "audit" / "audit.jsonl")
    sent_uids = {folder: str(dcmread(files[0]).StudyInstanceUID) for folder, files in studies.items()}
    complete = {r["study_uid"]: r for r in records if r["event"] == "job.complete"}
    assert set(complete) == set(sent_uids.values())
    for folder, uid in sent_uids.items():
        rec = complete[uid]
        assert (rec["calling_ae"], rec["host"], rec["rule"]) == ("SCANNER", "127.0.0.1", "ct-lungs")
        assert rec["instances"] == len(studies[folder]) and rec["destinations"] == ["pacs", "down"]
    encoded = [r for r in records if r["event"] == "job.encoded"]
    attempts = [r for r in records if r["event"] == "delivery.attempt"]
    to_pacs = [a for a in attempts if a["destination"] == "pacs"]
    to_down = [a for a in attempts if a["destination"] == "down"]
    assert len(to_pacs) == len(encoded) and all(a["ok"] and a["destination_port"] == pacs.port for a in to_pacs)
    assert len(to_down) == 2 * len(encoded) and not any(a["ok"] for a in to_down)
    assert {a["seg_sop_uid"] for a in to_pacs} == {r["seg_sop_uid"] for r in encoded}
    assert sorted(p.name for p in pacs.received()) and len(pacs.received()) == len(encoded)
    assert len(encoded) >= 1, json.dumps(jobs, indent=1)
    assert metrics[("segnode_dispatch_failures_total", (("destination", "down"),))] == 2 * len(encoded)
    assert metrics[("segnode_instances_received_total", ())] == sum(len(f) for f in studies.values())
