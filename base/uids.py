"""DICOM UID grammar (PS3.5 §9.1), checked before a UID touches any path.

A UID is at most 64 characters of digits and dots; each dot-separated
component is a non-empty number without leading zeros (``0`` alone is
allowed).  Anything else — ``..``, ``1.2/../../x``, an empty string, a
trailing NUL — is refused, so a peer can never steer where a file lands.
"""

from __future__ import annotations

import re
from typing import TypeGuard

from segnode.errors import InputError

MAX_UID_LENGTH = 64
_UID = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*")


def is_valid_uid(value: object) -> TypeGuard[str]:
    """Whether ``value`` is a string that follows the DICOM UID grammar."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_UID_LENGTH
        and _UID.fullmatch(value) is not None
    )


def check_uid(value: object, what: str) -> str:
    """Return ``value`` if it is a valid UID, else raise :class:`InputError`.

    Parameters
    ----------
    value:
        The candidate, usually straight from a received dataset.
    what:
        Its name for the message (``"SOPInstanceUID"``).
    """
    if is_valid_uid(value):
        return value
    shown = repr(value)[:80]
    raise InputError(f"{what} {shown} is not a valid DICOM UID (digits and dots, at most 64)")
