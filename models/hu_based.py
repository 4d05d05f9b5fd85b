"""The ``hu_based`` backend: threshold-and-morphology segmentation, no weights.

The profile's ``options.hu_based.method`` picks the method and its tissues
(in profile order) receive the masks:

* ``brain``: tissues ``brain`` and ``shell`` (:mod:`segnode.models.hu_brain`);
* ``lungs``: tissues ``lung_left`` and ``lung_right`` (:mod:`segnode.models.hu_lungs`);
* ``bone``: tissue ``bone`` (:mod:`segnode.models.hu_bone`).

Each tissue's ``hu_range`` is its threshold.  A tissue the method finds
nothing of is returned empty, with a note in the label map saying why.
Left and right come from patient coordinates (the volume's direction), never
from the array order.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from segnode.errors import BackendError, ConfigError
from segnode.models.base import RunSettings
from segnode.models.capability import cannot_segment
from segnode.models.hu_bone import segment_bone
from segnode.models.hu_brain import segment_brain
from segnode.models.hu_lungs import segment_lungs
from segnode.models.volume import LabelMap, Volume
from segnode.profiles.schema import Backend, Profile

logger = logging.getLogger(__name__)

VERSION = "hu_based-1.0"

@dataclass(frozen=True)
class HuBasedModel:
    """A loaded ``hu_based`` method bound to its profile's tissues and thresholds."""

    method: str
    labels: dict[int, str]
    ranges: dict[str, tuple[float, float]]
    backend: Backend = Backend.HU_BASED
    model_version: str = VERSION
    weights_hash: str = ""

    def segment(self, volume: Volume) -> LabelMap:
        started = time.perf_counter()
        masks, notes = self._run(volume)
        array = np.zeros(volume.shape, dtype=np.uint8)
        for value, name in self.labels.items():
            array[masks[name]] = value
        logger.info(
            "hu_based %s on %s voxels: %.2f s (%s)",
            self.method,
            "x".join(map(str, volume.shape)),
            time.perf_counter() - started,
            ", ".join(f"{n}={int(np.count_nonzero(masks[n]))}" for n in self.labels.values()),
        )
        return LabelMap(
            array=array,
            labels=dict(self.labels),
            backend=self.backend.value,
            model_version=self.model_version,
            weights_hash=self.weights_hash,
            notes=tuple(notes),
        )

    def _run(self, volume: Volume) -> tuple[dict[str, np.ndarray], list[str]]:
        r = self.ranges
        try:
            if self.method == "brain":
                brain, shell, notes = segment_brain(volume, r["brain"], r["shell"])
                return {"brain": brain, "shell": shell}, notes
            if self.method == "lungs":
                lungs_range = (min(r["lung_left"][0], r["lung_right"][0]), max(r["lung_left"][1], r["lung_right"][1]))
                left, right, notes = segment_lungs(volume, lungs_range)
                return {"lung_left": left, "lung_right": right}, notes
            bone, notes = segment_bone(volume, r["bone"])
            return {"bone": bone}, notes
        except MemoryError as exc:
            raise BackendError(f"hu_based {self.method}: out of memory on a {volume.shape} volume") from exc


class HuBasedBackend:
    """``hu_based``: always available, nothing to load but the profile."""

    name = Backend.HU_BASED

    def is_available(self) -> bool:
        return True

    def load(self, profile: Profile, settings: RunSettings) -> HuBasedModel:
        if profile.options.hu_based is None:
            raise ConfigError("profile has no options.hu_based.method", where=f"profile {profile.organ}")
        why = cannot_segment(Backend.HU_BASED, profile)
        if why is not None:
            raise ConfigError(why, where=f"profile {profile.organ}")
        method = profile.options.hu_based.method
        labels = profile.label_values()
        ranges = {name: (float(r[0]), float(r[1])) for name in labels.values()
                  if (r := profile.tissue(name).hu_range) is not None}
        return HuBasedModel(method=method, labels=labels, ranges=ranges)


BACKEND = HuBasedBackend()
