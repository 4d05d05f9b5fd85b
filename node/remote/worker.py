"""A remote worker's job: fetch the series from the node, run it, post the result back.

Runs inside a Celery worker process (:mod:`segnode.node.cli.worker`), one job at a
time, on a machine that shares nothing with the node but HTTP: the series
comes by WADO-RS with the job's token (so do its priors, :func:`fetch_priors`,
into the job's folder), the job runs through the same code as a
local worker (:func:`segnode.node.jobs.worker.execute`, models kept warm in this process's
:class:`~segnode.models.cache.ModelCache`), and every file of the output
folder goes back in one multipart POST to ``/remote/v1/jobs/{id}/result``
with the job's :class:`~segnode.node.jobs.result.JobResult`, as is (its paths
are relative to the output folder already).  A job the node
no longer waits for (HTTP 410, or the node acknowledged another result) is
dropped; a node that cannot be reached, answers 5xx or breaks off its answer (it
is restarting) is tried again with backoff, fetching as posting, for up to
``retry_s``; then the job is given up here with one line in the log, and
the node enqueues it again after its result timeout.

The state folder (``--state-dir``, private: 0700) holds only the jobs in
progress, each in ``jobs/<pid>-job-<id>-attempt-<n>/`` (series, outputs): a
job's folder is removed when it ends, :func:`prepare_state` empties ``jobs/``
when the worker starts, and each job first removes the folders of pool
processes that are gone (a job whose process was killed), so a worker killed
in the middle of a job and started again keeps no patient data behind.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import requests
import urllib3
from segnode.errors import InputError, SegnodeError
from segnode.node.http_in.multipart import (
    LengthBody,
    MediaType,
    encode_parts,
    iter_parts,
    new_boundary,
)
from segnode.node.http_in.stow import read_file_meta
from segnode.node.jobs.worker import JobSpec, execute

if TYPE_CHECKING:
    from segnode.models.cache import ModelCache
from segnode.uids import check_uid, is_valid_uid

logger = logging.getLogger(__name__)
T = TypeVar("T")

JOBS = "jobs"  # the state folder's one subfolder: the jobs in progress
_CACHE: ModelCache | None = None  # this process's warm models (a Celery pool process keeps it between jobs)


@dataclass(frozen=True)
class WorkerSettings:
    """What a worker machine decides for itself: its folders, device and name."""

    state_dir: Path
    name: str
    weights_dir: Path | None = None
    node_url: str | None = None  # overrides the URL in the message (a node behind NAT or a proxy)
    device: str = "auto"
    threads: int | None = None
    max_series_bytes: int = 8 * 1024**3
    retry_s: float = 600.0
    http_timeout_s: float = 120.0


def _cache() -> ModelCache:
    global _CACHE
    if _CACHE is None:
        from segnode.models.cache import ModelCache

        _CACHE = ModelCache()
    return _CACHE


def prepare_state(state_dir: Path) -> Path:
    """Make the state folder private (0700) and empty its jobs folder (before any job runs); return it."""
    if not state_dir.exists():
        state_dir.mkdir(parents=True, mode=0o700)
    state_dir.chmod(0o700)  # it holds series in transit: patient data
    jobs = state_dir / JOBS
    shutil.rmtree(jobs, ignore_errors=True)
    jobs.mkdir(mode=0o700)
    return jobs


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process now holds that pid
        return True
    return True


def sweep_orphans(jobs: Path) -> list[str]:
    """Remove the job folders of processes that are gone (killed mid-job); return their names."""
    removed = []
    for folder in jobs.iterdir() if jobs.is_dir() else ():
        owner = folder.name.split("-", 1)[0]
        if not owner.isdigit() or not _alive(int(owner)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder.name)
    return removed


class NodeNotAnswering(Exception):
    """The node could not be reached, answered 5xx, 408 or 429, or its answer broke off: worth another try."""


#: what a node that is restarting or overloaded does to a request; :func:`with_retries` tries again
TRANSIENT = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
             urllib3.exceptions.HTTPError, NodeNotAnswering)


def handle(message: dict[str, Any], settings: WorkerSettings) -> str:
    """Run one job message; return ``done``, ``dropped`` (the node no longer wants it) or ``failed``.

    ``failed``: the node could not be reached for longer than ``retry_s``, or
    answered what no node sends; one line says so, and the node enqueues the job
    again after its result timeout.
    """
    job_id, attempt = int(message["job_id"]), int(message["attempt"])
    study, series = check_uid(message.get("study_uid"), "StudyInstanceUID"), check_uid(
        message.get("series_uid"), "SeriesInstanceUID")
    jobs = settings.state_dir / JOBS
    for name in sweep_orphans(jobs):
        logger.warning("removed %s, left by a worker process that was killed", name)
    work = jobs / f"{os.getpid()}-job-{job_id}-attempt-{attempt}"
    shutil.rmtree(work, ignore_errors=True)
    (work / "input").mkdir(parents=True)
    base = (settings.node_url or str(message["node_url"])).rstrip("/")
    session = requests.Session()
    session.headers.update({"Authorization": f"Bearer {message['token']}", "X-Segnode-Worker": settings.name})
    try:
        started = time.monotonic()
        if not with_retries(job_id, "fetch the series", settings,
                            lambda: fetch_series(session, base, study, series, work / "input", settings)):
            logger.info("job %d attempt %d: the node no longer waits for it; dropped", job_id, attempt)
            return "dropped"
        spec = with_priors(message["spec"], fetch_priors(session, base, job_id, message["spec"], work, settings))
        fetched = time.monotonic()
        record = run(spec, work, settings)
        logger.info("job %d attempt %d: fetched in %.2f s, ran in %.2f s", job_id, attempt, fetched - started,
                    time.monotonic() - fetched)
        return with_retries(job_id, "post the result", settings,
                            lambda: post_result(session, base, job_id, record, work / "out", settings))
    except SegnodeError as exc:
        logger.error("job %d attempt %d given up on this worker: %s; the node enqueues it again after its result "
                     "timeout", job_id, attempt, exc)
        return "failed"
    finally:
        shutil.rmtree(work, ignore_errors=True)


def with_retries(job_id: int, what: str, settings: WorkerSettings, call: Callable[[], T]) -> T:
    """``call()``, tried again with backoff while the node does not answer, for up to ``retry_s``."""
    deadline, delay = time.monotonic() + settings.retry_s, 0.5
    while True:
        try:
            return call()
        except TRANSIENT as exc:
            logger.warning("job %d: could not %s (%s: %s); retrying", job_id, what, type(exc).__name__, exc)
        if time.monotonic() + delay > deadline:
            raise SegnodeError(f"job {job_id}: could not {what} within {settings.retry_s:.0f} s: "
                               "the node did not answer")
        time.sleep(delay)
        delay = min(delay * 2, 10.0)


class _NodeAnswer(LengthBody):
    """The node's WADO-RS answer: one that ends before its Content-Length broke off (the node stopped)."""

    def read(self) -> bytes:
        try:
            return super().read()
        except InputError as exc:
            raise NodeNotAnswering(str(exc)) from exc


