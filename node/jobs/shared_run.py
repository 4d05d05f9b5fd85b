"""Several profiles, shared model runs: the union label map, shared between jobs, split per profile.

A route with ``profiles: [liver, spleen, kidneys]`` gives one job per profile
on the same series (or one job with ``combine: true``).  The first of them to
run segments the series for the union of the profiles' structures
(:func:`segment_profiles`) and leaves the label map in the route's shared-run
folder; the others load it (under a file lock, so concurrent workers never
run the model twice).  Each job then keeps its own profile's structures
(:func:`split`) and encodes its own result.

The union is made by one backend run per *run key*
(:func:`segnode.models.capability.run_groups`): one TotalSegmentator run for
all, one ``hu_based`` run per HU method (``[lungs, bone]``: the lungs method
once and the bone method once, per series), one run per nnU-Net/MONAI model.
The runs' label maps are merged into the union's numbering
(:func:`merge`).  A fallback backend that cannot segment one of the profiles
is skipped with the reason.
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
from segnode.models.capability import cannot_segment, run_groups
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


def segment_profiles(volume: Volume, profiles: Sequence[Profile], chain: Sequence[Backend], settings: RunSettings,
                     models: Models | None = None) -> tuple[LabelMap, list[dict[str, str]]]:
    """The union label map of ``profiles``: the first backend of ``chain`` that can make it, one run per group.

    Returns the label map (numbered as :func:`union_profile` numbers the
    tissues) and the attempts, as :func:`segnode.node.jobs.pipeline.segment_with_fallback`.
    """
    union = union_profile(profiles)
    attempts: list[dict[str, str]] = []
    for backend in chain:
        why = next((f"cannot segment {p.organ}: {w}" for p in profiles if (w := cannot_segment(backend, p))), None)
        try:
            if why is not None:
                raise BackendError(why)
            parts = [_run(volume, group, backend, settings, models) for group in run_groups(backend, profiles)]
        except BackendError as exc:
            logger.warning("backend %s failed for %s: %s", backend.value, union.organ, exc)
            attempts.append({"backend": backend.value, "error": str(exc)})
            continue
        attempts.append({"backend": backend.value, "error": ""})
        return merge(parts, union), attempts
    tried = "; ".join(f"{a['backend']}: {a['error']}" for a in attempts)
    raise BackendError(f"no backend could segment {union.organ} ({tried})")


def _run(volume: Volume, group: tuple[Profile, ...], backend: Backend, settings: RunSettings,
         models: Models | None) -> LabelMap:
    """One backend run for the profiles of one run group."""
    profile = group[0] if len(group) == 1 else union_profile(group)
    model = models.get(backend.value, profile, settings) if models else get_backend(backend).load(profile, settings)
    logger.info("model run %s for %s", backend.value, ", ".join(p.organ for p in group))
    return model.segment(volume)


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
