"""Delivering results: C-STORE of a job's files (SEG, RTSTRUCT, ...) to a destination, and C-ECHO.

The dispatcher knows nothing of models: it gets a file and a destination.
Each attempt ends in a :class:`SendResult` that says whether to retry:
connection refused or timed out, a transient association rejection, an
abort, or an ``0xA7xx`` (out of resources) status are worth retrying with
exponential backoff (:func:`backoff_s`); a permanent rejection, no accepted
presentation context for the object's SOP class, or any other failure status
is not, and the object goes to dead-letter at once.  All objects of a job for
one destination go in one association, each with its own result, so that a
retry re-sends only what was not stored.  Files are sent as stored, without
decoding.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification
from segnode.errors import ConfigError, DispatchError
from segnode.node.config import Destination, NodeConfig
from segnode.output_kinds import OutputKind, parse_kinds

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
    return send_files(dest, [path], calling_ae=calling_ae, timeout_s=timeout_s)[0]


def send_files(dest: Destination, paths: Sequence[Path], *, calling_ae: str,
               timeout_s: float = 30.0) -> list[SendResult]:
    """C-STORE every Part 10 file of ``paths`` in one association; one result per path, in order.

    The association proposes one presentation context per (SOP class, transfer
    syntax) of the files.  A file whose context the destination refuses fails
    permanently on its own; the others are still sent.  When the association
    cannot be opened, or is lost, every file not yet stored gets that result.
    A destination with ``dicomweb`` gets them by STOW-RS instead (:mod:`segnode.node.sending.stow`).
    """
    if dest.dicomweb is not None:
        from segnode.node.sending.stow import stow_files

        return stow_files(dest, paths, timeout_s=timeout_s)
    if not paths:
        return []
    metas = [_meta(path) for path in paths]
    ae = _make_ae(dest.calling_ae_title or calling_ae, timeout_s)
    for pair in dict.fromkeys((str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID)) for m in metas):
        ae.add_requested_context(pair[0], [pair[1]])
    assoc, failure = _associate(ae, dest)
    if assoc is None:
        return [failure] * len(paths)  # type: ignore[list-item]
    try:
        accepted = {(str(cx.abstract_syntax), str(ts)) for cx in assoc.accepted_contexts for ts in cx.transfer_syntax}
        return [_store_one(assoc, path, meta, accepted) for path, meta in zip(paths, metas)]
    finally:
        if assoc.is_established:
            assoc.release()


def _meta(path: Path) -> Any:
    try:
        return read_file_meta_info(path)
    except (OSError, ValueError) as exc:
        raise DispatchError(f"cannot read the file to send: {exc}", where=str(path)) from exc


def _store_one(assoc: Association, path: Path, meta: Any, accepted: set[tuple[str, str]]) -> SendResult:
    sop_class = str(meta.MediaStorageSOPClassUID)
    if (sop_class, str(meta.TransferSyntaxUID)) not in accepted:
        return SendResult(False, False, "destination accepts no presentation context for this SOP class "
                                        f"({_class_name(sop_class)})")
    if not assoc.is_established:
        return SendResult(False, True, "association lost before this object was sent")
    status = assoc.send_c_store(path)
    code = getattr(status, "Status", None)
    if code is None:
        return SendResult(False, True, "no C-STORE response (timeout or abort)")
    if code in _STORED:
        return SendResult(True, False, f"stored (status 0x{code:04X})")
    comment = f" ({status.ErrorComment})" if "ErrorComment" in status else ""
    return SendResult(False, (code & 0xFF00) == 0xA700, f"C-STORE refused with status 0x{code:04X}{comment}")


def _class_name(uid: str) -> str:
    name = UID(uid).name
    return name if name and name != uid else uid


def echo(dest: Destination, *, calling_ae: str, timeout_s: float = 10.0) -> SendResult:
    """C-ECHO ``dest`` (a STOW-RS destination: not supported, says so)."""
    if dest.dicomweb is not None:
        return SendResult(False, False, "a DICOMweb destination has no C-ECHO")
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


def deliver_objects(config: NodeConfig, destination: str, paths: Sequence[Path]) -> list[SendResult]:
    """Send every file of ``paths`` to the destination named ``destination`` in one association."""
    dest = config.destination(destination)
    results = send_files(dest, paths, calling_ae=config.ae_title, timeout_s=config.dispatch.timeout_s)
    for path, result in zip(paths, results):
        log = logger.info if result.ok else logger.warning
        log("delivery of %s to %s: %s", path.name, destination, result.message)
    return results


def summarise(kinds: Sequence[str], results: Sequence[SendResult],
              dead: Sequence[tuple[str, str]] = ()) -> SendResult:
    """One delivery's result from its objects': ``kinds[i]`` was sent with ``results[i]``.

    Stored when every object is (``dead``: objects of earlier attempts that failed for good);
    retryable when a failure is; the message names the kind of each failure.
    """
    failed = [(k, r.message) for k, r in zip(kinds, results) if not r.ok] + list(dead)
    if not failed:
        return SendResult(True, False, f"stored {len(results)} object(s)" if results else "nothing left to send")
    by_message: dict[str, list[str]] = {}
    for kind, message in failed:
        by_message.setdefault(message, []).append(kind)
    text = "; ".join(f"{', '.join(dict.fromkeys(k))}: {m}" for m, k in by_message.items())
    return SendResult(False, any(r.retryable for r in results if not r.ok), text)


def encoded_kinds(config: NodeConfig, route_outputs: Sequence[str] | None,
                  destinations: Sequence[str]) -> tuple[str, ...]:
    """The kinds a job encodes: the route's ``outputs``, else what its destinations take.

    A destination without ``outputs`` counts as taking ``seg``; no destination at all: ``seg``.
    A destination is then sent the encoded kinds it takes (:meth:`Destination.takes`).
    """
    if route_outputs:
        return parse_kinds(route_outputs)
    wanted: list[str] = []
    for name in destinations:
        try:
            wanted += config.destination(name).outputs or [OutputKind.SEG.value]
        except ConfigError:  # gone from the config since routing: dispatch reports it
            wanted.append(OutputKind.SEG.value)
    return parse_kinds(wanted) or (OutputKind.SEG.value,)
