"""The upper layer's PDUs and command sets byte by byte (node/dicom_in/pdu.py): each PDU type, sound and malformed.

What we encode is decoded again by pynetdicom's own PDU classes (an
independent reading of PS3.8); what we decode is built by
:mod:`tests.raw_peer`, with one field broken at a time.
"""

from __future__ import annotations

import struct
from io import BytesIO

import pytest
from pydicom.filereader import read_dataset
from pynetdicom.pdu import (
    A_ABORT_RQ,
    A_ASSOCIATE_AC,
    A_ASSOCIATE_RJ,
    A_RELEASE_RP,
    P_DATA_TF,
)
from segnode.identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from segnode.node.dicom_in import pdu
from segnode.node.dicom_in.pdu import (
    Context,
    ProtocolError,
    Rejection,
    check_control_pdu,
    check_pdvs,
    encode_associate_ac,
    encode_associate_rj,
    encode_response,
    negotiate,
    parse_associate_rq,
    parse_command,
)

from tests.raw_peer import (
    CT,
    EXPLICIT_LE,
    IMPLICIT_LE,
    MR,
    VERIFICATION,
    associate_rq,
    command_set,
    item,
)

SUPPORTED = {CT: (EXPLICIT_LE, IMPLICIT_LE), VERIFICATION: (IMPLICIT_LE,)}


def body_of(data: bytes) -> bytes:
    """A PDU's body (after its 6-byte header), checking the declared length."""
    assert int.from_bytes(data[2:6], "big") == len(data) - 6
    return data[6:]


def rq(**kwargs: object) -> bytes:
    contexts = kwargs.pop("contexts", [(1, CT, [EXPLICIT_LE]), (3, VERIFICATION, [IMPLICIT_LE])])
    return body_of(associate_rq(contexts, **kwargs))  # type: ignore[arg-type]


# -- values ----------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, expected", [
    (b"SCANNER".ljust(16), "SCANNER"), (b"  CT 1".ljust(16), "CT 1"), (b"A" * 16, "A" * 16),
    (b" " * 16, None), (b"SCAN\xe9ER".ljust(16), None), (b"SCAN\\ER".ljust(16), None),
    (b"SCAN\x00ER".ljust(16), None), (b"SCAN\x1bER".ljust(16), None), (b"A" * 17, None),
])
def test_ae_titles_follow_the_ps35_grammar(raw: bytes, expected: str | None) -> None:
    assert pdu.ae_title(raw) == expected


@pytest.mark.parametrize("raw, expected", [
    (b"1.2.840.10008.1.2", "1.2.840.10008.1.2"), (b"1.2.840.10008.1.2\x00", "1.2.840.10008.1.2"),
    (b"1.2.840.10008.1.2\xff", None), (b"1.2.\x80", None), (b"../../x", None), (b"1.02", None), (b"", None),
    (b"1.2\x00\x00", None), (b"1" * 65, None),
])
def test_network_uids_follow_the_uid_grammar(raw: bytes, expected: str | None) -> None:
    assert pdu.uid(raw) == expected


# -- A-ASSOCIATE-RQ --------------------------------------------------------------------------


def test_a_sound_request_is_decoded() -> None:
    request = parse_associate_rq(rq(calling="CT 1", max_pdu=32768))
    assert (request.called_ae, request.calling_ae, request.max_pdu) == ("SEGNODE", "CT 1", 32768)
    assert request.contexts == (Context(1, CT, (EXPLICIT_LE,)), Context(3, VERIFICATION, (IMPLICIT_LE,)))
    assert request.raw_calling == b"CT 1".ljust(16)


@pytest.mark.parametrize("kwargs, reason", [
    ({"version": 0}, pdu.REJECT_PROTOCOL_VERSION), ({"version": 2}, pdu.REJECT_PROTOCOL_VERSION),
    ({"called": b"SEG\xffNODE"}, pdu.REJECT_CALLED_AE), ({"called": b""}, pdu.REJECT_CALLED_AE),
    ({"calling": b"\x07BELL"}, pdu.REJECT_SENDER), ({"application_context": "1.2.3"}, pdu.REJECT_APPLICATION_CONTEXT),
    ({"application_context": b"1.2.840.10008.3.1.1.1\xff"}, pdu.REJECT_APPLICATION_CONTEXT),
    ({"contexts": []}, pdu.REJECT_NO_REASON), ({"contexts": [(2, CT, [EXPLICIT_LE])]}, pdu.REJECT_NO_REASON),
    ({"contexts": [(0, CT, [EXPLICIT_LE])]}, pdu.REJECT_NO_REASON),
    ({"contexts": [(5, CT, [EXPLICIT_LE]), (5, MR, [EXPLICIT_LE])]}, pdu.REJECT_NO_REASON),
])
def test_an_answerable_request_is_rejected_with_its_reason(kwargs: dict[str, object],
                                                          reason: tuple[int, int, int]) -> None:
    with pytest.raises(Rejection) as err:
        parse_associate_rq(rq(**kwargs))
    assert err.value.reason == reason


