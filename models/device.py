"""Device choice, thread counts and the memory budget of the deep-learning backends.

* **Device.** ``auto`` picks CUDA when torch sees a GPU, else the CPU;
  ``cpu``, ``cuda`` and ``cuda:N`` force one.  Asking for CUDA where there is
  none is a :class:`BackendError`, never a silent fall back.
* **Threads.** ``RunSettings.threads`` sets torch's intra-op threads while a
  backend runs (restored afterwards).  TotalSegmentator sets its own count
  during prediction (all cores on the CPU, one on a GPU); see docs/models.md.
* **Memory budget.** ``RunSettings.memory_budget_mb`` bounds the estimated
  peak memory of one segmentation.  A volume whose estimate exceeds it is
  processed in the *reduced mode*: cut into overlapping slabs along the slice
  axis, each segmented alone, the central part of each kept (so objects are
  seen with at least ``SLAB_MARGIN`` slices of context).  If even the
  thinnest slab (``MIN_SLAB`` slices) would exceed the budget, or
  ``extra['oversize'] == 'refuse'``, the volume is refused with a
  :class:`BackendError` stating estimate and budget.  The notes of the
  returned label map say when the reduced mode was used.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from types import ModuleType

import numpy as np

from segnode.errors import BackendError, ConfigError, DependencyMissingError
from segnode.models.base import RunSettings
from segnode.models.volume import LabelMap, Volume, vec3

logger = logging.getLogger(__name__)

DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
#: slices of context kept on each side of a slab in the reduced mode
SLAB_MARGIN = 16
#: thinnest slab (core) the reduced mode will use
MIN_SLAB = 32


def _torch() -> ModuleType:
    try:
        import torch
    except ImportError as exc:
        raise DependencyMissingError("PyTorch is not installed (pip install 'segnode[dl]')") from exc
    return torch


def resolve_device(requested: str = "auto") -> str:
    """``auto`` → ``cuda`` when available else ``cpu``; validate explicit choices."""
    if not DEVICE_RE.match(requested):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {requested!r}")
    if requested == "cpu":
        return "cpu"
    torch = _torch()
    has_cuda = bool(torch.cuda.is_available())
    if requested == "auto":
        return "cuda" if has_cuda else "cpu"
    if not has_cuda:
        raise BackendError(f"device {requested!r} requested but no CUDA GPU is available to torch")
    index = int(requested.split(":")[1]) if ":" in requested else 0
    if index >= torch.cuda.device_count():
        raise BackendError(f"device {requested!r} requested but only {torch.cuda.device_count()} GPU(s) exist")
    return requested


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` torch intra-op threads (``None``: unchanged)."""
    if threads is None:
        yield
        return
    if threads < 1:
        raise ConfigError(f"threads must be at least 1, got {threads}")
    torch = _torch()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- memory


@dataclass(frozen=True)
class MemoryModel:
    """A rough peak-memory model of one backend's inference (calibrated in bench/).

    The peak is ``fixed_mb`` plus, per voxel at the network's spacing,
    ``bytes_per_model_voxel`` (logits, data, gaussian and counts: scales with
    the class count) and, per voxel of the input grid, ``bytes_per_input_voxel``
    (input copies, label maps, and for nnU-Net the logits resampled back).
    """

    target_spacing_mm: tuple[float, float, float] | None
    bytes_per_model_voxel: float
    bytes_per_input_voxel: float
    fixed_mb: float

    def estimate_mb(self, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> float:
        nk, nj, ni = shape
        n_input = float(nk) * nj * ni
        if self.target_spacing_mm is None:
            n_model = n_input
        else:
            tx, ty, tz = self.target_spacing_mm
            sx, sy, sz = spacing
            n_model = (ni * sx / tx) * (nj * sy / ty) * (nk * sz / tz)
        return self.fixed_mb + (n_model * self.bytes_per_model_voxel + n_input * self.bytes_per_input_voxel) / 2**20


def slab_ranges(n_slices: int, core: int, margin: int = SLAB_MARGIN) -> list[tuple[int, int, int, int]]:
    """``(start, stop, keep_start, keep_stop)`` of each slab: run on ``[start, stop)``,
    keep ``[keep_start, keep_stop)`` (absolute slice indices)."""
    out = []
    for keep_start in range(0, n_slices, core):
        keep_stop = min(n_slices, keep_start + core)
        out.append((max(0, keep_start - margin), min(n_slices, keep_stop + margin), keep_start, keep_stop))
    return out


def sub_volume(volume: Volume, start: int, stop: int) -> Volume:
    """Slices ``[start, stop)`` of ``volume`` with the origin moved to slice ``start``."""
    axis_k = np.asarray(volume.direction)[:, 2] * volume.spacing[2]
    origin = vec3(np.asarray(volume.origin) + start * axis_k)
    return replace(volume, hu=volume.hu[start:stop], origin=origin, source=None)


def run_within_budget(segment: Callable[[Volume], LabelMap], volume: Volume, settings: RunSettings,
                      memory: MemoryModel, backend: str) -> LabelMap:
    """``segment(volume)``, in slabs if its memory estimate exceeds the budget (see module doc)."""
    budget = settings.memory_budget_mb
    estimate = memory.estimate_mb(volume.shape, volume.spacing)
    if budget is None or estimate <= budget:
        return segment(volume)
    nk, nj, ni = volume.shape
    per_slice = (estimate - memory.fixed_mb) / nk
    core = int(math.floor((budget - memory.fixed_mb) / per_slice)) - 2 * SLAB_MARGIN if per_slice > 0 else nk
    if settings.extra.get("oversize", "slabs") == "refuse" or core < MIN_SLAB:
        raise BackendError(
            f"{backend}: volume {ni}x{nj}x{nk} needs about {estimate:.0f} MB, above the memory budget of "
            f"{budget} MB" + ("" if core >= MIN_SLAB else
                              f" even in slabs of {MIN_SLAB} slices; raise memory_budget_mb or use a lighter model")
        )
    ranges = slab_ranges(nk, core)
    logger.warning("%s: volume needs about %.0f MB (> budget %d MB): reduced mode, %d slabs of %d slices",
                   backend, estimate, budget, len(ranges), core)
    out: np.ndarray | None = None
    first: LabelMap | None = None
    for start, stop, keep_start, keep_stop in ranges:
        part = segment(sub_volume(volume, start, stop))
        if out is None:
            out = np.zeros(volume.shape, dtype=part.array.dtype)
            first = part
        out[keep_start:keep_stop] = part.array[keep_start - start: keep_stop - start]
    assert first is not None and out is not None
    note = (f"reduced mode: segmented in {len(ranges)} slabs of {core} slices (+{SLAB_MARGIN} context) "
            f"to stay within {budget} MB")
    return replace(first, array=out, notes=(*first.notes, note))
