"""Several profiles, shared model runs: each backend run once per series, shared between the route's jobs.

A route with ``profiles: [liver, spleen, kidneys]`` gives one job per profile
on the same series (or one job with ``combine: true``).  A backend runs once
per *run group* of the profiles (:func:`segnode.models.capability.run_groups`):
one TotalSegmentator run for all of them (the union of their structures,
:func:`union_profile`), one ``hu_based`` run per HU method (``[lungs, bone]``:
the lungs method once and the bone method once per series; two profiles with
the same method share its run), one run per nnU-Net/MONAI model.  The first
job that needs a group's run makes it and leaves the label map in the route's
shared-run folder, under ``<run key>/``; the others load it (under a file
lock, so concurrent workers never run it twice).  Each job then keeps its own
profile's structures (:func:`split`) and encodes its own result; a
``combine`` job merges every group's run into one label map (:func:`merge`).
A backend of the chain that cannot segment a job's profile is skipped with
the reason (:func:`segnode.models.capability.cannot_segment`).
"""

from __future__ import annotations

import fcntl
import json
import logging
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np
from segnode.errors import BackendError, InputError
from segnode.models.base import LoadedModel, RunSettings
from segnode.models.capability import cannot_segment, run_groups, run_key
from segnode.models.registry import get_backend
from segnode.models.volume import LabelMap, Volume
from segnode.profiles.schema import Backend, Profile, Tissue, TotalSegmentatorOptions

logger = logging.getLogger(__name__)

LABELS_FILE = "labels.npz"


def union_profile(profiles: Sequence[Profile]) -> Profile:
    """One profile with every structure of ``profiles`` (first profile's backend and settings).

    Tissues named the same in two profiles are segmented once; the
    TotalSegmentator ``roi_subset`` is the union (none if one profile has none).
    """
    first = profiles[0]
    tissues: dict[str, Tissue] = {}
    for profile in profiles:
        for tissue in profile.tissues:
            tissues.setdefault(tissue.name, tissue)
    subsets = [p.options.totalsegmentator.roi_subset for p in profiles]
    roi = None if any(s is None for s in subsets) else tuple(dict.fromkeys(c for s in subsets for c in s or ()))
    ts: TotalSegmentatorOptions = first.options.totalsegmentator.model_copy(update={"roi_subset": roi})
    return first.model_copy(update={
        "organ": "_".join(p.organ for p in profiles)[:64],
        "description": " + ".join(p.description for p in profiles),
        "tissues": tuple(tissues.values()),
        "options": first.options.model_copy(update={"totalsegmentator": ts}),
        "qc": first.qc.model_copy(update={"tissues": {n: q for p in profiles for n, q in p.qc.tissues.items()}}),
    })


class Models(Protocol):
    """Where loaded models come from (:class:`segnode.node.jobs.pipeline.ModelSource`)."""

    def get(self, backend: str, profile: Profile, settings: RunSettings) -> LoadedModel: ...


def segment_profiles(volume: Volume, profiles: Sequence[Profile], wanted: Sequence[Profile],
                     chain: Sequence[Backend], settings: RunSettings, models: Models | None = None,
                     shared_dir: Path | None = None) -> tuple[LabelMap, list[dict[str, str]], bool]:
    """The label map of ``wanted`` (one profile of the route's ``profiles``, or all of them with ``combine``).

    The first backend of ``chain`` that can segment every wanted profile runs
    once per run group (:func:`segnode.models.capability.run_groups`) holding
    a wanted profile; each group's run is shared through ``shared_dir/<run key>``
    with the route's other jobs on the series.  Returns the label map (one
    profile: numbered as it numbers its tissues; several: as
    :func:`union_profile` does), the attempts (as
    :func:`segnode.node.jobs.pipeline.segment_with_fallback`), and whether
    every run was reused from another job.
    """
    names = {p.organ for p in wanted}
    attempts: list[dict[str, str]] = []
    for backend in chain:
        why = next((f"cannot segment {p.organ}: {w}" for p in wanted if (w := cannot_segment(backend, p))), None)
        try:
            if why is not None:
                raise BackendError(why)
            groups = [g for g in run_groups(backend, profiles) if any(p.organ in names for p in g)]
            runs = [_shared_run(volume, group, backend, settings, models, shared_dir) for group in groups]
        except BackendError as exc:
            logger.warning("backend %s failed for %s: %s", backend.value, ", ".join(sorted(names)), exc)
            attempts.append({"backend": backend.value, "error": str(exc)})
            continue
        attempts.append({"backend": backend.value, "error": ""})
        parts = [labels for labels, _ in runs]
        labels = split(parts[0], wanted[0]) if len(wanted) == 1 else merge(parts, union_profile(wanted))
        return labels, attempts, all(reused for _, reused in runs)
    tried = "; ".join(f"{a['backend']}: {a['error']}" for a in attempts)
    raise BackendError(f"no backend could segment {', '.join(sorted(names))} ({tried})")


