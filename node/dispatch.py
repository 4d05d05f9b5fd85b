"""Delivering results: C-STORE of a SEG file to a destination, and C-ECHO.

The dispatcher knows nothing of models: it gets a file and a destination.
Each attempt ends in a :class:`SendResult` that says whether to retry:
connection refused or timed out, a transient association rejection, an
abort, or an ``0xA7xx`` (out of resources) status are worth retrying with
exponential backoff (:func:`backoff_s`); a permanent rejection, no accepted
presentation context for the SEG, or any other failure status is not, and the
delivery goes to dead-letter at once.  The SEG file is sent as stored, without
decoding.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

from pydicom.filereader import read_file_meta_info
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification

from segnode.errors import DispatchError
from segnode.node.config import Destination, NodeConfig

logger = logging.getLogger(__name__)

#: C-STORE statuses meaning "stored" (success and the storage warnings).
_STORED = {0x0000, 0x0001, 0xB000, 0xB006, 0xB007}


@dataclass(frozen=True)
class SendResult:
    ok: bool
    retryable: bool
    message: str


def backoff_s(attempts: int, initial_s: float, max_s: float) -> float:
    """Delay before the next try after ``attempts`` failed ones: ``initial·2^(n-1)``, capped."""
    return min(max_s, initial_s * 2 ** max(0, attempts - 1))


def _client_ssl(dest: Destination) -> tuple[ssl.SSLContext, str] | None:
    if dest.tls is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(dest.tls.ca) if dest.tls.ca else None)
    ctx.check_hostname = dest.tls.check_hostname
    if dest.tls.cert is not None:
        ctx.load_cert_chain(str(dest.tls.cert), str(dest.tls.key) if dest.tls.key else None)
    return ctx, dest.host


def _associate(ae: AE, dest: Destination) -> tuple[Association | None, SendResult | None]:
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=_client_ssl(dest))
    if assoc.is_established:
        return assoc, None
    if assoc.is_rejected:
        rj = assoc.acceptor.primitive
        result = getattr(rj, "result", None)
        reason = getattr(rj, "diagnostic", None)
        permanent = result == 0x01
        kind = "permanently" if permanent else "transiently"
        return None, SendResult(False, not permanent, f"association rejected {kind} (reason {reason})")
    if assoc.is_aborted and assoc.rejected_contexts and not assoc.accepted_contexts:
        # accepted, but with every context refused: pynetdicom then aborts by itself
        return None, SendResult(False, False, "destination accepts no presentation context for this SOP class")
    if assoc.is_aborted:
        return None, SendResult(False, True, "association aborted by the destination")
    return None, SendResult(False, True, f"cannot connect to {dest.host}:{dest.port}")


def _make_ae(calling_ae: str, timeout_s: float) -> AE:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    return ae


def send_file(dest: Destination, path: Path, *, calling_ae: str, timeout_s: float = 30.0) -> SendResult:
    """C-STORE the Part 10 file ``path`` to ``dest``; never raises for network trouble."""
    try:
        meta = read_file_meta_info(path)
    except (OSError, ValueError) as exc:
        raise DispatchError(f"cannot read the file to send: {exc}", where=str(path)) from exc
    ae = _make_ae(dest.calling_ae_title or calling_ae, timeout_s)
    ae.add_requested_context(meta.MediaStorageSOPClassUID, [meta.TransferSyntaxUID])
    assoc, failure = _associate(ae, dest)
    if assoc is None:
        return failure  # type: ignore[return-value]
    try:
        if not assoc.accepted_contexts:
            return SendResult(False, False, "destination accepts no presentation context for this SOP class")
        status = assoc.send_c_store(path)
    finally:
        if assoc.is_established:
            assoc.release()
    code = getattr(status, "Status", None)
    if code is None:
        return SendResult(False, True, "no C-STORE response (timeout or abort)")
    if code in _STORED:
        return SendResult(True, False, f"stored (status 0x{code:04X})")
    comment = f" ({status.ErrorComment})" if "ErrorComment" in status else ""
    return SendResult(False, (code & 0xFF00) == 0xA700, f"C-STORE refused with status 0x{code:04X}{comment}")


def echo(dest: Destination, *, calling_ae: str, timeout_s: float = 10.0) -> SendResult:
    """C-ECHO ``dest``."""
    ae = _make_ae(dest.calling_ae_title or calling_ae, timeout_s)
    ae.add_requested_context(Verification)
    assoc, failure = _associate(ae, dest)
    if assoc is None:
        return failure  # type: ignore[return-value]
    try:
        status = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    code = getattr(status, "Status", None)
    if code == 0x0000:
        return SendResult(True, False, "echo succeeded")
    return SendResult(False, True, "no echo response" if code is None else f"echo status 0x{code:04X}")


def deliver(config: NodeConfig, destination: str, path: Path) -> SendResult:
    """Send ``path`` to the configured destination named ``destination``."""
    dest = config.destination(destination)
    result = send_file(dest, path, calling_ae=config.ae_title, timeout_s=config.dispatch.timeout_s)
    log = logger.info if result.ok else logger.warning
    log("delivery of %s to %s: %s", path.name, destination, result.message)
    return result
