"""Clinical review before send: the QC policy decision and the review pictures.

:func:`decide` turns a job's QC outcome and its route's ``review`` setting into
send / send with a warning / hold / fail.  :func:`write_pictures` draws, once per
job, an axial, a coronal and a sagittal slice through each segment's centroid
with its outline (PNG, no imaging library needed).
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from segnode.models.qc import Outcome, worst
from segnode.models.volume import LabelMap, Volume
from segnode.node.writers.outline import SOFT_TISSUE, draw_outlines
from segnode.profiles import Profile
from segnode.routing.rules import QcPolicy, Review

#: display window (centre, width) per profile; soft tissue otherwise
WINDOWS = {"lungs": (-600.0, 1500.0), "bone": (400.0, 1800.0), "brain": (40.0, 80.0)}
PLANES = ("axial", "coronal", "sagittal")


@dataclass(frozen=True)
class Decision:
    policy: QcPolicy
    reason: str


def decide(qc: list[dict[str, Any]] | None, review: dict[str, Any] | None) -> Decision:
    """What to do with a result: the route's policy for the worst QC outcome.

    Without a ``review`` setting on the route the result is sent (the QC is recorded
    in the summary and, on a warn or fail, in the job's reason).
    """
    findings = qc or []
    outcome = worst(findings)
    bad = [f for f in findings if f["outcome"] != Outcome.PASS.value]
    why = "; ".join(f"{f['check']} {f['tissue']} {f['outcome']} ({f['figure']}, expected {f['expected']})" for f in bad)
    if review is None:
        policy = QcPolicy.SEND if outcome is Outcome.PASS else QcPolicy.SEND_WITH_WARNING
    else:
        rules = Review.model_validate(review)
        policy = {Outcome.PASS: QcPolicy.SEND, Outcome.WARN: rules.on_warn, Outcome.FAIL: rules.on_fail}[outcome]
        if rules.always and policy is not QcPolicy.FAIL:
            policy = QcPolicy.HOLD
            why = why or "route holds every result for review"
    return Decision(policy, f"QC {outcome.value}: {why}" if why else f"QC {outcome.value}")


# -- pictures ---------------------------------------------------------------------------


def write_pictures(volume: Volume, labels: LabelMap, profile: Profile, out_dir: Path) -> list[dict[str, str]]:
    """Three PNGs per non-empty segment in ``out_dir/review``; their records (tissue, plane, file name)."""
    folder = out_dir / "review"
    folder.mkdir(parents=True, exist_ok=True)
    window = WINDOWS.get(profile.organ, SOFT_TISSUE)
    colors = {value: profile.tissue(name).color for value, name in labels.labels.items()}
    records = []
    for value, name in sorted(labels.labels.items()):
        where = np.nonzero(labels.array == value)
        if not where[0].size:
            continue
        centre = tuple(int(round(float(axis.mean()))) for axis in where)
        for plane in PLANES:
            hu, lab = _plane(volume, labels.array, plane, centre)
            file = f"{name}_{plane}.png"
            write_png(folder / file, draw_outlines(hu, lab, colors, window=window, thickness=2))
            records.append({"tissue": name, "plane": plane, "file": f"review/{file}"})
    return records


def _plane(volume: Volume, array: np.ndarray, plane: str, centre: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The slice through ``centre`` (k, j, i); coronal and sagittal stretched to square pixels, head up."""
    k, j, i = centre
    if plane == "axial":
        return volume.hu[k], array[k]
    hu, lab = (volume.hu[:, j, :], array[:, j, :]) if plane == "coronal" else (volume.hu[:, :, i], array[:, :, i])
    in_plane = volume.spacing[0] if plane == "coronal" else volume.spacing[1]
    repeat = max(1, int(round(volume.spacing[2] / in_plane)))
    hu, lab = np.repeat(hu, repeat, axis=0), np.repeat(lab, repeat, axis=0)
    if np.asarray(volume.direction)[2, 2] > 0:  # slice index runs towards the head: put the head on top
        hu, lab = hu[::-1], lab[::-1]
    return hu, lab


def write_png(path: Path, rgb: np.ndarray) -> None:
    """An 8-bit RGB PNG (zlib + struct)."""
    rows, cols, _ = rgb.shape
    raw = b"".join(b"\x00" + np.ascontiguousarray(rgb[r], dtype=np.uint8).tobytes() for r in range(rows))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", cols, rows, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6))
                     + chunk(b"IEND", b""))


# -- what the job page shows -------------------------------------------------------------


def job_folder(seg_path: str | None) -> Path | None:
    """The job's output folder (where the SEG, the summary and ``review/`` are)."""
    return Path(seg_path).parent if seg_path else None


def job_summary(seg_path: str | None) -> dict[str, Any]:
    """The job's ``summary_*.json`` (QC findings, pictures, segment statistics); empty if none."""
    folder = job_folder(seg_path)
    found = sorted(folder.glob("summary_*.json")) if folder and folder.is_dir() else []
    if not found:
        return {}
    try:
        return json.loads(found[-1].read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def picture_path(seg_path: str | None, name: str) -> Path | None:
    """A review picture of the job by file name (``lung_left_axial.png``); None if not there."""
    folder = job_folder(seg_path)
    if folder is None or not re.fullmatch(r"[a-z][a-z0-9_]*\.png", name):
        return None
    path = folder / "review" / name
    return path if path.is_file() else None
