"""One segmentation job: load the series → run the backend chain → encode → summary.

Used by ``segnode run`` and by the node's worker processes (which build the
request from their serialisable :class:`segnode.node.jobs.worker.JobSpec`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from segnode.errors import BackendError, EncodeError, InputError, WeightsNotInstalledError
from segnode.models.base import LoadedModel, RunSettings
from segnode.models.measurements import segment_statistics
from segnode.models.qc import Finding, Outcome, run_qc
from segnode.models.registry import get_backend
from segnode.models.series import load_series
from segnode.models.weights import model_name_of
from segnode.models.volume import LabelMap, Volume
from segnode.node.writers.common import EncodedResult, OutputFormat, RtstructHoles, SegType
from segnode.node.writers.record import EncodedObject
from segnode.node.writers.nifti import write_nifti
from segnode.node.writers.pictures import write_pictures
from segnode.profiles import Backend, Profile, load_profile
from segnode.profiles.schema import VERSIONED

if TYPE_CHECKING:  # highdicom is loaded only where a rejection note is written
    from segnode.node.writers.rejection import RejectedObject
    from segnode.node.writers.sr_priors import PriorResult

logger = logging.getLogger(__name__)

Reporter = Callable[[str], None]


class ModelSource(Protocol):
    """Where loaded models come from (the worker keeps them warm in a cache)."""

    def get(self, backend: str, profile: Profile, settings: RunSettings) -> LoadedModel: ...


@dataclass(frozen=True)
class PipelineRequest:
    input_path: Path
    profile: str
    out_dir: Path
    backend: str | None = None
    series_uid: str | None = None
    seg_type: str = SegType.BINARY.value
    rtstruct_holes: str = RtstructHoles.KEYHOLE.value  # keyhole or xor (node.writers.rtstruct)
    output_format: str = OutputFormat.SEG.value
    settings: RunSettings = field(default_factory=RunSettings)
    use_fallback: bool = True
    outputs: tuple[str, ...] = ("seg",)  # output kinds (node.outputs.OutputKind) when output_format is seg
    # several profiles, one model run (node/jobs/shared_run.py): all of them, the folder the run is shared in,
    # and whether this job encodes all of them in one result instead of ``profile`` alone
    profiles: tuple[str, ...] = ()
    shared_dir: Path | None = None
    combine: bool = False
    # a superseding result (node/supersede.py): its version (series numbers, descriptions, UIDs) and the objects
    # of the result it replaces, for the IOCM Rejection Note
    version: int = 1
    rejects: tuple[RejectedObject, ...] = ()
    # a correction (node/corrections.py): its labels (``labels`` array of a .npz on the series' grid), no model run
    corrected_labels: Path | None = None
    # a route with priors (node/sources/priors.py): the node's results on earlier studies, for the SR's change
    priors: tuple[PriorResult, ...] = ()
    # ``segnode reprocess --model BACKEND/VERSION``: that fine-tuned version of the profile's model for the backend
    model_version: str | None = None


@dataclass(frozen=True)
class PipelineResult:
    seg_path: Path | None
    summary_path: Path
    backend_used: str
    model_version: str
    weights_hash: str
    seg_series_uid: str
    seg_sop_instance_uid: str
    summary: dict[str, Any]
    outputs: tuple[EncodedObject, ...] = ()  # every object written, paths relative to the request's out_dir
    qc: tuple[Finding, ...] = ()  # the profile's quality checks (docs/review.md)


def backend_chain(profile: Profile, override: str | None, use_fallback: bool = True) -> list[Backend]:
    """The backends to try, in order: the chosen one, then the profile's fallbacks."""
    first = Backend(override) if override else profile.model_type
    chain = [first]
    if use_fallback:
        chain += [b for b in (profile.model_type, *profile.fallback) if b not in chain]
    return chain


_not_installed_told: set[Backend] = set()


def _fallback_level(backend: Backend, exc: BackendError) -> int:
    """WARNING, except for weights a site never imported: WARNING once per process, then INFO.

    A profile may list a backend first whose weights this site does not have
    (its fallback then serves every job); saying so on every job would bury
    the warnings that matter (a failed inference, a corrupted file).
    """
    if not isinstance(exc, WeightsNotInstalledError):
        return logging.WARNING
    if backend in _not_installed_told:
        return logging.INFO
    _not_installed_told.add(backend)
    return logging.WARNING


