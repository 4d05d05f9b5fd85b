"""When a received series is complete: on evidence, else after the quiet period.

Evidence (``completion.evidence``, on by default) is both of:

* every association that sent instances of the series has ended with an
  A-RELEASE (the receivers record it: :meth:`segnode.storage.index.Index.mark_released`)
  and no instance came after it;
* the instances form a gap-free volume whose count matches what the headers
  say, when they say it: one multi-frame instance (Enhanced CT, its
  ``NumberOfFrames``); or single-frame instances sharing one orientation whose
  positions along the normal are evenly spaced with no missing step, and whose
  number equals ``ImagesInAcquisition`` and ``NumberOfSlices`` ×
  ``NumberOfTemporalPositions`` where given.  A series that selection skips
  anyway (a localizer, a dose report) needs only the release.

Then ``completion.grace_s`` (1.5 s) passes, so a sender that opens a second
association at once is not cut short.  Without evidence the quiet period
(``completion.quiet_period_s``) completes the series, as before.

Only headers are read (``stop_before_pixels``, a fixed list of tags), once per
series and instance count: the check is cheap enough to run every sweep.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from segnode.routing.selection import SeriesFacts, ineligible, summarize

logger = logging.getLogger(__name__)

#: the tags the completion check and series selection read (nothing else is parsed)
HEADER_TAGS = ("SOPClassUID", "Modality", "ImageType", "Manufacturer", "SeriesDescription", "ConvolutionKernel",
               "ContrastBolusAgent", "NumberOfFrames", "SliceThickness", "ImageOrientationPatient",
               "ImagePositionPatient", "ImagesInAcquisition", "NumberOfTemporalPositions", "NumberOfSlices")
#: relative tolerance on the slice step (reconstructions round positions)
STEP_TOLERANCE = 0.1


@dataclass(frozen=True)
class Verdict:
    """Whether the instances make a whole series, and the sentence saying why (or why not)."""

    whole: bool
    reason: str


def read_facts(series_uid: str, paths: Iterable[Path], first: Dataset | None = None) -> SeriesFacts | None:
    """The series' facts from its spooled files' headers; ``None`` if one cannot be read.

    ``first``: the first file's header, already read whole (the routing rules need it): it is not read again.
    """
    headers = [] if first is None else [first]
    for path in list(paths)[0 if first is None else 1:]:
        try:
            headers.append(dcmread(path, stop_before_pixels=True, specific_tags=list(HEADER_TAGS)))
        except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
            logger.warning("series %s: cannot read the header of %s: %s", series_uid, path.name, exc)
            return None
    return summarize(series_uid, headers) if headers else None


def judge(facts: SeriesFacts) -> Verdict:
    """Whether ``facts`` describe a whole series (see the module docstring)."""
    skip = ineligible(facts, strict=False)
    if facts.frames and facts.instances == 1:
        return Verdict(True, f"1 multi-frame instance, NumberOfFrames={facts.frames}")
    if skip is not None:
        return Verdict(True, f"{facts.instances} instance(s) of a series selection skips ({skip})")
    gap = _gap(facts)
    if gap is not None:
        return Verdict(False, gap)
    unique = len(set(round(p, 3) for p in facts.positions))
    expected: list[str] = []
    for name, value, count in (("ImagesInAcquisition", facts.images_in_acquisition, facts.instances),
                               ("NumberOfSlices", facts.number_of_slices, unique)):
        if value is not None:
            if value != count:
                return Verdict(False, f"{count} received, {name}={value}")
            expected.append(f"{name}={value}")
    temporal = facts.temporal_positions or 1
    if unique * temporal != facts.instances:
        return Verdict(False, f"{facts.instances} instances for {unique} positions × {temporal} temporal positions")
    if temporal > 1:
        expected.append(f"NumberOfTemporalPositions={temporal}")
    return Verdict(True, f"{unique} slices gap-free" + (f", {', '.join(expected)}" if expected else ""))


def _gap(facts: SeriesFacts) -> str | None:
    """Why the positions are not an evenly covered volume, or ``None`` when they are."""
    if facts.normal is None:
        return "no common image orientation"
    if len(facts.positions) != facts.instances:
        return "an instance without ImagePositionPatient"
    steps = sorted({round(p, 3) for p in facts.positions})
    if len(steps) < 2:
        return "fewer than 2 slice positions"
    diffs = [b - a for a, b in zip(steps, steps[1:])]
    step = sorted(diffs)[len(diffs) // 2]
    bad = [d for d in diffs if abs(d - step) > STEP_TOLERANCE * step]
    if bad:
        return f"slice positions not evenly spaced (step {step:g} mm, a gap of {max(bad):g} mm)"
    return None
