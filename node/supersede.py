"""What a superseding job is told of the result it replaces: its version, and the objects to reject.

A job whose ``options["supersedes"]`` lists earlier jobs of its series (a late
instance re-opened it, :mod:`segnode.node.sweep`) makes a newer version of
their result.  Per profile:

* :func:`result_version`: 1 for a first result; one more than the highest
  version among the superseded jobs of the same profile (each of which
  computed its own the same way), so the number is deterministic for a chain
  of late instances: v1 → v2 → v3;
* :func:`rejected_objects`: every DICOM object those jobs encoded (SEG,
  RTSTRUCT, overlay images, SR; not their own rejection notes), for the IHE
  IOCM Rejection Note the worker writes (:mod:`segnode.node.writers.rejection`)
  and a destination with ``rejection_notes: true`` is sent after the new result.

:func:`supersede_options` is what :meth:`segnode.node.service.Service.job_spec`
adds to a job's options (``result_version``, ``rejects``).
"""

from __future__ import annotations

from segnode.output_kinds import REJECTION_NOTE
from segnode.storage.index import Index, Job

#: the superseded jobs a version is computed through at most (a chain of late instances is short)
MAX_CHAIN = 64


def superseded_jobs(index: Index, job: Job) -> list[Job]:
    """The jobs ``job`` supersedes that made a result of its profile."""
    out = []
    for earlier in job.options.get("supersedes") or ():
        found = index.job(int(earlier))
        if found is not None and found.profile == job.profile:
            out.append(found)
    return out


def result_version(index: Index, job: Job, depth: int = 0) -> int:
    """1 for a first result; else one more than the highest version it supersedes (same profile).

    A superseded job that made no result (superseded before it ran or as it
    ended) has no version: the count goes through it, so the PACS sees v1, v2, ...
    """
    return 1 + _highest(index, job, depth)


def _highest(index: Index, job: Job, depth: int) -> int:
    if depth >= MAX_CHAIN:
        return 0
    return max((result_version(index, e, depth + 1) if e.outputs else _highest(index, e, depth + 1)
                for e in superseded_jobs(index, job)), default=0)


def rejected_objects(index: Index, job: Job) -> list[dict[str, str]]:
    """The DICOM objects of the superseded result(s), as :class:`~segnode.node.writers.rejection.RejectedObject` JSON."""
    out: dict[str, dict[str, str]] = {}
    for earlier in superseded_jobs(index, job):
        for obj in earlier.outputs:
            if obj.get("kind") == REJECTION_NOTE or not obj.get("sop_instance_uid") or not obj.get("sop_class_uid"):
                continue
            out[obj["sop_instance_uid"]] = {"sop_class_uid": obj["sop_class_uid"],
                                            "sop_instance_uid": obj["sop_instance_uid"],
                                            "series_instance_uid": obj["series_instance_uid"]}
    return list(out.values())


def supersede_options(index: Index, job: Job) -> dict[str, object]:
    """``result_version`` and ``rejects`` for a superseding job's options; nothing for a first result."""
    version = result_version(index, job)
    if version == 1:
        return {}
    rejects = rejected_objects(index, job)
    correction = job.options.get("correction")
    if isinstance(correction, dict):  # a correction (node/corrections.py) rejects only what a destination stored
        rejects = [o for o in rejects if o["sop_instance_uid"] in set(correction.get("sent") or ())]
    return {"result_version": version, "rejects": rejects}