def fetch_series(session: requests.Session, base: str, study: str, series: str, folder: Path,
                 settings: WorkerSettings) -> bool:
    """WADO-RS the series into ``folder`` (one Part 10 file per instance); False if the job is gone."""
    for old in folder.iterdir():  # what an attempt that broke off wrote
        old.unlink()
    url = f"{base}/dicomweb/studies/{study}/series/{series}"
    with session.get(url, stream=True, timeout=settings.http_timeout_s,
                     headers={"Accept": 'multipart/related; type="application/dicom"'}) as response:
        if not _answered(response):
            return False
        if response.status_code != 200:
            raise InputError(f"the node answered the series' WADO-RS with HTTP {response.status_code}")
        media = MediaType.parse(response.headers.get("Content-Type"))
        length = int(response.headers.get("Content-Length", "0"))
        if media.value != "multipart/related" or not 0 < length <= settings.max_series_bytes:
            raise InputError(f"unexpected WADO-RS answer ({media.value}, {length} bytes)")
        for part in iter_parts(_NodeAnswer(response.raw, length), media.params.get("boundary", ""),
                               max_part_bytes=settings.max_series_bytes, max_parts=100000):
            meta = read_file_meta(part.body)
            if meta is None or not is_valid_uid(meta.sop_instance_uid):
                raise InputError("the node sent a part that is not a DICOM file with a valid SOP Instance UID")
            (folder / f"{meta.sop_instance_uid}.dcm").write_bytes(part.body)
    return True


