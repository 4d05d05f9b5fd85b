"""A scripted index history for the ops tests (HTTP API, status page, metrics, audit).

:func:`scripted_index` drives the real :class:`segnode.storage.index.Index` state
machine with a fake clock, so every stage duration is known exactly.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segnode.storage.index import Index, InstanceRecord, JobState

T0 = 1_700_000_000.0
STUDY = "1.2.826.0.1.3680043.8.498.1"


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Scripted:
    """What :func:`scripted_index` did: job ids by outcome and every stage's seconds."""

    index: Index
    clock: FakeClock
    jobs: dict[str, int] = field(default_factory=dict)
    spans: list[tuple[str, float]] = field(default_factory=list)  # (stage, seconds), in order

    def stage_seconds(self, stage: str) -> list[float]:
        return [s for name, s in self.spans if name == stage]


def _receive(index: Index, n: int, series: str, *, instances: int = 2, size: int = 1000) -> None:
    for i in range(instances):
        index.record_instance(InstanceRecord(
            sop_uid=f"{series}.{i + 1}", series_uid=series, study_uid=STUDY, sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            transfer_syntax_uid="1.2.840.10008.1.2.1", modality="CT", path=f"{STUDY}/{series}/{i}.dcm",
            size_bytes=size, calling_ae=f"SCANNER{n}", called_ae="SEGNODE", sender_host="127.0.0.1"))


def scripted_index(path: Path) -> Scripted:
    """Five series: done, failed, not routed, dead-lettered, and one still receiving."""
    clock = FakeClock()
    index = Index(path, clock=clock)
    out = Scripted(index, clock)
    series = {name: f"{STUDY}.{k}" for k, name in enumerate(("done", "failed", "not_routed", "dead", "open"), 1)}
    for k, (name, uid) in enumerate(series.items(), 1):
        _receive(index, k, uid)
        out.jobs[name] = index.jobs(limit=1)[0].job_id
        clock.advance(1.0)

    def route(name: str, ingest: float, destinations: tuple[str, ...] = ("pacs",)) -> None:
        clock.advance(ingest)
        index.mark_complete(out.jobs[name], rule="ct-lungs", profile="lungs", backend="hu_based",
                            destinations=destinations)

    # done: ingest 4 s (measured from its first instance, 5 s ago + 4), queue 2, segment 30, dispatch 3
    clock.advance(4.0)
    index.mark_complete(out.jobs["done"], rule="ct-lungs", profile="lungs", backend="hu_based", destinations=("pacs",))
    out.spans.append(("ingest", clock.now - T0))
    clock.advance(2.0)
    assert index.claim_next().job_id == out.jobs["done"]
    out.spans.append(("queue", 2.0))
    clock.advance(30.0)
    index.mark_encoded(out.jobs["done"], seg_path="/tmp/seg.dcm", seg_series_uid="1.2.3.4", seg_sop_uid="1.2.3.4.1",
                       backend_used="hu_based", model_version="hu-1")
    out.spans.append(("segment", 30.0))
    clock.advance(3.0)
    index.delivery_result(out.jobs["done"], "pacs", ok=True)
    out.spans.append(("dispatch", 3.0))

    # failed: segmentation fails after 12 s
    created = T0 + 1.0
    route("failed", 0.0)
    out.spans.append(("ingest", clock.now - created))
    assert index.claim_next().job_id == out.jobs["failed"]
    out.spans.append(("queue", 0.0))
    clock.advance(12.0)
    index.transition(out.jobs["failed"], JobState.FAILED, "BackendError: model crashed")
    out.spans.append(("segment", 12.0))

    # not routed
    clock.advance(1.0)
    index.transition(out.jobs["not_routed"], JobState.NOT_ROUTED, "no routing rule matched")
    out.spans.append(("ingest", clock.now - (T0 + 2.0)))

    # dead letter: delivered nowhere after one permanent refusal
    route("dead", 1.0)
    out.spans.append(("ingest", clock.now - (T0 + 3.0)))
    clock.advance(5.0)
    assert index.claim_next().job_id == out.jobs["dead"]
    out.spans.append(("queue", 5.0))
    clock.advance(7.0)
    index.mark_encoded(out.jobs["dead"], seg_path="/tmp/seg2.dcm", seg_series_uid="1.2.3.5", seg_sop_uid="1.2.3.5.1",
                       backend_used="hu_based", model_version="hu-1")
    out.spans.append(("segment", 7.0))
    clock.advance(2.0)
    index.delivery_result(out.jobs["dead"], "pacs", ok=False, error="association rejected permanently")
    out.spans.append(("dispatch", 2.0))
    return out


def http(url: str, *, method: str = "GET", token: str | None = None, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request; returns status, headers and body, for any status."""
    req = urllib.request.Request(url, data=body, method=method, headers=dict(headers or {}))
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=15) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def json_of(result: tuple[int, dict[str, str], bytes]) -> Any:
    import json

    return json.loads(result[2])
