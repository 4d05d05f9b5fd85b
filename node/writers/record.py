"""The record of one encoded object (SEG, RTSTRUCT, overlay image, SR, NIfTI), as jobs exchange it.

Kept apart from the writers themselves so that the node, which reads job
results, never imports an encoding library.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from segnode.errors import InputError


@dataclass(frozen=True)
class EncodedObject:
    """One object a job wrote, as the worker, the index and the dispatcher exchange it.

    ``path`` is relative to the job folder the object was written in; whoever
    opens the file resolves it against that folder.
    """

    kind: str
    profile: str
    path: str
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str

    def to_json(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: object) -> EncodedObject:
        """Strict: exactly this class's keys, each a string (:class:`InputError` otherwise)."""
        return cls(**string_fields(cls, data, "an encoded object"))


def string_fields(record: type, data: object, what: str, *, non_empty: bool = False) -> dict[str, str]:
    """``data`` if it is a JSON object of exactly ``record``'s dataclass fields, each a (non-empty) string."""
    names = {f.name for f in fields(record)}
    if not isinstance(data, dict) or set(data) != names or not all(
            isinstance(v, str) and (v or not non_empty) for v in data.values()):
        raise InputError(f"{what} must be a JSON object of the strings {', '.join(sorted(names))}")
    return data