def segment_with_fallback(
    volume: Volume, profile: Profile, chain: list[Backend], settings: RunSettings,
    models: ModelSource | None = None,
) -> tuple[LabelMap, list[dict[str, str]]]:
    """Run the first backend of ``chain`` that works; record why the others did not."""
    attempts: list[dict[str, str]] = []
    for backend in chain:
        try:
            model = models.get(backend.value, profile, settings) if models else get_backend(backend).load(profile, settings)
            labels = model.segment(volume)
        except BackendError as exc:  # weights missing, library missing, inference failed
            logger.log(_fallback_level(backend, exc), "backend %s failed for %s: %s", backend.value, profile.organ, exc)
            attempts.append({"backend": backend.value, "error": str(exc)})
            continue
        attempts.append({"backend": backend.value, "error": ""})
        return labels, attempts
    tried = "; ".join(f"{a['backend']}: {a['error']}" for a in attempts)
    raise BackendError(f"no backend could segment {profile.organ} ({tried})")




def corrected_labels(path: Path, volume: Volume, profile: Profile) -> LabelMap:
    """A correction's labels (node/corrections.py): on ``volume``'s grid, with the profile's label values."""
    try:
        with np.load(path) as data:
            array = np.asarray(data["labels"], dtype=np.uint8)
    except (OSError, KeyError, ValueError) as exc:
        raise InputError(f"cannot read the corrected labels: {exc}", where=str(path)) from exc
    if array.shape != volume.shape:
        raise InputError(f"corrected labels of shape {array.shape} on a {volume.shape} series", where=str(path))
    return LabelMap(array, profile.label_values(), backend="correction", model_version="corrected")


def quality_checks(volume: Volume, labels: LabelMap, profile: Profile, settings: RunSettings,
                   models: ModelSource | None = None, say: Reporter | None = None) -> list[Finding]:
    """The profile's quality checks (docs/review.md), with its ``cross_check`` backend's agreement.

    The cross-check runs only when it is not the backend that made ``labels``;
    if it cannot run, that is a warning of its own (the result is not checked).
    """
    check = profile.qc.cross_check
    other = None
    findings: list[Finding] = []
    if check is not None and check.value != labels.backend:
        (say or logger.info)(f"cross-checking {profile.organ} with {check.value}")
        try:
            other, _ = segment_with_fallback(volume, profile, [check], settings, models)
        except BackendError as exc:
            findings.append(Finding("agreement_dice", "*", Outcome.WARN, None, f"cross-check {check.value} ran: {exc}"))
    return findings + run_qc(volume, labels, profile, other)


def describe_input(volume: Volume) -> dict[str, Any]:
    source = volume.source
    return {
        "series_instance_uid": source.series_instance_uid if source else None,
        "study_instance_uid": source.study_instance_uid if source else None,
        "slices": volume.shape[0],
        "rows": volume.shape[1],
        "columns": volume.shape[2],
        "spacing_mm": [round(s, 4) for s in volume.spacing],
        "notes": list(volume.notes),
    }


def with_model_version(profile: Profile, backend: str | None, version: str) -> Profile:
    """``profile`` running the fine-tuned ``version`` of its ``backend`` model (:func:`model_name_of`).

    :class:`InputError` for a backend without versioned models.
    """
    chosen = Backend(backend) if backend in {b.value for b in Backend} else None
    if chosen not in VERSIONED:
        raise InputError(f"model version {version!r} asked for, but backend {backend} has no versioned models "
                         f"(only {', '.join(b.value for b in VERSIONED)})")
    assert chosen is not None
    name = model_name_of(profile, chosen).partition("/")[0]
    versioned = getattr(profile.options, chosen.value).model_copy(update={"model": f"{name}/{version}"})
    return profile.model_copy(update={"options": profile.options.model_copy(update={chosen.value: versioned})})


