"""Which series of a study to segment: skip what cannot be segmented, then pick by preference.

Works on :class:`SeriesFacts`, a summary of one series' headers (no pixels),
so the node (spool headers), ``segnode route test`` (a study folder) and tests
share it.  Every decision comes with a sentence saying why; the node records
it on the job (``skipped`` with its reason, or the reason a series was
chosen).  The ``select`` settings of a route action are
:class:`segnode.routing.rules.Select`; the format is in ``docs/routing.md``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pydicom import Dataset

from segnode.routing.rules import Select

#: modalities that are never images to segment (our own outputs coming back among them)
NOT_IMAGES = frozenset({"SEG", "RTSTRUCT", "SR", "KO", "PR", "REG", "RTPLAN", "RTDOSE", "DOC"})
#: Secondary Capture family: screenshots, dose reports
_SC_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
#: the Manufacturer our writers put on every object (node/writers/seg.py MANUFACTURER)
OUR_MANUFACTURER = "segnode"


@dataclass(frozen=True)
class SeriesFacts:
    """What selection and completion read from a series' headers."""

    series_uid: str
    modality: str
    sop_class_uid: str
    image_type: tuple[str, ...]
    manufacturer: str
    description: str
    kernel: str
    contrast: str  # ContrastBolusAgent, "" when not given
    instances: int
    frames: int  # NumberOfFrames of a multi-frame instance, else 0
    slice_thickness: float | None
    normal: tuple[float, float, float] | None  # of ImageOrientationPatient, same on every instance; None otherwise
    positions: tuple[float, ...]  # each instance's position along the normal, sorted
    images_in_acquisition: int | None
    temporal_positions: int | None
    number_of_slices: int | None

    @property
    def orientation(self) -> str:
        """``axial``, ``coronal``, ``sagittal`` or ``oblique`` (from the normal's largest component)."""
        normal = self.normal
        if normal is None:
            return "unknown"
        axis = max(range(3), key=lambda i: abs(normal[i]))
        if abs(normal[axis]) < 0.9:
            return "oblique"
        return ("sagittal", "coronal", "axial")[axis]

    @property
    def slices(self) -> int:
        return self.frames or self.instances


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _normal(iop: Sequence[float]) -> tuple[float, float, float] | None:
    try:
        r, c = [float(v) for v in iop[:3]], [float(v) for v in iop[3:6]]
    except (TypeError, ValueError):
        return None
    if len(r) != 3 or len(c) != 3:
        return None
    n = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
    size = math.sqrt(sum(v * v for v in n))
    return None if size < 1e-6 else (n[0] / size, n[1] / size, n[2] / size)


def summarize(series_uid: str, headers: Sequence[Dataset]) -> SeriesFacts:
    """Facts of one series from its instances' headers (read with ``stop_before_pixels``)."""
    first = headers[0] if headers else Dataset()
    normals = {tuple(round(v, 3) for v in n) if n else None
               for n in (_normal(ds.get("ImageOrientationPatient") or ()) for ds in headers)}
    normal = _normal(first.get("ImageOrientationPatient") or ()) if len(normals) == 1 else None
    positions: list[float] = []
    if normal is not None:
        for ds in headers:
            ipp = ds.get("ImagePositionPatient")
            if ipp is not None and len(ipp) == 3:
                positions.append(sum(float(p) * n for p, n in zip(ipp, normal)))
    try:
        thickness = float(first.get("SliceThickness")) if first.get("SliceThickness") not in (None, "") else None
    except (TypeError, ValueError):
        thickness = None
    return SeriesFacts(
        series_uid=series_uid, modality=_text(first, "Modality").upper(), sop_class_uid=_text(first, "SOPClassUID"),
        image_type=tuple(t.upper() for t in _text(first, "ImageType").split("\\") if t),
        manufacturer=_text(first, "Manufacturer"), description=_text(first, "SeriesDescription"),
        kernel=_text(first, "ConvolutionKernel"), contrast=_text(first, "ContrastBolusAgent"),
        instances=len(headers), frames=_int(first, "NumberOfFrames") or 0 if len(headers) == 1 else 0,
        slice_thickness=thickness, normal=normal, positions=tuple(sorted(positions)),
        images_in_acquisition=_int(first, "ImagesInAcquisition"),
        temporal_positions=_int(first, "NumberOfTemporalPositions"),
        number_of_slices=_int(first, "NumberOfSlices"),
    )


