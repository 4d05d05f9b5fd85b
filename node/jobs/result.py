"""A segmentation job's result: one typed record from the worker to the index.

A worker (local process or remote machine) writes its outputs into the job
folder and describes them in a :class:`JobResult`: every object encoded (kind,
profile, SOP class, SOP instance and series UIDs, file), the summary file,
the QC findings, the review pictures and the harvest outcome.  Every path in
it is relative to the job folder, so the same record is written to
``result.json`` by a local worker, posted unchanged by a remote worker, and
read by the node, which resolves a path against the job folder only where it
opens the file (``Job.file`` in :mod:`segnode.storage.index`).

:meth:`JobResult.from_json` is strict: unknown or missing keys, values of the
wrong type and paths that are absolute, climb out of the folder (``..``) or
hold odd characters are refused with :class:`~segnode.errors.InputError`
(a remote worker's result comes over the network).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from segnode.errors import InputError
from segnode.models.qc import Finding, Outcome
from segnode.node.writers.record import EncodedObject

if TYPE_CHECKING:
    from segnode.node.jobs.pipeline import PipelineResult

RESULT_FILE = "result.json"
_SAFE_COMPONENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,254}")
MAX_DEPTH = 4


def safe_relative(name: str) -> str:
    """``name`` if it is a relative path of safe components (no ``..``, no absolute path), else raise."""
    parts = name.split("/")
    if not name or len(parts) > MAX_DEPTH or not all(_SAFE_COMPONENT.fullmatch(p) for p in parts):
        raise InputError(f"result file name {name[:80]!r} is not a safe relative path")
    return name


def job_folder(results_dir: Path, job_id: int, attempt: int) -> Path:
    """The folder of one attempt of a job: its outputs, summary, pictures and ``result.json``."""
    return results_dir / f"job-{job_id}" / f"attempt-{attempt}"


def fields(data: object, what: str, required: set[str], optional: frozenset[str] = frozenset()) -> Mapping[str, Any]:
    """``data`` as a JSON object with exactly the ``required`` keys and some of the ``optional`` ones."""
    if not isinstance(data, dict):
        raise InputError(f"{what} must be a JSON object")
    unknown = set(data) - required - optional
    missing = required - set(data)
    if unknown or missing:
        raise InputError(f"{what}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}")
    return data


def text(data: Mapping[str, Any], key: str, what: str) -> str:
    value = data[key]
    if not isinstance(value, str):
        raise InputError(f"{what}.{key} must be a string")
    return value


def _objects(data: object, what: str) -> list[Any]:
    if not isinstance(data, list):
        raise InputError(f"{what} must be a list")
    return data


@dataclass(frozen=True)
class Picture:
    """A review picture: one plane through one segment (``review/liver_axial.png``)."""

    tissue: str
    plane: str
    file: str  # relative to the job folder

    def __post_init__(self) -> None:
        safe_relative(self.file)

    @classmethod
    def from_json(cls, data: object) -> Picture:
        d = fields(data, "picture", {"tissue", "plane", "file"})
        return cls(**{k: text(d, k, "picture") for k in d})


@dataclass(frozen=True)
class Harvest:
    """Whether the job went into the route's dataset (never names the case ID)."""

    dataset: str
    status: str  # "harvested" or "not harvested"
    reason: str | None = None

    def to_json(self) -> dict[str, str]:
        out = {"dataset": self.dataset, "status": self.status}
        return out if self.reason is None else {**out, "reason": self.reason}

    @classmethod
    def from_json(cls, data: object) -> Harvest:
        d = fields(data, "harvest", {"dataset", "status"}, frozenset({"reason"}))
        return cls(**{k: text(d, k, "harvest") for k in d})


def _finding(data: object) -> Finding:
    d = fields(data, "qc finding", {"check", "tissue", "outcome", "figure", "expected"})
    figure = d["figure"]
    if figure is not None and (not isinstance(figure, (int, float)) or isinstance(figure, bool)):
        raise InputError("qc finding.figure must be a number or null")
    try:
        outcome = Outcome(text(d, "outcome", "qc finding"))
    except ValueError:
        raise InputError(f"qc finding.outcome {d['outcome']!r} is not one of pass, warn, fail") from None
    return Finding(text(d, "check", "qc finding"), text(d, "tissue", "qc finding"), outcome,
                   None if figure is None else float(figure), text(d, "expected", "qc finding"))


@dataclass(frozen=True)
class JobResult:
    """What one job produced; paths relative to its job folder."""

    objects: tuple[EncodedObject, ...]
    backend_used: str
    model_version: str
    weights_hash: str
    summary: str  # the summary file (segment statistics, timings, attempts)
    qc: tuple[Finding, ...] = ()
    pictures: tuple[Picture, ...] = ()
    harvest: Harvest | None = None

    def __post_init__(self) -> None:
        if not self.objects:
            raise InputError("a job result names no encoded object")
        for name in self.files():
            safe_relative(name)

    @property
    def seg(self) -> EncodedObject:
        """The job's main object: its first SEG, else its first object."""
        return next((o for o in self.objects if o.kind == "seg"), self.objects[0])

    def files(self) -> tuple[str, ...]:
        """Every file the result names, relative to the job folder."""
        return (*(o.path for o in self.objects), self.summary, *(p.file for p in self.pictures))

    def missing(self, folder: Path) -> list[str]:
        """The files the result names that ``folder`` does not hold."""
        return [name for name in self.files() if not (folder / name).is_file()]

    def with_harvest(self, harvest: Harvest) -> JobResult:
        return replace(self, harvest=harvest)

    # -- JSON ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"objects": [o.to_json() for o in self.objects], "backend_used": self.backend_used,
                "model_version": self.model_version, "weights_hash": self.weights_hash, "summary": self.summary,
                "qc": [f.as_dict() for f in self.qc], "pictures": [vars(p).copy() for p in self.pictures],
                "harvest": self.harvest.to_json() if self.harvest else None}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, data: object) -> JobResult:
        d = fields(data, "job result", {"objects", "backend_used", "model_version", "weights_hash", "summary",
                                        "qc", "pictures", "harvest"})
        return cls(objects=tuple(EncodedObject.from_json(o) for o in _objects(d["objects"], "job result.objects")),
                   backend_used=text(d, "backend_used", "job result"),
                   model_version=text(d, "model_version", "job result"),
                   weights_hash=text(d, "weights_hash", "job result"), summary=text(d, "summary", "job result"),
                   qc=tuple(_finding(f) for f in _objects(d["qc"], "job result.qc")),
                   pictures=tuple(Picture.from_json(p) for p in _objects(d["pictures"], "job result.pictures")),
                   harvest=None if d["harvest"] is None else Harvest.from_json(d["harvest"]))

    @classmethod
    def from_json(cls, text_: str | bytes) -> JobResult:
        try:
            data = json.loads(text_)
        except ValueError:
            raise InputError("the job result is not JSON") from None
        return cls.from_dict(data)

    @classmethod
    def from_pipeline(cls, result: PipelineResult, folder: Path) -> JobResult:
        """The record of one pipeline run whose outputs are in ``folder``."""
        summary = result.summary
        return cls(objects=tuple(result.outputs), backend_used=result.backend_used,
                   model_version=result.model_version, weights_hash=result.weights_hash,
                   summary=result.summary_path.relative_to(folder).as_posix(),
                   qc=tuple(_finding(f) for f in summary.get("qc") or ()),
                   pictures=tuple(Picture.from_json(p) for p in summary.get("pictures") or ()))
