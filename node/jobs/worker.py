"""Segmentation jobs, run in long-lived worker processes separate from the receiver.

A :class:`JobSpec` is the whole unit of work — which spooled series, which
profile and backend, where to write — as plain JSON, so the same job can
later run on another machine.  :func:`run_job` hands the spec to an idle
worker process (``python -m segnode.node.jobs.worker --serve``) of the
:class:`WorkerPool` it is given (the service owns one; nothing starts at
import), starting one if none is idle, and waits for it.  A worker runs one job at a time and keeps its loaded
models warm between jobs (:class:`segnode.models.cache.ModelCache`), so a second study
for the same model does not pay the load again.  A crash or out-of-memory
kill in a model ends that worker only, never the receiver; a worker that ran
past its timeout is killed; neither is reused.  The child writes its
:class:`~segnode.node.jobs.result.JobResult` to ``result.json`` (or
``error.json``) next to its outputs, paths relative to that folder, logs the job into the
job's ``worker.log``, and exits by itself if the node that started it dies, so a
restarted node never races an orphan.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from segnode.errors import InputError, SegnodeError
from segnode.node.jobs.result import RESULT_FILE, Harvest, JobResult

if TYPE_CHECKING:  # the pipeline (models, writers) is imported by the worker process only
    from segnode.models.base import RunSettings
    from segnode.node.jobs.pipeline import ModelSource
    from segnode.node.writers.sr_priors import PriorResult

logger = logging.getLogger(__name__)

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
    memory_budget_mb: int | None = None
    harvest: str | None = None  # dataset to harvest into, from the route
    rule: str | None = None
    calling_ae: str = ""
    dataset_store: str | None = None
    deid_secret_file: str | None = None
    options: dict[str, Any] = field(default_factory=dict)  # the routing action's other settings (Job.options)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "JobSpec":
        return cls(**json.loads(text))


@dataclass(frozen=True)
class JobOutcome:
    """What came back from a worker process."""

    ok: bool
    result: JobResult | None = None  # paths relative to the job folder
    error_kind: str | None = None  # exception class name, "crash" or "timeout"
    message: str | None = None

    def __post_init__(self) -> None:
        if self.ok != (self.result is not None):
            raise ValueError("a job outcome has a result exactly when it is ok")


def _write_json(path: Path, data: dict[str, str]) -> None:
    _write_text(path, json.dumps(data, indent=1))


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
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


class WorkerProcess:
    """One long-lived worker child; the protocol is a spec path in, ``done`` out."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "segnode.node.jobs.worker", "--serve"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def run(self, spec_path: Path, timeout_s: float) -> str:
        """Send one job; return ``done``, ``timeout``, or ``exited`` (the worker died)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(f"{spec_path}\n".encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            return "exited"
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        if not ready:
            return "timeout"
        return "done" if self.proc.stdout.readline().strip() == b"done" else "exited"

    def kill(self) -> int:
        """Kill the worker (and anything it started); return its exit status."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        return self._closed(self.proc.wait())

    def stop(self) -> None:
        """End of input: the worker leaves its loop and exits (killed if it has not within 5 s)."""
        if self.proc.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()
        try:
            self._closed(self.proc.wait(timeout=5))
        except subprocess.TimeoutExpired:
            self.kill()

    def _closed(self, code: int) -> int:
        """Close our ends of the pipes once the process is gone; pass ``code`` through."""
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(BrokenPipeError):
                    pipe.close()
        return code


class WorkerPool:
    """Idle worker processes waiting for the next job (thread-safe).

    Starts no process until a job asks for one; :meth:`shutdown` (or leaving
    its ``with`` block) stops the idle ones, and a worker given back after
    that is stopped too.
    """

    def __init__(self) -> None:
        self._idle: list[WorkerProcess] = []
        self._lock = threading.Lock()
        self._closed = False

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def take(self) -> WorkerProcess:
        with self._lock:
            while self._idle:
                worker = self._idle.pop()
                if worker.proc.poll() is None:
                    return worker
                worker.kill()  # died while idle: reap it, close its pipes
        return WorkerProcess()

    def give_back(self, worker: WorkerProcess) -> None:
        with self._lock:
            if not self._closed:
                self._idle.append(worker)
                return
        worker.stop()

    def shutdown(self) -> None:
        """Stop every idle worker (running ones stop with their job or with us)."""
        with self._lock:
            idle, self._idle, self._closed = self._idle, [], True
        for worker in idle:
            worker.stop()


