"""Re-processing: finished jobs run again with another model; the new results supersede the old ones.

``segnode reprocess --model NAME[/VERSION] --since DATE [--route RULE]``
picks every ``done`` job created since DATE (of rule RULE), the newest per
series and profile, and adds a ``complete`` job beside it on the same route
with the backend NAME, superseding it (``options["supersedes"]``, acted on
by the worker and the dispatcher as for a late instance: a newer result
version and, where a destination takes them, IOCM rejection notes for the
old objects; :mod:`segnode.node.supersede`).  A series housekeeping already
removed from the spool is fetched again from a source when one is given
(``--from``, :func:`refetch`: the series starts over in the index and its
waiting job is pinned on the old job's route with the new backend), else
reported and left.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from segnode.errors import InputError
from segnode.node.sources.fetch import Fetcher
from segnode.node.sources.pin import Pin
from segnode.node.sources.source import SeriesMatch
from segnode.storage.index import Index, Job

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Model:
    """``NAME[/VERSION]``: the backend, and the fine-tuned version of the profile's model it runs (nnU-Net, MONAI)."""

    name: str
    version: str | None = None

    @classmethod
    def parse(cls, text: str) -> Model:
        from segnode.profiles.schema import VERSIONED, Backend

        name, _, version = text.partition("/")
        known = [b.value for b in Backend]
        if name not in known:
            raise InputError(f"unknown model {name!r} (known: {', '.join(known)})")
        if version and Backend(name) not in VERSIONED:
            raise InputError(f"model {name} has no fine-tuned versions (nnunet/VERSION or monai/VERSION)")
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
    return index.newest_done(since=since, rule=rule)


def reprocess(index: Index, job: Job, model: Model, *, by: str) -> Reprocessed:
    """One finished job run again with ``model``; its result superseded by the new job's."""
    info = index.series(job.series_uid)
    if info is None or info.purged_at is not None or job.profile is None or job.rule is None:
        return Reprocessed(job.job_id, job.series_uid, None, "series no longer in the spool: left as it is "
                           "(--from SOURCE fetches it again)")
    options = _options(job, model) | {"supersedes": [job.job_id]}
    new = index.add_complete_job(job, reason=f"re-processed with model {model} by {by}; supersedes job {job.job_id} "
                                            "once encoded", rule=job.rule, profile=job.profile, backend=model.name,
                                 destinations=job.destinations, harvest=job.harvest, options=options)
    logger.info("job %d re-processed with model %s as job %d", job.job_id, model, new)
    return Reprocessed(job.job_id, job.series_uid, new, f"job {new} with model {model}")


def refetch(index: Index, fetcher: Fetcher, job: Job, model: Model) -> Reprocessed:
    """A finished job whose series left the spool: fetched again by ``fetcher``, segmented with ``model``.

    The retrieved series' waiting job is pinned on the old job's route with the
    new backend; the pin supersedes the series' earlier results of the profile,
    the old job's among them (:func:`segnode.node.sources.pin.apply_pin`).
    """
    if job.profile is None or job.rule is None:
        return Reprocessed(job.job_id, job.series_uid, None, "never routed: left as it is")
    info = index.series(job.series_uid)
    pin = Pin(job.rule, job.profile, model.name, job.destinations, job.harvest, _options(job, model))
    outcome = fetcher.retrieve(SeriesMatch(job.study_uid, job.series_uid, info.modality if info else None), pin)
    if not outcome.ok:
        return Reprocessed(job.job_id, job.series_uid, None, f"not fetched again: {outcome.error}")
    if outcome.pinned is None:
        return Reprocessed(job.job_id, job.series_uid, None, "fetched again, but no job of it was waiting to pin")
    logger.info("job %d re-processed with model %s as job %d (series fetched again)", job.job_id, model,
                outcome.pinned)
    return Reprocessed(job.job_id, job.series_uid, outcome.pinned,
                       f"fetched again from {fetcher.source.name}: job {outcome.pinned} with model {model}")


def _options(job: Job, model: Model) -> dict[str, object]:
    """The old job's route options for the new one, naming the model asked for."""
    options = {k: v for k, v in job.options.items() if k not in ("supersedes", "shared_run", "model")}
    return options | {"model": str(model)}
