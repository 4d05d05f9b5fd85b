"""``segnode serve`` end to end with real peers: DCMTK storescu/storescp, Orthanc, dciodvfy.

Each test runs the node as its own process (``python -m node.cli serve``),
sends with ``storescu``, and reads the outcome from the peers and the index.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path

import pytest
import yaml
from pydicom import dcmread
from segnode.storage.index import DeliveryState, Index, JobState

from tests.paths import DATA
from tests.peers import (
    DCMTK_ENV,
    NodeProcess,
    free_port,
    node,
    orthanc,
    store_statuses,
    storescp,
    storescu,
    wait_until,
    write_node_config,
)
from tests.phantoms import thorax_phantom, write_ct_series

THORAX = DATA / "thorax_cta"
pytestmark = [pytest.mark.peer, pytest.mark.slow]


def routed_config(tmp_path: Path, destinations: list[dict], to: list[str], **overrides: object) -> Path:
    routes = tmp_path / "routes.yaml"
    routes.write_text(yaml.safe_dump({"rules": [
        {"name": "everything", "fallback": True, "action": {"profile": "lungs", "destinations": to}}]}))
    return write_node_config(tmp_path / "node.yaml", destinations=destinations, routes=str(routes), **overrides)


def index_of(n: NodeProcess) -> Index:
    return Index(n.state_dir / "index.sqlite")


def wait_job(index: Index, states: set[JobState], timeout: float = 120, series_uid: str | None = None):
    def check():  # type: ignore[no-untyped-def]
        jobs = [j for j in index.jobs() if series_uid is None or j.series_uid == series_uid]
        return next((j for j in jobs if j.state in states), None)

    return wait_until(check, timeout, f"a job in {sorted(s.value for s in states)}", interval=0.1)


def dest(name: str, port: int, ae: str) -> dict:
    return {"name": name, "ae_title": ae, "host": "127.0.0.1", "port": port}


@pytest.fixture(scope="module")
def series_300(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic 300-image chest series (64×64 pixels, 0.8 mm slices)."""
    folder = tmp_path_factory.mktemp("series300")
    phantom = thorax_phantom(shape=(300, 64, 64), spacing=(6.25, 6.25, 0.8))
    v = phantom.volume
    write_ct_series(v.hu, folder, v.spacing, v.origin, v.direction)
    return folder


def test_storescu_to_node_seg_reaches_orthanc_in_the_same_study(tmp_path: Path) -> None:
    with orthanc(tmp_path / "orthanc") as pacs:
        config = routed_config(tmp_path, [dest("pacs", pacs.dicom_port, pacs.ae_title)], ["pacs"])
        with node(config) as n:
            sent = storescu(n.port, [THORAX])
            assert store_statuses(sent.stderr) == ["Success"] * 164
            job = wait_job(index_of(n), {JobState.DONE, JobState.FAILED, JobState.DEAD_LETTER})
            assert job.state is JobState.DONE, job.reason
        [seg_series] = pacs.series_by_modality("SEG")
        source = dcmread(THORAX / "CT0001.dcm", stop_before_pixels=True)
        study = pacs.get(f"/studies/{seg_series['ParentStudy']}")
        assert study["MainDicomTags"]["StudyInstanceUID"] == source.StudyInstanceUID
        [instance_id] = seg_series["Instances"]
        seg_file = tmp_path / "seg.dcm"
        seg_file.write_bytes(pacs.get(f"/instances/{instance_id}/file"))
    seg = dcmread(seg_file)
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert seg.SeriesInstanceUID == job.seg_series_uid
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    check = subprocess.run(["dciodvfy", str(seg_file)], capture_output=True, text=True)
    errors = [line for line in check.stderr.splitlines() if line.startswith("Error")]
    assert errors == [], errors


def test_down_destination_gets_it_later_and_rejecting_one_dead_letters_until_retried(tmp_path: Path) -> None:
    down_port, picky_port = free_port(), free_port()
    config = routed_config(tmp_path, [dest("later", down_port, "LATER"), dest("picky", picky_port, "PICKY")],
                           ["later", "picky"], dispatch={"max_attempts": 30, "backoff_initial_s": 0.3,
                                                         "backoff_max_s": 1.0, "poll_interval_s": 0.2})
    with node(config) as n, storescp(tmp_path / "picky-ct-only", port=picky_port, ae_title="PICKY", ct_only=True):
        index = index_of(n)
        assert store_statuses(storescu(n.port, [THORAX]).stderr) == ["Success"] * 164
        job = wait_job(index, {JobState.SENDING, JobState.FAILED})
        assert job.state is JobState.SENDING, job.reason

        def tried(name: str, state: DeliveryState):  # type: ignore[no-untyped-def]
            return lambda: next((d for d in index.deliveries(job.job_id)
                                 if d.destination == name and d.state is state and d.attempts >= 1), None)

        picky = wait_until(tried("picky", DeliveryState.DEAD), 60, "picky to refuse")
        assert "no presentation context" in picky.last_error and picky.attempts == 1
        later = wait_until(tried("later", DeliveryState.PENDING), 60, "a failed try to the down destination")
        assert later.last_error
        with storescp(tmp_path / "later", port=down_port, ae_title="LATER") as late:
            wait_until(tried("later", DeliveryState.DONE), 60, "delivery once the destination is up")
            assert len(late.received()) == 1
        assert wait_job(index, {JobState.DEAD_LETTER}).job_id == job.job_id
    with node(config) as n, storescp(tmp_path / "picky-fixed", port=picky_port, ae_title="PICKY") as fixed:
        retry = n.cli("jobs", "retry", str(job.job_id))
        assert retry.returncode == 0, retry.stderr
        assert wait_job(index_of(n), {JobState.DONE}).job_id == job.job_id
        [received] = fixed.received()
        assert dcmread(received).SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"  # the SEG
        shown = n.cli("jobs", "show", str(job.job_id))
        assert "picky: done" in shown.stdout and "later: done" in shown.stdout
        assert [d.attempts for d in index_of(n).deliveries(job.job_id) if d.destination == "later"][0] >= 2


