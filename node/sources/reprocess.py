"""Re-processing: finished jobs run again with another model; the new results supersede the old ones.

``segnode reprocess --model NAME[/VERSION] --since DATE [--route RULE]``
picks every ``done`` job created since DATE (of rule RULE), the newest per
series and profile, and adds a ``complete`` job beside it on the same route
with the backend NAME, superseding it (``options["supersedes"]``, acted on
by the worker and the dispatcher as for a late instance: a newer result
version and, where a destination takes them, IOCM rejection notes for the
old objects; :mod:`segnode.node.supersede`).  The series must still be in the
spool: a series already purged is reported and left (re-fetching it is not
done yet: the index keeps the purged instances' rows, so the store path would
take them for duplicates).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from segnode.errors import InputError
from segnode.storage.index import Index, Job, JobState

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Model:
    """``NAME[/VERSION]``: the backend, and the version asked for (recorded on the job)."""

    name: str
    version: str | None = None

    @classmethod
    def parse(cls, text: str) -> Model:
        from segnode.profiles.schema import Backend

        name, _, version = text.partition("/")
        known = [b.value for b in Backend]
        if name not in known:
            raise InputError(f"unknown model {name!r} (known: {', '.join(known)})")
        return cls(name, version or None)

    def __str__(self) -> str:
        return self.name + (f"/{self.version}" if self.version else "")


@dataclass(frozen=True)
class Reprocessed:
    old_job: int
    series_uid: str
    new_job: int | None
    note: str


def candidates(index: Index, *, since: float, rule: str | None) -> list[Job]:
    """The newest ``done`` job per series and profile created since ``since`` (of ``rule``)."""
    newest: dict[tuple[str, str | None], Job] = {}
    for job in index.jobs(JobState.DONE, limit=1_000_000):
        if job.created_at < since or (rule is not None and job.rule != rule):
            continue
        key = (job.series_uid, job.profile)
        if key not in newest or job.job_id > newest[key].job_id:
            newest[key] = job
    return sorted(newest.values(), key=lambda j: j.job_id)


def reprocess(index: Index, job: Job, model: Model, *, by: str) -> Reprocessed:
    """One finished job run again with ``model``; its result superseded by the new job's."""
    info = index.series(job.series_uid)
    if info is None or info.purged_at is not None or job.profile is None or job.rule is None:
        return Reprocessed(job.job_id, job.series_uid, None, "series no longer in the spool: left as it is")
    options = {k: v for k, v in job.options.items() if k not in ("supersedes", "shared_run", "model")}
    options |= {"supersedes": [job.job_id], "model": str(model)}
    new = index.add_complete_job(job, reason=f"re-processed with model {model} by {by}; supersedes job {job.job_id} "
                                            "once encoded", rule=job.rule, profile=job.profile, backend=model.name,
                                 destinations=job.destinations, harvest=job.harvest, options=options)
    logger.info("job %d re-processed with model %s as job %d", job.job_id, model, new)
    return Reprocessed(job.job_id, job.series_uid, new, f"job {new} with model {model}")