HEAD = (struct.pack(">HH", 1, 0) + b"SEGNODE".ljust(16) + b"SCANNER".ljust(16) + bytes(32)
        + item(0x10, pdu.APPLICATION_CONTEXT.encode()))
USER = item(0x50, item(0x51, struct.pack(">L", 16384)))
ABSTRACT, TRANSFER = item(0x30, CT.encode()), item(0x40, EXPLICIT_LE.encode())


def context(context_id: int, *sub_items: bytes) -> bytes:
    return item(0x20, bytes([context_id, 0, 0, 0]) + b"".join(sub_items))


@pytest.mark.parametrize("body", [
    HEAD[:67],  # shorter than the fixed fields
    (HEAD + context(1, ABSTRACT, TRANSFER) + USER)[:-3],  # the last item cut short
    HEAD + b"\x20\x00\xff\xff" + context(1, ABSTRACT, TRANSFER) + USER,  # an item longer than its PDU
    HEAD + context(1, ABSTRACT, TRANSFER) + USER + b"\x20",  # a truncated item header
    HEAD + context(1, ABSTRACT, TRANSFER),  # no user information
    HEAD + context(1, ABSTRACT, TRANSFER) + item(0x50, item(0x51, b"\x00\x40")),  # a 2-byte maximum length
    HEAD + context(1, ABSTRACT, TRANSFER) + item(0x50, b""),  # no maximum length
    HEAD + context(1, TRANSFER) + USER,  # a context without its abstract syntax
    HEAD + context(1, ABSTRACT) + USER,  # ... or without a transfer syntax
    HEAD + context(1, ABSTRACT, ABSTRACT, TRANSFER) + USER,  # ... or with two abstract syntaxes
    HEAD + item(0x20, b"\x01") + USER,  # a context item too short for its header
], ids=["short", "cut", "item-too-long", "truncated-item", "no-user-info", "bad-max-length", "no-max-length",
        "no-abstract", "no-transfer", "two-abstracts", "short-context"])
def test_a_broken_request_is_a_protocol_error(body: bytes) -> None:
    parse_associate_rq(HEAD + context(1, ABSTRACT, TRANSFER) + USER)  # the same, sound, decodes
    with pytest.raises(ProtocolError):
        parse_associate_rq(body)


def test_a_context_with_a_uid_that_breaks_the_grammar_is_marked_and_refused() -> None:
    request = parse_associate_rq(rq(contexts=[(1, b"1.2.\xe9", [EXPLICIT_LE]), (3, CT, [b"1.2\xff", EXPLICIT_LE]),
                                              (5, CT, [b"\x80"])]))
    assert [c.malformed for c in request.contexts] == [True, True, True]
    results = negotiate(request.contexts, SUPPORTED)
    assert [(r.context_id, r.result, r.transfer_syntax) for r in results] == [
        (1, pdu.ABSTRACT_NOT_SUPPORTED, EXPLICIT_LE), (3, pdu.ACCEPTANCE, EXPLICIT_LE),
        (5, pdu.TRANSFER_NOT_SUPPORTED, IMPLICIT_LE)]  # nothing echoed that we could not encode


def test_negotiation_takes_the_first_supported_syntax_and_names_each_refusal() -> None:
    contexts = (Context(1, CT, ("1.2.840.10008.1.2.4.201", IMPLICIT_LE, EXPLICIT_LE)), Context(3, MR, (EXPLICIT_LE,)),
                Context(5, CT, ("1.2.840.10008.1.2.4.201",)))
    assert [(r.result, r.transfer_syntax) for r in negotiate(contexts, SUPPORTED)] == [
        (0, IMPLICIT_LE), (3, EXPLICIT_LE), (4, "1.2.840.10008.1.2.4.201")]


# -- what we send, read back by pynetdicom ------------------------------------------------------


def test_the_associate_ac_decodes_in_pynetdicom() -> None:
    request = parse_associate_rq(rq(calling="SCANNER"))
    results = negotiate(request.contexts + (Context(5, MR, (EXPLICIT_LE,)),), SUPPORTED)
    ac = A_ASSOCIATE_AC()
    ac.decode(encode_associate_ac(request, results, 65536))
    assert (ac.called_ae_title, ac.calling_ae_title) == ("SEGNODE", "SCANNER")
    assert ac.application_context_name == pdu.APPLICATION_CONTEXT
    assert [(cx.context_id, cx.result) for cx in ac.presentation_context] == [(1, 0), (3, 0), (5, 3)]
    assert ac.user_information.maximum_length == 65536
    assert ac.user_information.implementation_class_uid == IMPLEMENTATION_CLASS_UID  # segnode's own identity
    assert ac.user_information.implementation_version_name == IMPLEMENTATION_VERSION_NAME


