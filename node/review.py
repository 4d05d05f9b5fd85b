"""Clinical review before send: the QC policy decision, and the job files the review page shows.

:func:`decide` turns a job's QC outcome and its route's ``review`` setting into
send / send with a warning / hold / fail.  The pictures themselves are drawn by
:mod:`segnode.node.writers.pictures`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segnode.models.qc import Outcome, worst
from segnode.routing.rules import QcPolicy, Review


@dataclass(frozen=True)
class Decision:
    policy: QcPolicy
    reason: str


def decide(qc: list[dict[str, Any]] | None, review: dict[str, Any] | None) -> Decision:
    """What to do with a result: the route's policy for the worst QC outcome.

    Without a ``review`` setting on the route the result is sent (the QC is recorded
    in the summary and, on a warn or fail, in the job's reason).
    """
    findings = qc or []
    outcome = worst(findings)
    bad = [f for f in findings if f["outcome"] != Outcome.PASS.value]
    why = "; ".join(f"{f['check']} {f['tissue']} {f['outcome']} ({f['figure']}, expected {f['expected']})" for f in bad)
    if review is None:
        policy = QcPolicy.SEND if outcome is Outcome.PASS else QcPolicy.SEND_WITH_WARNING
    else:
        rules = Review.model_validate(review)
        policy = {Outcome.PASS: QcPolicy.SEND, Outcome.WARN: rules.on_warn, Outcome.FAIL: rules.on_fail}[outcome]
        if rules.always and policy is not QcPolicy.FAIL:
            policy = QcPolicy.HOLD
            why = why or "route holds every result for review"
    return Decision(policy, f"QC {outcome.value}: {why}" if why else f"QC {outcome.value}")


# -- what the job page shows -------------------------------------------------------------


def job_folder(job: Mapping[str, Any]) -> Path | None:
    """The folder of a job row (where the SEG, the summary and ``review/`` are); None before it has a result.

    ``result_dir``; a job recorded before that column held absolute paths: its SEG's folder.
    """
    if job.get("result_dir"):
        return Path(job["result_dir"])
    return Path(job["seg_path"]).parent if job.get("seg_path") else None


def job_summary(job: Mapping[str, Any]) -> dict[str, Any]:
    """The job's ``summary_*.json`` (QC findings, pictures, segment statistics); empty if none."""
    folder = job_folder(job)
    found = sorted(folder.glob("summary_*.json")) if folder and folder.is_dir() else []
    if not found:
        return {}
    try:
        return json.loads(found[-1].read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def picture_path(job: Mapping[str, Any], name: str) -> Path | None:
    """A review picture of the job by file name (``lung_left_axial.png``); None if not there."""
    folder = job_folder(job)
    if folder is None or not re.fullmatch(r"[a-z][a-z0-9_]*\.png", name):
        return None
    path = folder / "review" / name
    return path if path.is_file() else None