#: what a prior keeps of the node's description (node/sources/priors.py): never the node's paths
PRIOR_FACTS = ("study_uid", "series_uid", "study_date", "model_version", "job_id")


def fetch_priors(session: requests.Session, base: str, job_id: int, spec: dict[str, Any], work: Path,
                 settings: WorkerSettings) -> list[dict[str, Any]]:
    """Fetch each of the job's priors (``priors_found``) into ``work/priors/N/``; the priors to run with.

    A prior series the node retrieved comes by WADO-RS with the job's token,
    as the job's series does; the node's earlier result (its SEG and summary)
    from ``/remote/v1/jobs/{id}/priors/N/seg`` and ``.../summary``.  The
    node's paths are never used here: each prior gets this folder's paths.  A
    prior that cannot be fetched is left out, with one warning: the report goes
    without it, the job goes on.
    """
    options = spec.get("options") or {}
    out = []
    for number, prior in enumerate(options.get("priors_found") or (), start=1):
        try:
            out.append(_fetch_prior(session, base, job_id, number, prior, work / "priors" / str(number), settings))
            logger.info("job %d: prior %d fetched (%s)", job_id, number,
                        "the node's result" if "seg_path" in out[-1] else "its series")
        except SegnodeError as exc:
            series = prior.get("series_uid") if isinstance(prior, dict) else None
            logger.warning("job %d: prior %d (series %s) left out of the report: %s", job_id, number, series, exc)
    return out


def with_priors(spec: dict[str, Any], priors: list[dict[str, Any]]) -> dict[str, Any]:
    """``spec`` with the priors as fetched here in place of the node's (unchanged when it has none)."""
    options = spec.get("options") or {}
    if "priors_found" not in options:
        return spec
    return {**spec, "options": {**options, "priors_found": priors}}


def _fetch_prior(session: requests.Session, base: str, job_id: int, number: int, prior: object, folder: Path,
                 settings: WorkerSettings) -> dict[str, Any]:
    if not isinstance(prior, dict):
        raise InputError("the node described it as no JSON object")
    study = check_uid(prior.get("study_uid"), "StudyInstanceUID")
    series = check_uid(prior.get("series_uid"), "SeriesInstanceUID")
    facts = {key: prior[key] for key in PRIOR_FACTS if key in prior}
    if prior.get("seg_path"):
        files = {"seg": folder / "seg.dcm", "summary": folder / "summary.json"}
        for kind, target in files.items():
            fetch = partial(fetch_prior_file, session, base, job_id, number, kind, target, settings)
            if not with_retries(job_id, f"fetch prior {number}'s {kind}", settings, fetch):
                raise InputError(f"the node refused its {kind}")
        return {**facts, "seg_path": str(files["seg"]), "summary_path": str(files["summary"])}
    if prior.get("input_dir"):
        (folder / "input").mkdir(parents=True)
        fetch = partial(fetch_series, session, base, study, series, folder / "input", settings)
        if not with_retries(job_id, f"fetch prior {number}'s series", settings, fetch):
            raise InputError("the node refused its series")
        return {**facts, "input_dir": str(folder / "input")}
    raise InputError("the node named neither a result nor a series for it")