@pytest.mark.parametrize("reason", [pdu.REJECT_SENDER, pdu.REJECT_BUSY, pdu.REJECT_PROTOCOL_VERSION])
def test_the_associate_rj_decodes_in_pynetdicom(reason: tuple[int, int, int]) -> None:
    rj = A_ASSOCIATE_RJ()
    rj.decode(encode_associate_rj(reason))
    assert (rj.result, rj.source, rj.reason_diagnostic) == reason


def test_abort_and_release_decode_in_pynetdicom() -> None:
    abort = A_ABORT_RQ()
    abort.decode(pdu.encode_abort(pdu.ABORT_UNEXPECTED_PDU))
    assert (abort.source, abort.reason_diagnostic) == (2, 2)
    release = A_RELEASE_RP()
    release.decode(pdu.RELEASE_RP_PDU)
    assert release.pdu_type == 0x06


def test_a_response_command_set_decodes_and_p_data_frames_it() -> None:
    command = encode_response(0x8001, 7, CT.encode(), 0xA700, "inflated instance larger than the node accepts",
                              b"1.2.3")
    frame = P_DATA_TF()
    frame.decode(pdu.p_data(3, command))
    (item_,) = frame.presentation_data_value_items
    assert item_.context_id == 3 and item_.data == b"\x03" + command
    ds = read_dataset(BytesIO(command), is_implicit_VR=True, is_little_endian=True)
    assert (ds.CommandField, ds.MessageIDBeingRespondedTo, ds.Status) == (0x8001, 7, 0xA700)
    assert (ds.AffectedSOPClassUID, ds.AffectedSOPInstanceUID) == (CT, "1.2.3")
    assert ds.CommandGroupLength == len(command) - 12


# -- P-DATA-TF, release, abort, command sets ----------------------------------------------------


def pdv(context_id: int, control: int, data: bytes) -> bytes:
    return struct.pack(">LBB", len(data) + 2, context_id, control) + data


@pytest.mark.parametrize("body", [pdv(1, 0x03, b"ab"), pdv(1, 0x00, b"x" * 10) + pdv(1, 0x02, b""),
                                  pdv(255, 0x01, b"")])
def test_sound_pdv_items_pass(body: bytes) -> None:
    check_pdvs(body)


@pytest.mark.parametrize("body", [b"", pdv(1, 0x03, b"ab")[:-1], pdv(1, 0x03, b"ab") + b"\x00\x00",
                                  struct.pack(">LBB", 1, 1, 3), struct.pack(">LBB", 0xFFFFFFFF, 1, 3) + b"xx",
                                  pdv(1, 0x07, b"ab")],
                         ids=["empty", "cut", "trailing", "length-1", "huge-length", "reserved-bit"])
def test_broken_pdv_items_are_protocol_errors(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        check_pdvs(body)


@pytest.mark.parametrize("kind", [pdu.RELEASE_RQ, pdu.RELEASE_RP, pdu.ABORT])
def test_control_pdus_have_four_byte_bodies(kind: int) -> None:
    check_control_pdu(kind, bytes(4))
    for wrong in (b"", bytes(3), bytes(5)):
        with pytest.raises(ProtocolError):
            check_control_pdu(kind, wrong)


def test_command_sets_decode_and_broken_ones_do_not() -> None:
    command = command_set(0x0001, 9, CT, "1.2.3")
    elements = parse_command(command)
    assert pdu.us(elements[0x0100]) == 0x0001 and pdu.us(elements[0x0110]) == 9
    assert elements[0x1000] == b"1.2.3\x00"
    assert pdu.us(b"\x01") is None and pdu.us(None) is None
    for broken in (command[:-1], command + b"\x00\x00\x00", b"\x08\x00" + command[2:]):
        with pytest.raises(ProtocolError):
            parse_command(broken)


def test_a_command_set_has_what_every_dimse_message_needs() -> None:
    assert pdu.us(pdu.check_command_set(command_set(0x0001, 9, CT, "1.2.3"))[0x0100]) == 0x0001
    pdu.check_command_set(command_set(0x0001, 9, CT, ".."))  # decodable: the handler answers 0xC211 for it
    elements = [struct.pack("<HHL", 0, 0x0100, 2) + b"\x01\x00", struct.pack("<HHL", 0, 0x0110, 2) + b"\x01\x00",
                struct.pack("<HHL", 0, 0x0800, 2) + b"\x01\x01"]
    for missing in range(3):  # no Command Field, Message ID or Command Data Set Type
        with pytest.raises(ProtocolError):
            pdu.check_command_set(b"".join(e for k, e in enumerate(elements) if k != missing))
    for bad in (CT.encode() + b"\xe9", b"1" * 65, b"1.2\x01"):
        with pytest.raises(ProtocolError):
            pdu.check_command_set(command_set(0x0001, 9, bad, "1.2.3"))
