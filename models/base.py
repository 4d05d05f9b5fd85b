"""The interface every segmentation backend module implements.

Each backend module in ``models/`` (``hu_based``, ``totalsegmentator``,
``nnunet``, ``monai``) exposes a class implementing :class:`SegmentationBackend`:

* ``name``: the :class:`segnode.profiles.Backend` value;
* ``is_available()``: the libraries it needs import (cheap, no weights);
* ``load(profile, settings)``: returns a :class:`LoadedModel` (weights checked and
  loaded; may raise :class:`segnode.errors.WeightsError`);
* ``LoadedModel.segment(volume) -> LabelMap`` on the volume's own grid, label
  values = the profile's segment numbers (``profile.label_values()``).

Backends know nothing of DICOM networking; they get a :class:`Volume` and
return a :class:`LabelMap`.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from segnode.models.volume import LabelMap, Volume
from segnode.profiles.schema import Backend, Profile


@dataclass(frozen=True)
class RunSettings:
    """How backends run on this node (from the node config or CLI flags)."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int | None = None
    weights_dir: Path | None = None  # None: the default weights directory
    memory_budget_mb: int | None = None
    engine: str = "auto"  # auto | fp32 | bf16 (models/engines.py); only engines that passed the parity gate run
    extra: dict[str, str] = field(default_factory=dict)


class LoadedModel(Protocol):
    backend: Backend
    model_version: str
    weights_hash: str

    def segment(self, volume: Volume) -> LabelMap: ...


class SegmentationBackend(Protocol):
    name: Backend

    def is_available(self) -> bool: ...

    def load(self, profile: Profile, settings: RunSettings) -> LoadedModel: ...


def installed_version(distribution: str) -> str:
    """The installed version of ``distribution`` (a backend's library), or ``unknown``: part of a model's version."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