def run_pipeline(
    request: PipelineRequest, cache: ModelSource | None = None, report: Reporter | None = None
) -> PipelineResult:
    """Run one job; raise :class:`InputError`, :class:`BackendError` or :class:`EncodeError`."""
    say = report or (lambda message: logger.info("%s", message))
    profile = load_profile(request.profile)
    if request.model_version is not None:
        profile = with_model_version(profile, request.backend, request.model_version)
    members: list[Profile] = []
    union = None
    if len(request.profiles) > 1:
        from segnode.node.jobs.shared_run import union_profile

        members = [load_profile(name) for name in request.profiles]
        union = union_profile(members)
        profile = union if request.combine else profile
    output_format = OutputFormat(request.output_format)
    timings: dict[str, float] = {}

    start = time.perf_counter()
    volume = load_series(request.input_path, request.series_uid, progress=_progress(say, "loading"))
    timings["load_s"] = time.perf_counter() - start
    info = describe_input(volume)
    say(
        f"series {info['series_instance_uid'] or request.input_path}: {info['slices']} slices of "
        f"{info['rows']}x{info['columns']}, spacing {' x '.join(f'{s:g}' for s in info['spacing_mm'])} mm"
    )
    for note in volume.notes:
        say(f"note: {note}")

    start = time.perf_counter()
    attempts: list[dict[str, str]] = []  # a correction runs no backend
    if request.corrected_labels is not None:
        say(f"encoding the correction in {request.corrected_labels.name}")
        labels = corrected_labels(request.corrected_labels, volume, profile)
    else:
        labels, attempts = _segment(volume, profile, members, union, request, cache, say)
    timings["segment_s"] = time.perf_counter() - start

    start = time.perf_counter()
    if output_format is OutputFormat.SEG:
        from segnode.node.writers.kinds import encode_outputs, encoded_with

        kinds = encoded_with(request.outputs)
        say(f"encoding {', '.join(kinds)}")
        outputs = encode_outputs(volume, labels, profile, request.out_dir, kinds, seg_type=request.seg_type,
                                 rtstruct_holes=request.rtstruct_holes, version=request.version,
                                 rejects=request.rejects, priors=request.priors)
        first = next((o for o in outputs if o.kind == "seg"), outputs[0])
        encoded = EncodedResult(path=request.out_dir / first.path, series_instance_uid=first.series_instance_uid,
                                sop_instance_uid=first.sop_instance_uid, kind=first.kind)
    else:
        say("encoding nifti")
        encoded = write_nifti(volume, labels, profile, request.out_dir)
        if encoded.note:
            say(f"note: {encoded.note}")
        outputs = [EncodedObject(kind="nifti", profile=profile.organ, sop_class_uid="", sop_instance_uid="",
                                 path=encoded.path.relative_to(request.out_dir).as_posix(), series_instance_uid="")]
    timings["encode_s"] = time.perf_counter() - start

    summary = {
        "profile": profile.organ,
        "backend": labels.backend,
        "model_version": labels.model_version,
        "weights_sha256": labels.weights_hash,
        "attempts": attempts,
        "input": info,
        "output": {
            "format": output_format.value,
            "seg_type": request.seg_type if output_format is OutputFormat.SEG else None,
            "path": str(encoded.path),
            "series_instance_uid": encoded.series_instance_uid,
            "sop_instance_uid": encoded.sop_instance_uid,
        },
        "outputs": [o.to_json() for o in outputs],
        "segments": segment_statistics(volume, labels),
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "notes": list(labels.notes),
    }
    findings = (run_qc(volume, labels, profile, None) if request.corrected_labels is not None  # no cross-check
                else quality_checks(volume, labels, profile, request.settings, cache, say))
    summary["qc"] = [f.as_dict() for f in findings]
    summary["pictures"] = write_pictures(volume, labels, profile, request.out_dir)
    stem = info["series_instance_uid"] or Path(request.input_path).name.split(".")[0]
    summary_path = request.out_dir / f"summary_{profile.organ}_{stem}.json"
    try:
        summary_path.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    except OSError as exc:
        raise EncodeError(f"cannot write summary: {exc.strerror}", where=str(summary_path)) from exc
    return PipelineResult(
        seg_path=encoded.path,
        summary_path=summary_path,
        backend_used=labels.backend,
        model_version=labels.model_version,
        weights_hash=labels.weights_hash,
        seg_series_uid=encoded.series_instance_uid,
        seg_sop_instance_uid=encoded.sop_instance_uid,
        summary=summary,
        outputs=tuple(outputs),
        qc=tuple(findings),
    )


def _segment(volume: Volume, profile: Profile, members: list[Profile], union: Profile | None,
             request: PipelineRequest, cache: ModelSource | None, say: Reporter,
             ) -> tuple[LabelMap, list[dict[str, str]]]:
    """Run the backend chain; with several profiles (``members``), runs shared between the route's jobs."""
    model_profile = union or profile
    chain = backend_chain(model_profile, request.backend, request.use_fallback)
    say(f"segmenting {model_profile.organ} with {' → '.join(b.value for b in chain)}")
    if union is None:
        return segment_with_fallback(volume, model_profile, chain, request.settings, cache)
    from segnode.node.jobs.shared_run import segment_profiles

    wanted = members if profile is union else [profile]
    labels, attempts, reused = segment_profiles(volume, members, wanted, chain, request.settings, cache,
                                                request.shared_dir)
    if reused:
        say("model run shared with the route's other profiles")
    return labels, attempts


def _progress(say: Reporter, what: str) -> Callable[[int, int], None]:
    """Report ``what n/total`` about ten times over a long step."""

    def progress(n: int, total: int) -> None:
        if total >= 50 and (n == total or n % max(1, total // 10) == 0):
            say(f"{what} {n}/{total}")

    return progress

