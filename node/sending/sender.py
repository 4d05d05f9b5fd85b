"""What every sender offers: send a job's files, echo, and one typed result per try.

A destination is reached by DIMSE (:mod:`segnode.node.sending.dimse`) or by
STOW-RS (:mod:`segnode.node.sending.stow`); both are a :class:`Sender`, built
by :func:`sender_for` from the destination's configuration.  A sender never
retries by itself and never raises for network trouble: each object gets a
:class:`SendResult` whose category (the status table's, :mod:`segnode.node.status`)
tells the node's retry policy (:mod:`segnode.node.dispatch`) what to do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from segnode.node.config import Destination, Dispatch
from segnode.node.status import Category


@dataclass(frozen=True)
class SendResult:
    """The outcome of one try to send one object (or to echo).

    ``category``: stored, retryable (no connection, a timeout, an abort, out of
    resources) or permanent (refused for good); ``status``: the DICOM status or
    STOW-RS failure reason the peer answered, when it answered one.
    """

    category: Category
    message: str
    status: int | None = None

    @property
    def ok(self) -> bool:
        return self.category is Category.STORED

    @property
    def retryable(self) -> bool:
        return self.category is Category.RETRYABLE

    @classmethod
    def stored(cls, message: str, status: int | None = None) -> SendResult:
        return cls(Category.STORED, message, status)

    @classmethod
    def retry(cls, message: str, status: int | None = None) -> SendResult:
        return cls(Category.RETRYABLE, message, status)

    @classmethod
    def refused(cls, message: str, status: int | None = None) -> SendResult:
        return cls(Category.PERMANENT, message, status)


@dataclass(frozen=True)
class Deadlines:
    """How long one try may take: TCP connect, each wait for the peer, the whole try (seconds)."""

    connect_s: float
    response_s: float
    attempt_s: float

    def __post_init__(self) -> None:
        if min(self.connect_s, self.response_s, self.attempt_s) <= 0:
            raise ValueError("deadlines must be positive")

    @classmethod
    def of(cls, dest: Destination, dispatch: Dispatch) -> Deadlines:
        """A destination's own deadlines, else the ``dispatch:`` defaults."""
        return cls(connect_s=dest.connect_timeout_s or dispatch.connect_timeout_s,
                   response_s=dest.timeout_s or dispatch.timeout_s,
                   attempt_s=dest.attempt_timeout_s or dispatch.attempt_timeout_s)


class Sender(Protocol):
    """One destination, as the delivery queues see it."""

    def send(self, paths: Sequence[Path]) -> list[SendResult]:
        """Send every file of ``paths`` in one association or request; one result per path, in order."""
        ...

    def echo(self) -> SendResult:
        """Check that the destination answers (C-ECHO)."""
        ...


def sender_for(dest: Destination, *, calling_ae: str, dispatch: Dispatch) -> Sender:
    """The sender for ``dest``: STOW-RS when it has ``dicomweb``, else C-STORE."""
    deadlines = Deadlines.of(dest, dispatch)
    if dest.dicomweb is not None:
        from segnode.node.sending.stow import StowSender

        return StowSender(dest.name, dest.dicomweb, deadlines)
    from segnode.node.sending.dimse import DimseSender

    return DimseSender(dest, calling_ae=dest.calling_ae_title or calling_ae, deadlines=deadlines)