def ineligible(facts: SeriesFacts, *, strict: bool = True) -> str | None:
    """Why this series cannot be segmented (a sentence), or ``None`` if it can.

    ``strict`` (study selection) also skips derived/secondary images and single
    images; without it (a series routed on its own) only what is surely no
    volume of ours to segment: non-image modalities, our own outputs,
    secondary captures, localizers.
    """
    if facts.modality in NOT_IMAGES:
        return f"modality {facts.modality} is not an image series"
    if facts.manufacturer.strip().lower() == OUR_MANUFACTURER:
        return "our own output coming back (Manufacturer segnode)"
    if facts.sop_class_uid.startswith(_SC_PREFIX):
        return "secondary capture (a screenshot or dose report)"
    if "LOCALIZER" in facts.image_type:
        return "localizer (ImageType LOCALIZER)"
    if not strict:
        return None
    if facts.image_type[:1] == ("DERIVED",) or facts.image_type[1:2] == ("SECONDARY",):
        return f"derived or secondary image (ImageType {_joined(facts.image_type)})"
    if facts.slices < 2:
        return "a single image, not a volume"
    return None


def _joined(values: Sequence[str]) -> str:
    return "\\".join(values)


@dataclass(frozen=True)
class Choice:
    """The outcome of selection for one route: the series chosen and why each other was not."""

    chosen: str | None
    reason: str  # why the chosen one (or why none)
    skipped: dict[str, str]  # series UID → why not


def _failed_minimum(facts: SeriesFacts, select: Select) -> str | None:
    if select.orientation is not None and facts.orientation != select.orientation:
        return f"{facts.orientation}, not {select.orientation}"
    if select.min_slices is not None and facts.slices < select.min_slices:
        return f"{facts.slices} slices, fewer than {select.min_slices}"
    for name, pattern, value in (("description", select.description, facts.description),
                                 ("kernel", select.kernel, facts.kernel)):
        if pattern is not None and not pattern.search(value):
            return f"{name} {value!r} does not match {pattern.pattern!r}"
    if select.contrast is not None and facts.contrast:  # only when known
        has = facts.contrast.strip().upper() not in ("", "NONE", "NO")
        if has != (select.contrast == "with"):
            return f"contrast {facts.contrast!r}, route wants {select.contrast} contrast"
    return None


def _rank(facts: SeriesFacts, select: Select) -> tuple[float, ...]:
    thickness = facts.slice_thickness if facts.slice_thickness is not None else math.inf
    key: list[float] = []
    for preference in select.prefer:
        if preference == "thinnest":
            key.append(thickness)
        elif preference == "thickest":
            key.append(-thickness if thickness != math.inf else math.inf)
        else:  # most_slices
            key.append(-facts.slices)
    return (*key, -facts.slices)


def choose(candidates: Iterable[SeriesFacts], select: Select) -> Choice:
    """Pick one series by ``select``: minimums first, then the preference order."""
    skipped: dict[str, str] = {}
    passing: list[SeriesFacts] = []
    for facts in candidates:
        why = _failed_minimum(facts, select)
        if why is None:
            passing.append(facts)
        else:
            skipped[facts.series_uid] = f"not selected: {why}"
    if not passing:
        return Choice(None, "no series meets the route's selection", skipped)
    passing.sort(key=lambda f: _rank(f, select))
    best = passing[0]
    reason = f"selected: {describe(best)}" + (f" (preferences: {', '.join(select.prefer)})" if select.prefer else "")
    for other in passing[1:]:
        skipped[other.series_uid] = f"not selected: {describe(other)}; series {best.series_uid} is preferred"
    return Choice(best.series_uid, reason, skipped)


def describe(facts: SeriesFacts) -> str:
    thickness = f"{facts.slice_thickness:g} mm" if facts.slice_thickness is not None else "thickness unknown"
    text = f"{facts.orientation}, {facts.slices} slices, {thickness}"
    return text + (f", {facts.description!r}" if facts.description else "")
