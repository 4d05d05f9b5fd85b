"""The one exception tree of segnode.

Every error a user can cause or meet is a :class:`SegnodeError`; the CLI maps
each branch to an exit code (``exit_code``) and prints the message, never a
traceback.  Third-party exceptions are translated at the boundary that calls
the third-party code, keeping the original as ``__cause__``.
"""

from __future__ import annotations


class SegnodeError(Exception):
    """Base of every segnode error.

    Parameters
    ----------
    message:
        What is wrong, in words an operator understands.
    where:
        The file, series, rule or key the error is about, if any.
    """

    exit_code = 1

    def __init__(self, message: str, *, where: str | None = None) -> None:
        self.message = message
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


class ConfigError(SegnodeError):
    """A configuration, profile or rules file is invalid, or usage is wrong."""

    exit_code = 2


class InputError(SegnodeError):
    """The input images cannot be used (malformed, not CT, missing slices...)."""

    exit_code = 3


class BackendError(SegnodeError):
    """A segmentation backend failed or cannot run."""

    exit_code = 4


class DependencyMissingError(BackendError):
    """An optional library that a backend needs is not installed."""


class WeightsError(BackendError):
    """Model weights are missing, unreadable or fail their hash check."""


class WeightsNotInstalledError(WeightsError):
    """No weights of this model were imported (a setting of the site, not a fault)."""


class EncodeError(SegnodeError):
    """A result could not be encoded as DICOM SEG or NIfTI."""

    exit_code = 4


class StorageError(SegnodeError):
    """The spool, index or dataset store failed (disk full, corrupt file...)."""

    exit_code = 5


class DispatchError(SegnodeError):
    """A result could not be delivered to a destination."""

    exit_code = 6
