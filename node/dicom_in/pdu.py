"""The DICOM upper layer's PDUs (PS3.8 §9) and DIMSE command sets, decoded defensively.

The receiver (:mod:`segnode.node.dicom_in.receiver`) reads the network
through this module.  Every byte is
checked before use; a request that can be answered is refused with an
A-ASSOCIATE-RJ whose reason says why (:class:`Rejection`), anything else
(a length past its PDU, a missing item) is a :class:`ProtocolError` carrying
the A-ABORT reason (PS3.8 §9.3.8).  AE titles follow PS3.5's AE grammar
(at most 16 characters of the default repertoire, no backslash, no control
characters); UIDs follow :mod:`segnode.uids` — a context whose UIDs break it is
refused, never echoed back in a form we cannot encode.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from segnode.identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from segnode.uids import is_valid_uid

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ, P_DATA, RELEASE_RQ, RELEASE_RP, ABORT = range(1, 8)
PDU_TYPES = frozenset(range(1, 8))
C_STORE_RQ, C_ECHO_RQ = 0x0001, 0x0030
N_EVENT_REPORT_RQ, N_EVENT_REPORT_RSP = 0x0100, 0x8100
NO_DATASET = 0x0101
IMPLICIT_LE = "1.2.840.10008.1.2"

#: (result, source, reason) of an A-ASSOCIATE-RJ (PS3.8 §9.3.4), as DCMTK and pynetdicom send them.
Reason = tuple[int, int, int]
REJECT_NO_REASON = (0x01, 0x01, 0x01)  # permanent, service user: e.g. no (or invalid) presentation contexts
REJECT_APPLICATION_CONTEXT = (0x01, 0x01, 0x02)
REJECT_SENDER = (0x01, 0x01, 0x03)  # calling AE title not recognised
REJECT_CALLED_AE = (0x01, 0x01, 0x07)
REJECT_PROTOCOL_VERSION = (0x01, 0x02, 0x02)  # permanent, service provider (ACSE)
REJECT_BUSY = (0x02, 0x03, 0x02)  # transient, service provider (presentation): local limit exceeded

#: A-ABORT reasons (source 2, service provider).
ABORT_NOT_SPECIFIED, ABORT_UNRECOGNISED_PDU, ABORT_UNEXPECTED_PDU = 0, 1, 2
ABORT_INVALID_PARAMETER = 6

#: presentation context results (PS3.8 §9.3.3.2).
ACCEPTANCE, ABSTRACT_NOT_SUPPORTED, TRANSFER_NOT_SUPPORTED = 0, 3, 4

PDU_HEADER = struct.Struct(">BxL")
PDV_HEADER = struct.Struct(">LBB")
_ITEM = struct.Struct(">BxH")
_ELEMENT = struct.Struct("<HHL")
_PRINTABLE = frozenset(range(0x20, 0x7F))
_AE_BYTES = _PRINTABLE - {0x5C}  # default repertoire without control characters or backslash


class ProtocolError(Exception):
    """The peer broke PS3.8 (or a limit); the connection is aborted with ``reason``."""

    def __init__(self, message: str, reason: int = ABORT_INVALID_PARAMETER) -> None:
        super().__init__(message)
        self.reason = reason


class Rejection(Exception):
    """An A-ASSOCIATE-RQ answered with an A-ASSOCIATE-RJ (``reason``: result, source, diagnostic)."""

    def __init__(self, message: str, reason: Reason) -> None:
        super().__init__(message)
        self.reason = reason


# -- values -------------------------------------------------------------------------------


def ae_title(raw: bytes) -> str | None:
    """The AE title in a 16-byte field (spaces not significant), or ``None`` if it breaks PS3.5."""
    title = raw.strip(b" ")
    if not title or len(raw) > 16 or not set(title) <= _AE_BYTES:
        return None
    return title.decode("ascii")


def uid(raw: bytes) -> str | None:
    """A UID from the network (one trailing NUL pad allowed), or ``None`` if it breaks the grammar."""
    text = raw[:-1] if raw.endswith(b"\x00") else raw
    if not text.isascii():
        return None
    value = text.decode("ascii")
    return value if is_valid_uid(value) else None


def items(data: bytes | bytearray | memoryview, offset: int) -> list[tuple[int, bytes]]:
    """The ``(type, value)`` items from ``offset`` to the end (PS3.8 §9.3: type, reserved, 2-byte length)."""
    out = []
    while offset < len(data):
        if offset + 4 > len(data):
            raise ProtocolError("truncated item")
        kind, length = _ITEM.unpack_from(data, offset)
        if offset + 4 + length > len(data):
            raise ProtocolError(f"item 0x{kind:02x} longer than its PDU")
        out.append((kind, bytes(data[offset + 4:offset + 4 + length])))
        offset += 4 + length
    return out


def _item(kind: int, value: bytes) -> bytes:
    return _ITEM.pack(kind, len(value)) + value


# -- A-ASSOCIATE-RQ -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Context:
    """A proposed presentation context; UIDs that break the grammar are ``None`` / left out."""

    context_id: int
    abstract_syntax: str | None
    transfer_syntaxes: tuple[str, ...]
    malformed: bool = False  # a UID in it broke the grammar


@dataclass(frozen=True)
class AssociateRequest:
    """The parts of an A-ASSOCIATE-RQ this node acts on."""

    called_ae: str
    calling_ae: str
    contexts: tuple[Context, ...]
    raw_called: bytes
    raw_calling: bytes
    max_pdu: int = 0  # the requestor's maximum PDU length; 0: unlimited
    user_items: tuple[tuple[int, bytes], ...] = ()  # the user information's sub-items, as sent


def parse_associate_rq(body: bytes | bytearray) -> AssociateRequest:
    """Decode and check an A-ASSOCIATE-RQ's body (PS3.8 §9.3.2).

    Raises :class:`ProtocolError` when the structure is broken and
    :class:`Rejection` when it is well formed but cannot be accepted as sent
    (protocol version, AE titles, application context, presentation contexts).
    """
    if len(body) < 68:
        raise ProtocolError("A-ASSOCIATE-RQ too short")
    found = items(body, 68)
    raw_called, raw_calling = bytes(body[4:20]), bytes(body[20:36])
    if not body[1] & 0x01:
        raise Rejection("protocol version 1 not offered", REJECT_PROTOCOL_VERSION)
    called, calling = ae_title(raw_called), ae_title(raw_calling)
    if called is None:
        raise Rejection(f"called AE title {raw_called!r} breaks the AE grammar", REJECT_CALLED_AE)
    if calling is None:
        raise Rejection(f"calling AE title {raw_calling!r} breaks the AE grammar", REJECT_SENDER)
    if [uid(value) for kind, value in found if kind == 0x10] != [APPLICATION_CONTEXT]:
        raise Rejection("not the DICOM application context", REJECT_APPLICATION_CONTEXT)
    contexts = tuple(_parse_context(value) for kind, value in found if kind == 0x20)
    _check_context_ids(contexts)
    user = [value for kind, value in found if kind == 0x50]
    max_pdu = _max_pdu(user)
    return AssociateRequest(called, calling, contexts, raw_called, raw_calling, max_pdu, tuple(items(user[0], 0)))


def _parse_context(value: bytes) -> Context:
    if len(value) < 4:
        raise ProtocolError("presentation context item too short")
    sub = items(value, 4)
    abstracts = [raw for kind, raw in sub if kind == 0x30]
    transfers = [raw for kind, raw in sub if kind == 0x40]
    if len(abstracts) != 1 or not transfers:
        raise ProtocolError(f"presentation context {value[0]} needs one abstract and a transfer syntax")
    abstract = uid(abstracts[0])
    valid = tuple(ts for ts in map(uid, transfers) if ts is not None)
    return Context(value[0], abstract, valid, abstract is None or len(valid) != len(transfers))


def _check_context_ids(contexts: tuple[Context, ...]) -> None:
    ids = [c.context_id for c in contexts]
    if not ids:
        raise Rejection("no presentation context proposed", REJECT_NO_REASON)
    if any(i % 2 == 0 for i in ids) or len(set(ids)) != len(ids):
        raise Rejection(f"presentation context IDs {ids} are not unique odd numbers 1-255", REJECT_NO_REASON)


def _max_pdu(user: list[bytes]) -> int:
    if len(user) != 1:
        raise ProtocolError("A-ASSOCIATE-RQ needs one user information item")
    lengths = [value for kind, value in items(user[0], 0) if kind == 0x51]
    if len(lengths) != 1 or len(lengths[0]) != 4:
        raise ProtocolError("user information without a maximum length")
    return int.from_bytes(lengths[0], "big")


# -- negotiation and the answers --------------------------------------------------------------


@dataclass(frozen=True)
class ContextResult:
    context_id: int
    result: int
    abstract_syntax: str
    transfer_syntax: str


def negotiate(contexts: tuple[Context, ...], supported: dict[str, tuple[str, ...]]) -> list[ContextResult]:
    """One result per proposed context, as pynetdicom's acceptor decides.

    Acceptance (0) takes the first proposed transfer syntax we support;
    3 refuses an abstract syntax we do not support (or one that breaks the UID
    grammar), 4 one with no transfer syntax we support.
    """
    results = []
    for context in contexts:
        ours = supported.get(context.abstract_syntax or "")
        chosen = next((ts for ts in context.transfer_syntaxes if ours is not None and ts in ours), None)
        echoed = context.transfer_syntaxes[0] if context.transfer_syntaxes else IMPLICIT_LE
        if ours is None:
            result = ContextResult(context.context_id, ABSTRACT_NOT_SUPPORTED, "", echoed)
        elif chosen is None:
            result = ContextResult(context.context_id, TRANSFER_NOT_SUPPORTED, "", echoed)
        else:
            result = ContextResult(context.context_id, ACCEPTANCE, context.abstract_syntax or "", chosen)
        results.append(result)
    return results


def role_selections(user_items: tuple[tuple[int, bytes], ...]) -> dict[str, tuple[int, int]]:
    """The SCP/SCU Role Selection sub-items (PS3.7 D.3.3.4): SOP Class UID → (SCU role, SCP role).

    A sub-item too short for its UID length or with a UID that breaks the grammar is left out.
    """
    roles: dict[str, tuple[int, int]] = {}
    for kind, value in user_items:
        if kind != 0x54 or len(value) < 4:
            continue
        length = int.from_bytes(value[:2], "big")
        if len(value) != length + 4:
            continue
        sop_class = uid(value[2:2 + length])
        if sop_class is not None:
            roles[sop_class] = (value[2 + length], value[3 + length])
    return roles


def role_item(sop_class: str, scu_role: int, scp_role: int) -> bytes:
    """An SCP/SCU Role Selection sub-item, as the acceptor answers it."""
    raw = sop_class.encode("ascii")
    return _item(0x54, struct.pack(">H", len(raw)) + raw + bytes([scu_role, scp_role]))


def encode_associate_ac(request: AssociateRequest, results: list[ContextResult], max_pdu: int,
                        roles: tuple[bytes, ...] = ()) -> bytes:
    """A-ASSOCIATE-AC (PS3.8 §9.3.3): the request's AE fields, context results, our user information.

    The user information names segnode (:mod:`segnode.identity`): its
    Implementation Class UID and Version Name (PS3.7 D.3.3.2); ``roles``: the
    answers to role selections (:func:`role_item`).
    """
    body = [struct.pack(">HH", 1, 0), request.raw_called, request.raw_calling, bytes(32),
            _item(0x10, APPLICATION_CONTEXT.encode())]
    for r in results:
        body.append(_item(0x21, bytes([r.context_id, 0, r.result, 0]) + _item(0x40, r.transfer_syntax.encode())))
    user = (_item(0x51, struct.pack(">L", max_pdu)),
            _item(0x52, IMPLEMENTATION_CLASS_UID.encode("ascii")),
            _item(0x55, IMPLEMENTATION_VERSION_NAME.encode("ascii")), *roles)
    body.append(_item(0x50, b"".join(user)))
    payload = b"".join(body)
    return PDU_HEADER.pack(ASSOCIATE_AC, len(payload)) + payload


def encode_associate_rj(reason: Reason) -> bytes:
    return PDU_HEADER.pack(ASSOCIATE_RJ, 4) + bytes([0, *reason])


def encode_abort(reason: int = ABORT_NOT_SPECIFIED) -> bytes:
    """A-ABORT from the service provider (source 2) with ``reason``."""
    return PDU_HEADER.pack(ABORT, 4) + bytes([0, 0, 2, reason])


RELEASE_RP_PDU = PDU_HEADER.pack(RELEASE_RP, 4) + bytes(4)
ABORT_PDU = encode_abort()


def check_control_pdu(kind: int, body: bytes | bytearray) -> None:
    """A-RELEASE-RQ/RP and A-ABORT have a 4-byte body (PS3.8 §9.3.6–8)."""
    if len(body) != 4:
        raise ProtocolError(f"PDU type 0x{kind:02x} with a {len(body)}-byte body (4 expected)")


def check_pdvs(body: bytes | bytearray | memoryview) -> None:
    """A P-DATA-TF body is one or more whole PDV items, each with a context ID and a control header."""
    offset = 0
    if not body:
        raise ProtocolError("P-DATA-TF without a PDV")
    while offset < len(body):
        if offset + 6 > len(body):
            raise ProtocolError("truncated PDV")
        length, _, control = PDV_HEADER.unpack_from(body, offset)
        if length < 2 or offset + 4 + length > len(body) or control & 0xFC:
            raise ProtocolError("PDV longer than its PDU or with a reserved control bit")
        offset += 4 + length


# -- DIMSE command sets (implicit VR little endian, group 0000) ---------------------------------


def parse_command(data: bytes | bytearray) -> dict[int, bytes]:
    """The elements of a command set, by element number (group 0000 only)."""
    out, offset = {}, 0
    while offset + 8 <= len(data):
        group, elem, length = _ELEMENT.unpack_from(data, offset)
        offset += 8
        if group != 0 or offset + length > len(data):
            raise ProtocolError("malformed command set")
        out[elem] = bytes(data[offset:offset + length])
        offset += length
    if offset != len(data):
        raise ProtocolError("command set ends inside an element header")
    return out


def check_command_set(data: bytes | bytearray) -> dict[int, bytes]:
    """A command set's elements, if it has what every DIMSE message needs (PS3.7 §9.3, §E).

    Command Field and Command Data Set Type as single US values, a Message ID
    (or the one responded to), and any Affected SOP Class / Instance UID as
    at most 64 printable ASCII characters (whether they follow the UID grammar
    is the C-STORE handler's to answer, with a status); else :class:`ProtocolError`.
    """
    elements = parse_command(data)
    if us(elements.get(0x0100)) is None or us(elements.get(0x0800)) is None:
        raise ProtocolError("command set without a Command Field or Command Data Set Type")
    if us(elements.get(0x0110)) is None and us(elements.get(0x0120)) is None:
        raise ProtocolError("command set without a Message ID")
    for elem in (0x0002, 0x1000):
        value = elements.get(elem, b"").rstrip(b"\x00 ")
        if len(value) > 64 or not set(value) <= _PRINTABLE:
            raise ProtocolError(f"command element (0000,{elem:04X}) is not a UID that can be decoded")
    return elements


def us(value: bytes | None) -> int | None:
    """An unsigned short from a command element, or ``None`` if absent or not two bytes."""
    return int.from_bytes(value, "little") if value is not None and len(value) == 2 else None


def _element(elem: int, value: bytes) -> bytes:
    return _ELEMENT.pack(0, elem, len(value)) + value


def _pad(value: bytes) -> bytes:
    return value + b"\x00" if len(value) % 2 else value


def encode_response(command_field: int, message_id: int, sop_class: bytes, status: int,
                    comment: str | None = None, sop_instance: bytes | None = None,
                    event_type: int | None = None) -> bytes:
    """A C-STORE-RSP / C-ECHO-RSP / N-EVENT-REPORT-RSP command set, elements in tag order, with its group length."""
    elements = [_element(0x0002, _pad(sop_class)), _element(0x0100, struct.pack("<H", command_field)),
                _element(0x0120, struct.pack("<H", message_id)), _element(0x0800, struct.pack("<H", NO_DATASET)),
                _element(0x0900, struct.pack("<H", status))]
    if comment:
        raw = comment.encode("ascii", "replace")[:64]
        elements.append(_element(0x0902, raw + b" " if len(raw) % 2 else raw))
    if sop_instance is not None:
        elements.append(_element(0x1000, _pad(sop_instance)))
    if event_type is not None:
        elements.append(_element(0x1002, struct.pack("<H", event_type)))
    body = b"".join(elements)
    return _element(0x0000, struct.pack("<L", len(body))) + body


def p_data(context_id: int, command: bytes) -> bytes:
    """One P-DATA-TF carrying a whole command set as its last fragment."""
    pdv = PDV_HEADER.pack(len(command) + 2, context_id, 0x03) + command
    return PDU_HEADER.pack(P_DATA, len(pdv)) + pdv


#: largest A-ASSOCIATE-RQ (or other non-data PDU) read before the max PDU is negotiated.
MAX_CONTROL_PDU = 1024 * 1024


def move_originator(command: dict[int, bytes]) -> tuple[str, int] | None:
    """A C-STORE-RQ's Move Originator AE Title (0000,1030) and Message ID (0000,1031); ``None`` unless both are there."""
    ae, message_id = command.get(0x1030), us(command.get(0x1031))
    if ae is None or message_id is None:
        return None
    return ae.decode("latin-1").strip(" \x00"), message_id


def network_uid(raw: bytes) -> str:
    """A UID from a command set as text (padding stripped); never fails, :func:`check_uid` judges it."""
    return raw.rstrip(b"\x00 ").decode("latin-1")
