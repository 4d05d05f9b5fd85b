"""Corrections: a SEG stored back to the node that references a job's source series replaces that job's result.

A SEG instance stored to the node (STOW-RS or C-STORE: the store path calls
:meth:`Corrections.stored_seg` before it writes the instance; ``segnode jobs
correct N FILE`` calls :meth:`Corrections.correct`) whose Referenced Series
Sequence names the source series of a job with a result is a **correction** of
the latest such job whose organ profile knows its segments.  It is checked
(:mod:`segnode.node.correction_seg`: geometry, segments) and then:

* its labels are written to ``results/corrections/<SEG SOP Instance UID>/``
  (``labels.npz``, the SEG as received, ``correction.json`` with the figures);
* a **correction job** is opened on the same series, route and destinations
  (``options["correction"]``, superseding the corrected job): a worker encodes
  the corrected labels with the node's own writers (every output kind the route
  asks for, "SEG lungs (correction) v2"), without the route's review (the
  correction is the reviewer's approval, by its author), harvests the case
  into the route's dataset with label status ``corrected``, and the node sends
  it as any result;
* the corrected job: held, it becomes ``superseded`` at once and is never sent;
  already sent, it is superseded once the correction is encoded, and the IOCM
  Rejection Note of the correction names exactly the objects a destination
  stored (``options["correction"]["sent"]``);
* audited: the correction job's ``complete`` event names the corrected job, who
  corrected it, and per segment the Dice against the model's result and the
  volume change in mL and %.

A SEG the node wrote itself (its SOP Instance UID is an output of a job of its series, as when
a PACS forwards the whole study back) is no correction: it is stored as any instance.  A SEG
that references no job, lies off the source grid or names a segment
the profile does not know is refused (:data:`REFUSED`: 0x0110 with a short
comment, counted under its own reason); the file as received is kept in
``results/corrections/refused/``, and nothing else changes.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from segnode.errors import SegnodeError
from segnode.models.measurements import mask_volume_ml
from segnode.models.metrics import dice
from segnode.models.series import load_series
from segnode.models.volume import Volume
from segnode.node.config import NodeConfig
from segnode.node.correction_seg import NO_JOB, PENDING, UNREADABLE, CorrectionRefused, labels_on_grid, segment_values
from segnode.node.events import EventSink, JobMoved
from segnode.node.status import Refusal, Status
from segnode.profiles import Profile, load_profile
from segnode.storage.index import DeliveryState, Index, Job, JobState
from segnode.storage.spool import Spool
from segnode.uids import check_uid

logger = logging.getLogger(__name__)

#: Segmentation Storage and Label Map Segmentation Storage: the SOP classes a correction may come as
SEG_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7"})
#: the states of a job whose result a correction may replace
CORRECTABLE = (JobState.ENCODED, JobState.SENDING, JobState.DONE, JobState.HELD, JobState.DEAD_LETTER)
#: the route options a correction job does not take over: no review, no shared model run, its own supersede chain
NOT_CARRIED = frozenset({"review", "supersedes", "shared_run", "profiles", "combine", "result_version", "rejects",
                         "correction"})
NEWEST = 2**62


@dataclass(frozen=True)
class SegmentChange:
    """One tissue: the corrected mask against the model's."""

    tissue: str
    dice: float
    model_ml: float
    corrected_ml: float

    def text(self) -> str:
        delta = self.corrected_ml - self.model_ml
        pct = 100.0 * delta / self.model_ml if self.model_ml else 0.0
        return f"{self.tissue} Dice {self.dice:.3f}, {delta:+.1f} mL ({pct:+.1f}%)"


@dataclass(frozen=True)
class Accepted:
    """A correction taken: the job it opened, the job it corrects, who, and the figures."""

    job_id: int
    of_job: int
    author: str
    changes: tuple[SegmentChange, ...]
    held: bool

    def reason(self) -> str:
        approval = " (counts as the review's approval)" if self.held else ""
        return (f"correction of job {self.of_job} by {self.author}{approval}: "
                + "; ".join(c.text() for c in self.changes))