def fetch_prior_file(session: requests.Session, base: str, job_id: int, number: int, kind: str, target: Path,
                     settings: WorkerSettings) -> bool:
    """The SEG (``seg``) or summary of the job's prior ``number``, the node's earlier result, into ``target``.

    False if the node refuses it (no such prior, or the job is gone).
    """
    with session.get(f"{base}/remote/v1/jobs/{job_id}/priors/{number}/{kind}", stream=True,
                     timeout=settings.http_timeout_s) as response:
        if not _answered(response):
            return False
        length = int(response.headers.get("Content-Length", "0"))
        if response.status_code != 200 or not 0 < length <= settings.max_series_bytes:
            raise InputError(f"unexpected answer for prior {number}'s {kind} (HTTP {response.status_code}, "
                             f"{length} bytes)")
        data = response.content
    if len(data) != length:
        raise NodeNotAnswering(f"prior {number}'s {kind} broke off")
    if kind == "seg" and read_file_meta(data) is None:
        raise InputError(f"prior {number}'s SEG is not a DICOM file")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return True


def _busy(status: int) -> bool:
    return status >= 500 or status in (408, 429)


def _answered(response: requests.Response) -> bool:
    """False if the node refuses the job's token (the job is gone); :class:`NodeNotAnswering` if it is busy."""
    if response.status_code in (401, 403, 404, 410):
        return False
    if _busy(response.status_code):
        raise NodeNotAnswering(f"HTTP {response.status_code}")
    return True


def run(spec_data: dict[str, Any], work: Path, settings: WorkerSettings) -> dict[str, Any]:
    """Run the job here; the record to post: ``ok``, the worker's name, and the result or the error."""
    out = work / "out"
    options = dict(spec_data.get("options") or {})
    if options.get("shared_run"):
        options["shared_run"] = str(work / "shared")
    spec = JobSpec(**{**spec_data, "input_dir": str(work / "input"), "out_dir": str(out), "device": settings.device,
                      "threads": settings.threads, "options": options, "harvest": None, "dataset_store": None,
                      "deid_secret_file": None,
                      "weights_dir": str(settings.weights_dir) if settings.weights_dir else None})
    if spec_data.get("harvest"):
        logger.warning("job %d: harvesting is not done on remote workers (route's harvest %s skipped)",
                       spec.job_id, spec_data["harvest"])
    out.mkdir(parents=True, exist_ok=True)
    try:
        result = execute(spec, _cache())
    except SegnodeError as exc:
        logger.error("job %d failed: %s", spec.job_id, exc)
        return {"ok": False, "error_kind": type(exc).__name__, "message": str(exc), "worker": settings.name}
    return {"ok": True, "result": result.to_dict(), "worker": settings.name}


def post_result(session: requests.Session, base: str, job_id: int, record: dict[str, Any], out: Path,
                settings: WorkerSettings) -> str:
    """POST the record and the output files: ``done``, or ``dropped`` if the node refuses or has another result."""
    files = sorted(p for p in out.rglob("*") if p.is_file()) if out.is_dir() else []
    parts = [({"Content-Type": "application/json"}, json.dumps(record).encode("utf-8"))]
    parts += [({"Content-Type": "application/octet-stream", "Content-Location": p.relative_to(out).as_posix()},
               p.read_bytes()) for p in files]
    boundary = new_boundary()
    response = session.post(f"{base}/remote/v1/jobs/{job_id}/result", data=b"".join(encode_parts(parts, boundary)),
                            timeout=settings.http_timeout_s,
                            headers={"Content-Type": f"multipart/related; boundary={boundary}"})
    if _busy(response.status_code):
        raise NodeNotAnswering(f"HTTP {response.status_code}")
    if response.status_code != 200:
        logger.error("job %d: the node refused the result: HTTP %d %s", job_id, response.status_code,
                     response.text[:200])
        return "dropped"
    answer = response.json()
    logger.info("job %d: result %s by the node (%s)", job_id,
                "accepted" if answer.get("accepted") else "already known, ignored", answer.get("state"))
    return "done" if answer.get("accepted") else "dropped"
