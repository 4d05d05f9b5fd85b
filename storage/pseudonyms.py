"""Keyed pseudonyms: HMAC-SHA256 of an identifier under a secret that lives outside the store.

The same secret always gives the same pseudonym for the same input, so a patient
keeps one pseudonym across studies, a study keeps one StudyInstanceUID across
its series, and an image and its SEG stay linked; another secret gives
unrelated pseudonyms.  Each kind of identifier has its own domain prefix so a
patient ID can never collide with a UID of the same spelling.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from segnode.errors import ConfigError

#: environment variable naming the secret file when no path is given
SECRET_ENV = "SEGNODE_DEID_SECRET_FILE"
MIN_SECRET_BYTES = 16
#: the date shift is between 1 and this many days into the past
MAX_SHIFT_DAYS = 3652


def load_secret(path: Path | str | None) -> bytes:
    """Read the HMAC secret from ``path`` or ``$SEGNODE_DEID_SECRET_FILE``.

    Raises :class:`ConfigError` when neither is given, the file is unreadable,
    or it holds fewer than :data:`MIN_SECRET_BYTES` bytes.  The secret is never
    printed.
    """
    chosen = path or os.environ.get(SECRET_ENV)
    if not chosen:
        raise ConfigError(
            "no de-identification secret: give --secret-file, deid_secret_file in the node "
            f"config, or ${SECRET_ENV} (a file of at least {MIN_SECRET_BYTES} random bytes)"
        )
    try:
        secret = Path(chosen).read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the secret file: {exc.strerror}", where=str(chosen)) from exc
    return check_secret(secret, str(chosen))


def check_secret(secret: bytes | None, where: str = "secret") -> bytes:
    """Return ``secret`` if it is long enough to key the HMAC."""
    if not secret or len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"the de-identification secret must hold at least {MIN_SECRET_BYTES} bytes", where=where
        )
    return secret


class Pseudonymizer:
    """All pseudonyms derived from one secret."""

    def __init__(self, secret: bytes) -> None:
        self._secret = check_secret(secret)

    def _digest(self, domain: str, value: str) -> bytes:
        message = f"{domain}\x00{value}".encode("utf-8", "surrogateescape")
        return hmac.new(self._secret, message, hashlib.sha256).digest()

    def _token(self, domain: str, value: str, length: int) -> str:
        return self._digest(domain, value).hex()[:length].upper()

    def key_check(self) -> str:
        """A fingerprint of the secret (not reversible) to detect a wrong secret."""
        return self._digest("key-check", "segnode").hex()[:16]

    def uid(self, uid: str) -> str:
        """A valid ``2.25.`` UID (at most 44 characters) standing for ``uid``."""
        return "2.25." + str(int.from_bytes(self._digest("uid", uid.strip())[:16], "big"))

    def patient_id(self, patient_key: str) -> str:
        """``P`` + 15 hex digits (fits LO and the 16-character SH limits)."""
        return "P" + self._token("patient", patient_key, 15)

    def accession(self, accession: str) -> str:
        return "A" + self._token("accession", accession, 15)

    def case_id(self, source_key: str) -> str:
        """Case identifier used in the store and in file names (``C`` + 15 hex digits)."""
        return "C" + self._token("case", source_key, 15)

    def ae_title(self, ae_title: str) -> str:
        return "AE" + self._token("ae", ae_title.strip(), 14)

    def time_shift_seconds(self, patient_key: str) -> int:
        """Seconds to move every time of day of this patient (0 … 86399, modulo a day)."""
        return int.from_bytes(self._digest("time-shift", patient_key)[:4], "big") % 86400

    def date_shift_days(self, patient_key: str) -> int:
        """Days to move every date of this patient into the past (1 … 3652)."""
        return 1 + int.from_bytes(self._digest("date-shift", patient_key)[:4], "big") % MAX_SHIFT_DAYS
