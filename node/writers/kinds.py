"""Output kinds of a segmentation job, and encoding a label map into the kinds asked for.

* ``seg``: DICOM SEG (BINARY or LABELMAP), :mod:`segnode.node.writers.seg`;
* ``rtstruct``: RT Structure Set, for PACS and TPS that cannot show SEG;
* ``overlay``: a colour overlay series (secondary capture), any viewer shows it;
* ``sr``: a measurement report (TID 1500) referencing the SEG.

Each kind has its own deterministic UIDs (source series and instances,
profile, model version, kind, SEG type: ``output_seed``), so every object of a
job is stored once by a PACS, also on a resend, and a BINARY and a LABELMAP run
of one series never share a UID.  The SR reports on the SEG of the same run
(BINARY or LABELMAP) and its volumes are ``segment_statistics``'.  ``sr`` references the SEG, so asking for ``sr`` also encodes ``seg``
(a destination that does not take SEG still gets only what it takes).
Writers are imported when used: a node that never asks for a kind never
loads its libraries.

A result of ``version`` 2 or more (a late instance's re-run) says so in every
series number and description; given the objects of the result it supersedes
(``rejects``), an IOCM Rejection Note (kind ``rejection``,
:mod:`segnode.node.writers.rejection`) is written last.  Every object is then
checked (:mod:`segnode.node.writers.check`); a failed check raises
:class:`~segnode.errors.EncodeError`, which fails the job before anything is sent.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from segnode.models.measurements import SegmentStatistics, segment_statistics
from segnode.models.volume import LabelMap, Volume
from segnode.node.writers.check import check_objects
from segnode.node.writers.common import Algorithm, EncodedResult, RtstructHoles, SegType
from segnode.node.writers.record import EncodedObject
from segnode.node.writers.rejection import RejectedObject
from segnode.node.writers.seg import write_seg
from segnode.node.writers.sr_priors import PriorResult
from segnode.output_kinds import ALL_KINDS, OutputKind, encoded_with, parse_kinds
from segnode.profiles.schema import Profile

__all__ = ["ALL_KINDS", "EncodedObject", "OutputKind", "encode_outputs", "encoded_object", "encoded_with",
           "parse_kinds"]

logger = logging.getLogger(__name__)


def encoded_object(result: EncodedResult, profile: str, folder: Path) -> EncodedObject:
    """The record of ``result``, written in ``folder``."""
    return EncodedObject(kind=result.kind, profile=profile, path=result.path.relative_to(folder).as_posix(),
                         sop_class_uid=result.sop_class_uid, sop_instance_uid=result.sop_instance_uid,
                         series_instance_uid=result.series_instance_uid)


def encode_outputs(
    volume: Volume,
    labels: LabelMap,
    profile: Profile,
    out_dir: Path,
    kinds: tuple[str, ...] | list[str],
    *,
    seg_type: SegType | str = SegType.BINARY,
    statistics: list[SegmentStatistics] | None = None,
    rtstruct_holes: RtstructHoles | str = RtstructHoles.KEYHOLE,
    version: int = 1,
    rejects: Sequence[RejectedObject] = (),
    priors: Sequence[PriorResult] = (),
) -> list[EncodedObject]:
    """Write every kind in ``kinds`` (SEG first) into ``out_dir``; return each object written (paths relative to it).

    ``rtstruct_holes``: how the RTSTRUCT writes holes (keyhole contours or CLOSEDPLANAR_XOR).
    ``version``: the result's version (1, or more for a superseding result); ``rejects``: the objects of the
    result it supersedes, for the Rejection Note.  Every object is checked before this returns.
    """
    wanted = encoded_with(kinds)
    results: list[EncodedResult] = []
    seg: EncodedResult | None = None
    for kind in wanted:
        if kind == OutputKind.SEG.value:
            seg = write_seg(volume, labels, profile, out_dir, seg_type=seg_type, version=version)
            results.append(seg)
        elif kind == OutputKind.RTSTRUCT.value:
            from segnode.node.writers.rtstruct import write_rtstruct

            results.append(_as_kind(write_rtstruct(volume, labels, profile, out_dir, seg_type=seg_type,
                                                    holes=rtstruct_holes, version=version), kind))
        elif kind == OutputKind.OVERLAY.value:
            from segnode.node.writers.overlay import write_overlay

            results += [_as_kind(r, kind) for r in write_overlay(volume, labels, profile, out_dir, seg_type=seg_type,
                                                                 version=version)]
        elif kind == OutputKind.SR.value:
            from segnode.node.writers.sr import write_sr

            assert seg is not None  # SEG is encoded first
            stats = statistics if statistics is not None else segment_statistics(volume, labels)
            if not any(s.get("voxels") and not s.get("empty") for s in stats):
                # TID 1500 needs at least one measurement group (highdicom refuses none): no report to make
                logger.warning("nothing segmented: no SR written (the SEG and the other kinds are)")
                continue
            same_model = [p for p in priors if p.model_version in (None, labels.model_version)]  # else not comparable
            results.append(_as_kind(write_sr(volume, labels, profile, out_dir, seg_path=seg.path, statistics=stats,
                                             version=version, priors=same_model), kind))
    results += _rejection_note(volume, labels, profile, out_dir, version, rejects)
    if volume.source is not None:
        check_objects([r.path for r in results], volume.source, Algorithm.of(labels))
    logger.info("encoded %s: %d object(s)", ", ".join(wanted), len(results))
    return [encoded_object(r, profile.organ, out_dir) for r in results]


def _rejection_note(volume: Volume, labels: LabelMap, profile: Profile, out_dir: Path, version: int,
                    rejects: Sequence[RejectedObject]) -> list[EncodedResult]:
    """The IOCM Rejection Note for the superseded result's objects (none to reject: no note)."""
    if not rejects or volume.source is None:
        return []
    from segnode.node.writers.rejection import write_rejection_note

    return [write_rejection_note(volume.source, rejects, Algorithm.of(labels), out_dir, profile=profile.organ,
                                 version=version)]


def _as_kind(result: EncodedResult, kind: str) -> EncodedResult:
    """Fill ``kind`` and the SOP class from the file when a writer left them at their defaults."""
    from dataclasses import replace

    sop_class = result.sop_class_uid
    if not sop_class:
        from pydicom.filereader import read_file_meta_info

        sop_class = str(read_file_meta_info(result.path).MediaStorageSOPClassUID)
    return replace(result, kind=kind, sop_class_uid=sop_class)
