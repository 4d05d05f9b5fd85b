"""The short soak (``bench/soak.py``, a few minutes): every fault once among mixed traffic, and the books balance.

Real peers throughout (Orthanc as the PACS, DCMTK ``storescu``, a STOW-RS client,
remote workers on a private RabbitMQ); the outcome is asserted, not the timing:
nothing acknowledged lost, no job stuck, one current result per routed series at
the PACS, no traceback in any log, and every kind of fault survived.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.paths import REPO
from tests.rabbitmq_peer import rabbitmq_available

pytestmark = [pytest.mark.peer, pytest.mark.slow,
              pytest.mark.skipif(not (rabbitmq_available() and shutil.which("Orthanc") and shutil.which("storescu")),
                                 reason="RabbitMQ, Orthanc and DCMTK (make peers)")]


def test_short_soak_loses_nothing_and_survives_every_fault(tmp_path: Path) -> None:
    out = tmp_path / "soak"
    result = subprocess.run([sys.executable, str(REPO / "bench" / "soak.py"), "--minutes", "2", "--fault-every-s",
                             "15", "--fault-hold-s", "6", "--series-every-s", "5", "--drain-s", "180", "--out",
                             str(out)], capture_output=True, text=True, timeout=900, cwd=REPO)
    assert (out / "soak.json").is_file(), result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "soak.json").read_text())
    print(result.stdout[-1500:])
    assert report["failures"] == [], report["failures"]
    assert result.returncode == 0
    assert report["lost"] == [] and report["stuck"] == [] and report["tracebacks"] == []
    assert report["series_without_one_current_result"] == []
    expected = {"node_kill", "worker_kill", "broker_kill", "pacs_stop", "blackhole"}
    assert expected <= set(report["faults"]), report["faults"]
    assert report["acknowledged"] > 0 and report["routed_series"] > 0
    assert (out / "soak.png").is_file()