def _shared_run(volume: Volume, group: tuple[Profile, ...], backend: Backend, settings: RunSettings,
                models: Models | None, shared_dir: Path | None) -> tuple[LabelMap, bool]:
    """One backend run for the profiles of one run group, shared in ``shared_dir/<run key>``; and if reused."""
    profile = group[0] if len(group) == 1 else union_profile(group)
    key = run_key(backend, group[0])

    def run() -> tuple[LabelMap, list[dict[str, str]]]:
        model = models.get(backend.value, profile, settings) if models else get_backend(backend).load(profile, settings)
        logger.info("model run %s for %s", key, ", ".join(p.organ for p in group))
        return model.segment(volume), []

    if shared_dir is None:
        return run()[0], False
    labels, _, reused = shared_labels(shared_dir / key, volume.shape, run)
    return labels, reused


def merge(parts: Sequence[LabelMap], union: Profile) -> LabelMap:
    """The runs' label maps in one, numbered as ``union`` numbers its tissues (a later run wins an overlap)."""
    values = {name: value for value, name in union.label_values().items()}
    out = np.zeros(parts[0].array.shape, dtype=np.uint8)
    for part in parts:
        for value, name in part.labels.items():
            out[part.array == value] = values[name]
    versions = " + ".join(dict.fromkeys(p.model_version for p in parts))
    hashes = " + ".join(dict.fromkeys(p.weights_hash for p in parts if p.weights_hash))
    return LabelMap(out, union.label_values(), parts[0].backend, versions, hashes,
                    tuple(n for p in parts for n in p.notes))


def split(labels: LabelMap, profile: Profile) -> LabelMap:
    """``profile``'s structures of a union label map, numbered as ``profile`` numbers them."""
    out = np.zeros(labels.array.shape, dtype=labels.array.dtype)
    by_name = {name: value for value, name in labels.labels.items()}
    for value, name in profile.label_values().items():
        if name not in by_name:
            raise InputError(f"the shared run has no {name!r} for profile {profile.organ}")
        out[labels.array == by_name[name]] = value
    return LabelMap(out, profile.label_values(), labels.backend, labels.model_version, labels.weights_hash,
                    labels.notes)


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def shared_labels(folder: Path, shape: tuple[int, ...], run: Callable[[], tuple[LabelMap, list[dict[str, str]]]],
                  ) -> tuple[LabelMap, list[dict[str, str]], bool]:
    """The union label map from ``folder``, or from ``run()`` (saved there); and whether it was reused."""
    with _locked(folder):
        path = folder / LABELS_FILE
        if path.is_file():
            with np.load(path) as data:
                meta = json.loads(str(data["meta"]))
                array = data["array"]
            if tuple(array.shape) == tuple(shape):
                labels = LabelMap(array, {int(k): v for k, v in meta["labels"].items()}, meta["backend"],
                                  meta["model_version"], meta["weights_hash"], tuple(meta["notes"]))
                logger.info("reusing the shared model run in %s", folder)
                return labels, meta["attempts"], True
            logger.warning("shared run in %s is for another grid %s; running again", folder, array.shape)
        labels, attempts = run()
        meta = {"labels": labels.labels, "backend": labels.backend, "model_version": labels.model_version,
                "weights_hash": labels.weights_hash, "notes": list(labels.notes), "attempts": attempts}
        tmp = folder / "labels.tmp.npz"
        np.savez_compressed(tmp, array=labels.array, meta=np.array(json.dumps(meta)))
        tmp.replace(path)
        return labels, attempts, False
