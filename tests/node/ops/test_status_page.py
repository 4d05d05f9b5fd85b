"""The status page in a real browser (Debian's headless Chromium): rendered, readable, screenshot kept.

The screenshot is written to ``tests/artifacts/status_page.png`` (git-ignored)
for a person to look at.
"""

from __future__ import annotations

import html
import re
import shutil
import subprocess
import types
from pathlib import Path

import pytest
from PIL import Image
from segnode.node.config import NodeConfig
from segnode.node.ops.runner import Ops
from segnode.node.ops.status_page import render_status
from segnode.routing import RulesHolder
from segnode.storage.index import JobState

from tests.ops_helpers import scripted_index
from tests.paths import ARTIFACTS


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    assert exe, "Debian's chromium is required for the status page test: make peers"
    return exe


def browse(url: str, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--window-size=1280,900", *extra, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.fixture
def node(tmp_path):
    config = NodeConfig(port=0, state_dir=tmp_path / "state", http={"port": 0})
    s = scripted_index(config.index_path)
    s.index.record_instance(_hostile_instance())
    service = types.SimpleNamespace(config=config, index=s.index, rules=RulesHolder(None), scp=None, listeners=[], remote=None, dicomweb=None, review=None)
    ops = Ops(service)
    ops.start()
    yield s, ops
    ops.stop()


def _hostile_instance():
    from segnode.storage.index import InstanceRecord

    return InstanceRecord(sop_uid="1.2.9.1", series_uid="1.2.9", study_uid="1.2.9.0", sop_class_uid="1.2",
                          transfer_syntax_uid="1.2", modality="CT", path="x", size_bytes=1,
                          calling_ae="<script>x</script>", called_ae="SEGNODE", sender_host="127.0.0.1")


@pytest.mark.peer
def test_status_page_in_headless_chromium(node, tmp_path):
    s, ops = node
    url = ops.http.url + "/status"
    dom = browse(url, tmp_path / "profile-dom", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = dom.stdout
    assert "<h2>Queue</h2>" in page and "<h2>Per-stage latency</h2>" in page
    queue = dict(re.findall(r'class="state s-(\w+)">\w+</span></td><td class="n">(\d+)</td>', page))
    assert queue == {"received": "2", "complete": "0", "segmenting": "0", "encoded": "0", "sending": "0",
                     "done": "1", "failed": "1", "dead_letter": "1", "not_routed": "1",
                     "held": "0", "rejected": "0", "skipped": "0", "superseded": "0"}
    failures = page.split('id="failures"', 1)[1].split("</table>", 1)[0]
    assert "BackendError: model crashed" in failures and "no routing rule matched" in failures
    assert html.escape("pacs: association rejected permanently") in failures
    latency = page.split('id="latency"', 1)[1].split("</table>", 1)[0]
    assert re.search(r"<td>segment</td><td class=\"n\">3</td><td class=\"n\">12.0 s</td>"
                     r"<td class=\"n\">30.0 s</td><td class=\"n\">30.0 s</td>", latency), latency
    recent = page.split('id="recent"', 1)[1]
    assert all(f'<td class="n"><a href="/jobs/{job_id}/review">{job_id}</a></td>' in recent
               for job_id in s.jobs.values())  # each row links to the job's page
    assert "NOT READY" in page  # this node runs no DICOM listener

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "status_page.png"
    shot.unlink(missing_ok=True)
    result = browse(url, tmp_path / "profile-shot", f"--screenshot={shot}")
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    with Image.open(shot) as image:
        assert image.size == (1280, 900)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is not None and len(colours) > 50  # text and tables, not a blank page


def test_values_from_the_index_are_escaped(tmp_path):
    s = scripted_index(tmp_path / "index.sqlite")
    s.index.record_instance(_hostile_instance())
    s.index.transition(s.index.jobs(limit=1)[0].job_id, JobState.NOT_ROUTED,
                       "<img src=x onerror=alert(1)>")
    from segnode.node.ops.views import OpsDB

    page = render_status(OpsDB(tmp_path / "index.sqlite"), node="<b>SEG</b>", clock=lambda: s.clock.now)
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "<b>SEG</b>" not in page