def run_job(spec: JobSpec, pool: WorkerPool, *, timeout_s: float,
            on_start: Callable[[int], None] | None = None) -> JobOutcome:
    """Run ``spec`` in a worker process of ``pool`` and wait for its outcome.

    ``on_start`` receives the worker's process id once it has the job.
    """
    out = Path(spec.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in (RESULT_FILE, ERROR_FILE):
        (out / stale).unlink(missing_ok=True)
    spec_path = out / "job.json"
    spec_path.write_text(spec.to_json(), encoding="utf-8")
    worker = pool.take()
    if on_start is not None:
        on_start(worker.pid)
    status = worker.run(spec_path, timeout_s)
    if status != "done":
        code = worker.kill()
        if status == "timeout":
            return JobOutcome(False, error_kind="timeout", message=f"worker ran longer than {timeout_s:.0f} s")
        last = _last_line(out / "worker.log")
        return JobOutcome(False, error_kind="crash", message=_describe_exit(code) + (f": {last}" if last else ""))
    pool.give_back(worker)
    if (out / RESULT_FILE).is_file():
        try:
            return JobOutcome(True, result=JobResult.from_json((out / RESULT_FILE).read_bytes()))
        except InputError as exc:
            return JobOutcome(False, error_kind="InputError", message=f"unreadable {RESULT_FILE}: {exc}")
    err = json.loads((out / ERROR_FILE).read_text(encoding="utf-8"))
    return JobOutcome(False, error_kind=err["kind"], message=err["message"])


# -- the child process ------------------------------------------------------------------


def _exit_with_parent() -> None:
    """Leave as soon as the process that started us is gone (kill -9 of the node)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(70)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def execute(spec: JobSpec, cache: ModelSource | None = None) -> JobResult:
    """Run the pipeline for ``spec`` in this process; return its result (paths relative to ``out_dir``)."""
    from segnode.models.base import RunSettings
    from segnode.node.jobs.pipeline import PipelineRequest, run_pipeline

    settings = RunSettings(device=spec.device, threads=spec.threads,
                           weights_dir=Path(spec.weights_dir) if spec.weights_dir else None,
                           memory_budget_mb=spec.memory_budget_mb)
    request = PipelineRequest(input_path=Path(spec.input_dir), profile=spec.profile, out_dir=Path(spec.out_dir),
                              backend=spec.backend, series_uid=spec.series_uid, seg_type=spec.seg_type,
                              output_format="seg", settings=settings,
                              rtstruct_holes=spec.options.get("rtstruct_holes") or "keyhole",
                              outputs=_job_kinds(spec), **_shared_run(spec), **_superseding(spec),
                              corrected_labels=_corrected_labels(spec), priors=_priors(spec, settings, cache),
                              model_version=str(spec.options.get("model") or "").partition("/")[2] or None)
    result = JobResult.from_pipeline(run_pipeline(request, cache=cache), Path(spec.out_dir))
    return result.with_harvest(harvest(spec, result)) if spec.harvest else result


def _priors(spec: JobSpec, settings: RunSettings, cache: ModelSource | None) -> tuple[PriorResult, ...]:
    """A route with priors: the node's results on earlier studies (node/sources/priors.py).

    A prior the node had no result for was retrieved for this job: it is segmented here first, into
    ``prior-N/`` of the job folder, with the job's profile and backend.  A prior that cannot be read or
    segmented is left out of the report with one warning; the job goes on without it.
    """
    out = []
    for n, prior in enumerate(spec.options.get("priors_found") or (), start=1):
        try:
            out += _prior(spec, n, prior, settings, cache)
        except SegnodeError as exc:
            logger.warning("job %d: prior %d (series %s) left out of the report: %s", spec.job_id, n,
                           prior.get("series_uid"), exc)
    return tuple(out)


def _prior(spec: JobSpec, n: int, prior: dict[str, Any], settings: RunSettings,
           cache: ModelSource | None) -> list[PriorResult]:
    """Prior ``n``: the node's earlier result as is, or the retrieved series segmented into ``prior-N/``."""
    from segnode.node.jobs.pipeline import PipelineRequest, run_pipeline
    from segnode.node.writers.sr_priors import PriorResult

    if prior.get("seg_path"):
        return [PriorResult.from_summary(Path(prior["seg_path"]), Path(prior["summary_path"]),
                                         prior.get("model_version"))]
    request = PipelineRequest(input_path=Path(prior["input_dir"]), profile=spec.profile,
                              out_dir=Path(spec.out_dir) / f"prior-{n}", backend=spec.backend,
                              series_uid=prior["series_uid"], seg_type=spec.seg_type, settings=settings)
    result = run_pipeline(request, cache=cache)
    if result.seg_path is None:
        return []
    return [PriorResult.from_summary(result.seg_path, result.summary_path, result.model_version)]


def _corrected_labels(spec: JobSpec) -> Path | None:
    """A correction job's labels (node/corrections.py): encoded instead of a model's."""
    correction = spec.options.get("correction")
    return Path(correction["labels"]) if isinstance(correction, dict) and correction.get("labels") else None


def _shared_run(spec: JobSpec) -> dict[str, Any]:
    """A multi-profile route's settings (node/jobs/shared_run.py): its profiles, shared folder, combine."""
    profiles = tuple(spec.options.get("profiles") or ())
    if len(profiles) < 2:
        return {}
    shared = spec.options.get("shared_run")
    return {"profiles": profiles, "shared_dir": Path(shared) if shared else None,
            "combine": bool(spec.options.get("combine"))}


def _superseding(spec: JobSpec) -> dict[str, Any]:
    """A superseding job's result version and the objects it rejects (node/supersede.py); none for a first result."""
    from segnode.node.writers.rejection import RejectedObject

    version = int(spec.options.get("result_version") or 1)
    if version == 1:
        return {}
    return {"version": version,
            "rejects": tuple(RejectedObject.from_json(o) for o in spec.options.get("rejects") or ())}


def _job_kinds(spec: JobSpec) -> tuple[str, ...]:
    """Output kinds for this job (route/destinations, see node.outputs); harvesting needs the SEG."""
    kinds = tuple(spec.options.get("outputs") or ("seg",))
    return kinds if not spec.harvest or "seg" in kinds else ("seg", *kinds)


def harvest(spec: JobSpec, result: JobResult) -> Harvest:
    """Put a de-identified copy of the series and its SEG into the route's dataset.

    Harvesting never fails the clinical job: the SEG still goes to the PACS;
    a quarantined series or a store error is reported in the result.  The
    record and the log never name the case ID: the job folder holds the
    original series UID (``job.json``), and the pair would link a store case to
    a patient without the key.
    """
    from segnode.storage.dataset import DatasetStore
    from segnode.storage.dataset import harvest as harvest_case
    from segnode.storage.pseudonyms import load_secret

    dataset = str(spec.harvest)
    try:
        if spec.dataset_store is None:
            raise InputError("the job names no dataset store")
        store = DatasetStore.open(Path(spec.dataset_store),
                                  load_secret(Path(spec.deid_secret_file) if spec.deid_secret_file else None))
        case = harvest_case(store, dataset=dataset, series_files=sorted(Path(spec.input_dir).iterdir()),
                            seg_path=Path(spec.out_dir) / result.seg.path, profile=spec.profile,
                            backend=result.backend_used, model_version=result.model_version,
                            weights_hash=result.weights_hash, rule=spec.rule or "", calling_ae=spec.calling_ae,
                            corrected=_corrected_labels(spec) is not None)
    except SegnodeError as exc:  # quarantined, no secret, store unwritable
        logger.warning("job %d: not harvested into %s: %s", spec.job_id, dataset, exc)
        return Harvest(dataset, "not harvested", str(exc))
    logger.info("job %d: harvested into %s (%s labels)", spec.job_id, dataset, case.label_status.value)
    return Harvest(dataset, "harvested")


def run_one(spec_path: Path, cache: ModelSource | None) -> int:
    """Run the job in ``spec_path``, logging into the job's ``worker.log``."""
    spec = JobSpec.from_json(spec_path.read_text(encoding="utf-8"))
    out = Path(spec.out_dir)
    sys.stdout.flush()
    sys.stderr.flush()
    with open(out / "worker.log", "ab", buffering=0) as log:
        for fd in (1, 2):  # this job's log: library prints and tracebacks of a crash included
            os.dup2(log.fileno(), fd)
        try:
            result = execute(spec, cache)
        except SegnodeError as exc:
            logger.error("job %d failed: %s", spec.job_id, exc)
            _write_json(out / ERROR_FILE, {"kind": type(exc).__name__, "message": str(exc)})
            return exc.exit_code
        _write_text(out / RESULT_FILE, result.to_json())
        logger.info("job %d: SEG %s", spec.job_id, result.seg.path)
        return 0


def serve(lines: Any = None) -> int:
    """Worker loop: a spec path per input line, ``done`` per output line, until EOF."""
    from segnode.models.cache import ModelCache
    from segnode.node.ops.logs import configure

    replies = os.fdopen(os.dup(1), "w")  # the protocol channel; fd 1 itself goes to job logs
    configure(1)
    _exit_with_parent()
    cache = ModelCache()
    for line in lines or sys.stdin:
        run_one(Path(line.strip()), cache)
        replies.write("done\n")
        replies.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args == ["--serve"]:
        return serve()
    from segnode.node.ops.logs import configure

    configure(1)
    return run_one(Path(args[0]), cache=None)  # one job, from the command line


if __name__ == "__main__":
    sys.exit(main())