def acknowledged_files(storescu_output: str) -> list[str]:
    """Files storescu got a Success for, from its -v log."""
    done, current = [], None
    for line in storescu_output.splitlines():
        if "Sending file:" in line:
            current = line.split("Sending file:", 1)[1].strip()
        elif "Received Store Response (Success)" in line and current:
            done.append(current)
    return done


def test_kill_9_during_transfer_loses_nothing_acknowledged_and_segments_once(tmp_path: Path,
                                                                            series_300: Path) -> None:
    with orthanc(tmp_path / "orthanc") as pacs:
        config = routed_config(tmp_path, [dest("pacs", pacs.dicom_port, pacs.ae_title)], ["pacs"],
                               completion={"quiet_period_s": 3.0, "sweep_interval_s": 0.2})
        with node(config) as n:  # stopped on the way out even if a step fails
            sender = subprocess.Popen(["storescu", "-v", "-nh", "-aet", "SCANNER", "-aec", "SEGNODE", "+sd",
                                       "127.0.0.1", str(n.port), str(series_300)], env=DCMTK_ENV, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            log, successes = [], 0
            for line in sender.stdout:  # kill the node after the 120th acknowledged image
                log.append(line)
                successes += "Received Store Response (Success)" in line
                if successes == 120:
                    n.proc.send_signal(signal.SIGKILL)
                    break
            log += sender.stdout.readlines()
            sender.stdout.close()
            sender.wait()
            n.proc.wait()
        acked = acknowledged_files("".join(log))
        assert 120 <= len(acked) < 300
        index = index_of(n)
        spool = n.state_dir / "spool"
        for path in acked:
            ds = dcmread(path, stop_before_pixels=True)
            stored = spool / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
            assert stored.read_bytes()[132:] != b"" and dcmread(stored).SOPInstanceUID == ds.SOPInstanceUID
        with node(config) as again:
            assert store_statuses(storescu(again.port, [series_300]).stderr) == ["Success"] * 300
            job = wait_job(index, {JobState.DONE, JobState.FAILED, JobState.DEAD_LETTER}, timeout=180)
            assert job.state is JobState.DONE, job.reason
        jobs = index.jobs()
        assert len(jobs) == 1 and jobs[0].segment_attempts == 1
        assert index.series(jobs[0].series_uid).instance_count == 300
        assert len(pacs.series_by_modality("SEG")) == 1
        [seg_series] = pacs.series_by_modality("SEG")
        assert len(seg_series["Instances"]) == 1


def test_kill_9_during_segmentation_resumes_after_restart(tmp_path: Path) -> None:
    config = routed_config(tmp_path, [], [])
    with node(config) as n:  # stopped on the way out even if a step fails
        index = index_of(n)
        assert store_statuses(storescu(n.port, [THORAX]).stderr) == ["Success"] * 164
        job = wait_job(index, {JobState.SEGMENTING}, timeout=60)
        worker_pid = int(wait_until(lambda: _worker_pid(n.proc.pid), 30, "the worker process"))
        n.proc.send_signal(signal.SIGKILL)
        n.proc.wait()
    wait_until(lambda: not _alive(worker_pid), 10, "the orphaned worker to exit")
    assert index.job(job.job_id).state is JobState.SEGMENTING
    with node(config):
        done = wait_job(index, {JobState.DONE, JobState.FAILED}, timeout=120)
    assert done.job_id == job.job_id and done.state is JobState.DONE, done.reason
    assert done.segment_attempts == 2
    assert "resumed after restart" in [reason for _, _, reason in index.events(job.job_id)]


def _worker_pid(node_pid: int) -> int | None:
    """The node's worker process (a child running ``segnode.node.jobs.worker``)."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().split(b"\0")
                parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if b"segnode.node.jobs.worker" in cmd and parent == node_pid:
                return int(proc.name)
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return Path(f"/proc/{pid}/status").read_text().find("State:\tZ") < 0


def test_four_concurrent_associations_of_100_images_all_stored(tmp_path: Path) -> None:
    folders = []
    for s in range(4):
        v = thorax_phantom(shape=(100, 48, 48), spacing=(8.0, 8.0, 2.0), seed=s).volume
        folders.append(tmp_path / f"s{s}")
        write_ct_series(v.hu, folders[-1], v.spacing, v.origin, v.direction)
    config = write_node_config(tmp_path / "node.yaml", completion={"quiet_period_s": 3600, "evidence": False})
    with node(config) as n:
        results: list[subprocess.CompletedProcess] = []
        threads = [threading.Thread(target=lambda f=f: results.append(storescu(n.port, [f]))) for f in folders]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        index = index_of(n)
        assert [store_statuses(r.stderr).count("Success") for r in results] == [100] * 4
        assert index.instance_count() == 400
        assert len(list((n.state_dir / "spool").glob("*/*/*.dcm"))) == 400
        assert len(index.jobs()) == 4
        status = n.cli("status")
        assert "400 received" in status.stdout and "received 4" in status.stdout
