"""Segmentation jobs, each run in its own process.

A :class:`JobSpec` is the whole unit of work — which spooled series, which
profile and backend, where to write — as plain JSON, so the same job can
later run on another machine.  :func:`run_job` starts ``python -m
node.worker SPEC.json`` and waits for it: a crash or out-of-memory kill in a
model ends that process only, never the receiver.  The child writes
``result.json`` (or ``error.json``) next to its outputs and exits; it also
exits by itself if the node that started it dies, so a restarted node never
races an orphan.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from node.errors import SegnodeError

logger = logging.getLogger(__name__)

RESULT_FILE = "result.json"
ERROR_FILE = "error.json"


@dataclass(frozen=True)
class JobSpec:
    """One segmentation job: serialisable, self-contained."""

    job_id: int
    series_uid: str
    input_dir: str
    profile: str
    out_dir: str
    backend: str | None = None
    seg_type: str = "binary"
    device: str = "auto"
    threads: int | None = None
    weights_dir: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "JobSpec":
        return cls(**json.loads(text))


@dataclass(frozen=True)
class JobOutcome:
    """What came back from a worker process."""

    ok: bool
    result: dict[str, Any] | None = None
    error_kind: str | None = None  # exception class name, "crash" or "timeout"
    message: str | None = None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str), encoding="utf-8")
    os.replace(tmp, path)


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"worker killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"worker killed by signal {-code}"
    return f"worker exited with code {code} without a result"


def _last_line(log: Path) -> str:
    try:
        lines = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def run_job(spec: JobSpec, *, timeout_s: float, on_start: Callable[[int], None] | None = None) -> JobOutcome:
    """Run ``spec`` in a new Python process and wait for its outcome.

    ``on_start`` receives the worker's process id once it runs.
    """
    out = Path(spec.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in (RESULT_FILE, ERROR_FILE):
        (out / stale).unlink(missing_ok=True)
    spec_path = out / "job.json"
    spec_path.write_text(spec.to_json(), encoding="utf-8")
    with open(out / "worker.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "node.worker", str(spec_path)],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        if on_start is not None:
            on_start(proc.pid)
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return JobOutcome(False, error_kind="timeout", message=f"worker ran longer than {timeout_s:.0f} s")
    if (out / RESULT_FILE).is_file():
        return JobOutcome(True, result=json.loads((out / RESULT_FILE).read_text(encoding="utf-8")))
    if (out / ERROR_FILE).is_file():
        err = json.loads((out / ERROR_FILE).read_text(encoding="utf-8"))
        return JobOutcome(False, error_kind=err["kind"], message=err["message"])
    last = _last_line(out / "worker.log")
    return JobOutcome(False, error_kind="crash", message=_describe_exit(code) + (f": {last}" if last else ""))


# -- the child process ------------------------------------------------------------------


def _exit_with_parent() -> None:
    """Leave as soon as the process that started us is gone (kill -9 of the node)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(70)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def execute(spec: JobSpec) -> dict[str, Any]:
    """Run the pipeline for ``spec`` in this process; return the result record."""
    from models.base import RunSettings
    from node.pipeline import PipelineRequest, run_pipeline

    settings = RunSettings(device=spec.device, threads=spec.threads,
                           weights_dir=Path(spec.weights_dir) if spec.weights_dir else None)
    request = PipelineRequest(input_path=Path(spec.input_dir), profile=spec.profile, out_dir=Path(spec.out_dir),
                              backend=spec.backend, series_uid=spec.series_uid, seg_type=spec.seg_type,
                              output_format="seg", settings=settings)
    result = run_pipeline(request)
    return {
        "seg_path": str(result.seg_path) if result.seg_path else None,
        "summary_path": str(result.summary_path),
        "backend_used": str(getattr(result.backend_used, "value", result.backend_used)),
        "model_version": result.model_version,
        "weights_hash": result.weights_hash,
        "seg_series_uid": result.seg_series_uid,
        "seg_sop_instance_uid": result.seg_sop_instance_uid,
    }


def main(argv: list[str] | None = None) -> int:
    from node.logs import configure

    args = sys.argv[1:] if argv is None else argv
    spec_path = Path(args[0])
    spec = JobSpec.from_json(spec_path.read_text(encoding="utf-8"))
    configure(1)
    _exit_with_parent()
    out = Path(spec.out_dir)
    try:
        record = execute(spec)
    except SegnodeError as exc:
        logger.error("job %d failed: %s", spec.job_id, exc)
        _write_json(out / ERROR_FILE, {"kind": type(exc).__name__, "message": str(exc)})
        return exc.exit_code
    _write_json(out / RESULT_FILE, record)
    logger.info("job %d: SEG %s", spec.job_id, record["seg_path"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
