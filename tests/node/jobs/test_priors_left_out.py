"""A prior that cannot be read or segmented is left out of the report with a warning; the job goes on.

The same rule for a local worker and a remote one (whose priors come over HTTP:
tests/node/remote/test_remote_priors.py): a prior is extra evidence for the SR,
never a reason to fail the job.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from segnode.models.base import RunSettings
from segnode.node.jobs.worker import JobSpec, _priors


def test_a_missing_prior_result_or_series_is_left_out_with_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="segnode.node.jobs.worker")
    summary = tmp_path / "summary.json"
    summary.write_text('{"segments": []}')
    found = [{"series_uid": "1.2.3", "seg_path": str(tmp_path / "gone.dcm"), "summary_path": str(summary)},
             {"series_uid": "1.2.4", "input_dir": str(tmp_path / "purged")}]
    spec = JobSpec(job_id=5, series_uid="1.2", input_dir=str(tmp_path), profile="lungs", out_dir=str(tmp_path / "out"),
                   backend="hu_based", options={"priors_found": found})
    assert _priors(spec, RunSettings(), None) == ()
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert messages[0].startswith("job 5: prior 1 (series 1.2.3) left out of the report: ") and "SEG" in messages[0]
    assert messages[1].startswith("job 5: prior 2 (series 1.2.4) left out of the report: ")
