"""Manifest rows of the dataset store and their JSON form.

A row names a case only by pseudonyms (case ID, patient, study and series
UIDs, source AE) and its files only by content hash (SHA-256 of the bytes in
``objects/``).  No row holds a real date or time: the dates are the shifted
ones and no harvest time stamp is kept, since it would date the study.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any

from segnode.errors import StorageError


class LabelStatus(str, Enum):
    """Where a case's label map comes from."""

    AUTO = "auto"  #: written by a backend, unchecked
    REVIEWED = "reviewed"  #: checked by a curator, unchanged
    CORRECTED = "corrected"  #: replaced by a curator's labels
    REJECTED = "rejected"  #: a clinical reviewer rejected this result before send (docs/review.md)


@dataclass(frozen=True)
class CaseRecord:
    """One harvested or imported case."""

    case_id: str
    dataset: str
    patient: str
    study_uid: str
    series_uid: str
    profile: str
    backend: str
    model_version: str
    weights_hash: str
    rule: str
    source_ae: str
    deid: tuple[str, ...]
    study_date: str
    series_date: str
    label_status: LabelStatus
    image: str
    label: str
    labels: dict[int, str]
    instances: tuple[str, ...] = ()
    dicom: tuple[str, ...] = ()
    seg: str = ""
    previous_labels: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["label_status"] = self.label_status.value
        out["labels"] = {str(k): v for k, v in sorted(self.labels.items())}
        return out

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "CaseRecord":
        data = dict(raw)
        data["label_status"] = LabelStatus(data["label_status"])
        data["labels"] = {int(k): v for k, v in data["labels"].items()}
        for key in ("deid", "instances", "dicom", "previous_labels"):
            data[key] = tuple(data.get(key, ()))
        return cls(**data)

    def hashes(self) -> tuple[str, ...]:
        """Every object this case refers to."""
        return tuple(h for h in (self.image, self.label, self.seg, *self.dicom) if h)

    def corrected(self, label_hash: str, labels: dict[int, str]) -> "CaseRecord":
        return replace(
            self,
            label=label_hash,
            labels=labels,
            label_status=LabelStatus.CORRECTED,
            previous_labels=(*self.previous_labels, self.label),
        )


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_json_atomic(path: Path, data: object, *, read_only: bool = False) -> None:
    """Write JSON through a temporary file and a rename (no half-written manifest)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    if read_only:
        tmp.chmod(0o444)
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise StorageError("missing", where=str(path)) from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise StorageError(f"unreadable manifest: {exc}", where=str(path)) from exc


def rows_hash(rows: list[dict[str, Any]]) -> str:
    """Hash of a version's rows in canonical JSON (what makes a version immutable)."""
    return sha256_bytes(json.dumps(rows, sort_keys=True, ensure_ascii=False).encode("utf-8"))