def referenced_series(seg: Dataset) -> list[str]:
    return [str(item.get("SeriesInstanceUID", "")) for item in seg.get("ReferencedSeriesSequence") or []]


class Corrections:
    """Recognises, checks and applies corrections; one per node (the store path's hook and the CLI)."""

    def __init__(self, config: NodeConfig, index: Index, spool: Spool, emit: EventSink) -> None:
        self.config, self.index, self.spool, self.emit = config, index, spool, emit
        self.root = config.results_dir / "corrections"

    # -- the store path's hook ------------------------------------------------------------
    def stored_seg(self, part10: bytes, author: str) -> Refusal | None:
        """A SEG arriving at the store path: ``None`` (taken, store it) or the refusal to answer."""
        try:
            seg = dcmread(BytesIO(part10))
            if self.is_ours(seg):  # our own result coming back (a PACS forwarding the study): stored as it is
                logger.info("SEG %s is one of the node's own results: stored, not a correction", seg.SOPInstanceUID)
                return None
            self.correct(seg, author, original=part10)
        except CorrectionRefused as exc:
            self._keep_refused(part10, seg_uid(part10))
            logger.warning("correction refused: %s", exc.message)
            return Refusal(Status.PROCESSING_FAILURE, exc.message[:64], exc.reason)
        except (InvalidDicomError, ValueError, EOFError, AttributeError, KeyError, TypeError, IndexError) as exc:
            self._keep_refused(part10, seg_uid(part10))
            return Refusal(Status.PROCESSING_FAILURE, f"correction unreadable ({type(exc).__name__})"[:64],
                           UNREADABLE)
        return None

    def is_ours(self, seg: Dataset) -> bool:
        """Whether ``seg`` is an object a job of its series wrote (same SOP Instance UID), current or superseded."""
        series = set(referenced_series(seg))
        jobs = [j for uid in series for j in self.index.earlier_results(uid, NEWEST)]
        jobs += [j for j in self.index.jobs(JobState.SUPERSEDED, limit=10_000) if j.series_uid in series]
        uid = str(seg.get("SOPInstanceUID", ""))
        return any(o.get("sop_instance_uid") == uid for j in jobs for o in j.outputs)

    def _keep_refused(self, part10: bytes, name: str) -> None:
        folder = self.root / "refused"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.dcm").write_bytes(part10)

    # -- a correction -----------------------------------------------------------------------
    def correct(self, seg: Dataset, author: str, *, job_id: int | None = None,
                original: bytes | None = None) -> Accepted:
        """Check ``seg`` against its job (``job_id``, else found by its references) and open the correction job."""
        job, profile = self.job_for(seg, job_id)
        volume = self._source(job)
        corrected = labels_on_grid(seg, volume, profile)
        model = labels_on_grid(dcmread(job.file(job.seg_path or "")), volume, profile)
        changes = tuple(_change(volume, name, model == value, corrected == value)
                        for value, name in profile.label_values().items())
        folder = self.root / check_uid(str(seg.get("SOPInstanceUID", "")), "SOPInstanceUID")
        folder.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(folder / "labels.npz", labels=corrected)
        if original is not None:
            (folder / "correction.dcm").write_bytes(original)
        held = job.state is JobState.HELD
        accepted = self._open_job(job, seg, author, changes, folder, held)
        (folder / "correction.json").write_text(json.dumps(
            {"job_id": accepted.job_id, "of_job": job.job_id, "author": author, "held": held,
             "changes": [asdict(c) for c in changes]}, indent=2), encoding="utf-8")
        return accepted

    def job_for(self, seg: Dataset, job_id: int | None) -> tuple[Job, Profile]:
        """The job ``seg`` corrects and its profile: the newest one with a result whose profile knows the segments."""
        series = referenced_series(seg)
        if job_id is not None:
            job = self.index.job(job_id)
            if job is None or job.state not in CORRECTABLE or job.series_uid not in series:
                raise CorrectionRefused(f"job {job_id} has no result for the SEG's series"[:64], reason=NO_JOB)
            candidates = [job]
        else:
            candidates = [j for uid in series for j in self.index.earlier_results(uid, NEWEST)]
        last: CorrectionRefused | None = None
        for job in sorted(candidates, key=lambda j: -j.job_id):
            if job.profile is None or not job.seg_path:
                continue
            profile = load_profile(job.profile)
            try:
                segment_values(seg, profile)
            except CorrectionRefused as exc:
                last = exc
                continue
            self._none_pending(job)
            return job, profile
        if last is not None:
            raise last
        raise CorrectionRefused("the SEG references no job's source series", reason=NO_JOB)

    def _none_pending(self, job: Job) -> None:
        """One correction of a job at a time: the next one corrects the correction once it is encoded."""
        for state in (JobState.COMPLETE, JobState.SEGMENTING):
            for other in self.index.jobs(state, limit=1000):
                if (other.options.get("correction") or {}).get("of_job") == job.job_id:
                    raise CorrectionRefused(f"job {other.job_id} is still encoding a correction of job {job.job_id}",
                                            reason=PENDING)

    def _source(self, job: Job) -> Volume:
        info = self.index.series(job.series_uid)
        if info is None or info.purged_at is not None:
            raise CorrectionRefused("the source series is no longer on the node", reason=NO_JOB)
        try:
            return load_series(self.spool.series_dir(info.study_uid, info.series_uid), info.series_uid)
        except SegnodeError as exc:
            raise CorrectionRefused("the source series cannot be read", reason=UNREADABLE) from exc

    def _open_job(self, job: Job, seg: Dataset, author: str, changes: tuple[SegmentChange, ...], folder: Path,
                  held: bool) -> Accepted:
        sent = sorted({o.sop_instance_uid for o in self.index.delivery_objects(job.job_id)
                       if o.state is DeliveryState.DONE})
        options = {k: v for k, v in job.options.items() if k not in NOT_CARRIED}
        options["supersedes"] = [job.job_id]
        options["correction"] = {"of_job": job.job_id, "author": author, "labels": str(folder / "labels.npz"),
                                 "sop_instance_uid": str(seg.SOPInstanceUID), "sent": sent,
                                 "changes": [asdict(c) for c in changes]}
        draft = Accepted(0, job.job_id, author, changes, held)
        new = self.index.add_complete_job(job, reason=draft.reason(), rule=job.rule or "", profile=job.profile or "",
                                          backend=job.backend, destinations=job.destinations, harvest=job.harvest,
                                          options=options)
        accepted = Accepted(new, job.job_id, author, changes, held)
        logger.info("job %d: correction of job %d by %s opened", new, job.job_id, author)
        self.emit(JobMoved(new, JobState.COMPLETE, accepted.reason()))
        if held:
            why = f"corrected by {author}: job {new} sends the correction; this result is never sent"
            if self.index.transition(job.job_id, JobState.SUPERSEDED, why):
                self.emit(JobMoved(job.job_id, JobState.SUPERSEDED, why))
        return accepted


def _change(volume: Volume, tissue: str, model: np.ndarray, corrected: np.ndarray) -> SegmentChange:
    return SegmentChange(tissue, round(dice(corrected, model), 4), round(mask_volume_ml(volume, model), 3),
                         round(mask_volume_ml(volume, corrected), 3))


def seg_uid(part10: bytes) -> str:
    """The SOP Instance UID of a Part 10 SEG (to name its kept file); ``unreadable-N`` when it cannot be read."""
    try:
        return str(dcmread(BytesIO(part10), stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
    except (InvalidDicomError, ValueError, EOFError, AttributeError):
        return f"unreadable-{abs(hash(part10)) % 10**12}"
