"""One table of the DICOM statuses the node answers or reads, with each code's category and metric reason.

The C-STORE answers of the store path (:mod:`segnode.node.ingest.store`), the
STOW-RS failure reasons (:mod:`segnode.node.http_in.stow`, PS3.18 Table
10.5.3-3), the warnings a peer may answer our C-STOREs with
(:mod:`segnode.node.dispatch`), and the reasons metrics count
(:mod:`segnode.node.ops.metrics`) all come from here, as pynetdicom's
``status.py`` with ``code_to_category()`` does for the library.

=======  ===================================  ==========  =========================
code     name (PS3.4 B.2-1, PS3.7 C, PS3.18)  category    metric reason
=======  ===================================  ==========  =========================
0x0000   SUCCESS                              stored      —
0x0001   OPTIONAL_ATTRIBUTES_NOT_SUPPORTED    stored      —
0xB000   COERCION_OF_DATA_ELEMENTS            stored      —
0xB006   ELEMENTS_DISCARDED                   stored      —
0xB007   DATA_SET_DOES_NOT_MATCH_SOP_CLASS_   stored      —
         WARNING
0x0110   PROCESSING_FAILURE                   permanent   ``processing_failure``
0x0112   NO_SUCH_SOP_INSTANCE                 permanent   ``no_such_sop_instance``
0x0113   NO_SUCH_EVENT_TYPE                   permanent   ``no_such_event_type``
0x0115   INVALID_ARGUMENT_VALUE               permanent   ``invalid_argument_value``
0x0114   NO_SUCH_ARGUMENT                     permanent   ``no_such_argument``
0x0117   INVALID_OBJECT_INSTANCE              permanent   ``invalid_object_instance``
0x0118   NO_SUCH_SOP_CLASS                    permanent   ``no_such_sop_class``
0x0119   CLASS_INSTANCE_CONFLICT              permanent   ``class_instance_conflict``
0x0122   SOP_CLASS_NOT_SUPPORTED              permanent   ``sop_class_not_supported``
0x0123   NO_SUCH_ACTION                       permanent   ``no_such_action``
0x0124   NOT_AUTHORIZED                       permanent   ``not_authorized``
0x0210   DUPLICATE_INVOCATION                 permanent   ``duplicate_invocation``
0x0211   UNRECOGNIZED_OPERATION               permanent   ``unrecognized_operation``
0x0212   MISTYPED_ARGUMENT                    permanent   ``mistyped_argument``
0x0213   RESOURCE_LIMITATION                  retryable   ``resource_limitation``
0xA700   OUT_OF_RESOURCES                     retryable   ``out_of_resources``
0xA900   DATA_SET_DOES_NOT_MATCH_SOP_CLASS    permanent   ``sop_class_mismatch``
0xC000   CANNOT_UNDERSTAND                    permanent   ``cannot_understand``
0xC210   CANNOT_DECODE                        permanent   ``cannot_decode``
0xC211   INVALID_UID                          permanent   ``invalid_uid``
0xC212   UID_MISMATCH                         permanent   ``uid_mismatch``
=======  ===================================  ==========  =========================

A code not in the table is judged by its PS3.7 Annex C range
(:func:`category`): ``0xA7xx`` (refused, out of resources) retryable;
``0xBxxx`` (warning) stored; ``0xA9xx``, ``0xCxxx`` and any other failure
permanent.

The N-ACTION-RSP of a Storage Commitment request (PS3.7 10.1.4.1.10) reads
these codes too; there a processing failure ``0x0110`` is the SCP's own
trouble and is asked again (:func:`segnode.node.commitment.action_category`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, IntEnum


class Category(Enum):
    """What a status means for the instance: kept, worth another try, or refused for good."""

    STORED = "stored"
    RETRYABLE = "retryable"
    PERMANENT = "permanent"


class Status(IntEnum):
    """Every DICOM status code the node answers (C-STORE, STOW-RS, N-EVENT-REPORT) or reads from a peer."""

    SUCCESS = 0x0000
    #: PS3.7 C.4 warning: requested optional attributes are not supported
    OPTIONAL_ATTRIBUTES_NOT_SUPPORTED = 0x0001
    #: PS3.4 B.2-1 warnings: the peer stored the instance
    COERCION_OF_DATA_ELEMENTS = 0xB000
    ELEMENTS_DISCARDED = 0xB006
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS_WARNING = 0xB007
    #: PS3.7 C.4.2 / PS3.18 10.5.3: processing failure
    PROCESSING_FAILURE = 0x0110
    #: PS3.7 C.4 (N-EVENT-REPORT-RSP, Storage Commitment reports): no such SOP instance, event type, argument
    NO_SUCH_SOP_INSTANCE = 0x0112
    NO_SUCH_EVENT_TYPE = 0x0113
    INVALID_ARGUMENT_VALUE = 0x0115
    #: PS3.7 C.4 (N-ACTION-RSP, PS3.7 10.1.4.1.10): no such argument, invalid object instance
    NO_SUCH_ARGUMENT = 0x0114
    INVALID_OBJECT_INSTANCE = 0x0117
    #: PS3.7 C.4: no such SOP class (a report on a context that is not Storage Commitment)
    NO_SUCH_SOP_CLASS = 0x0118
    #: PS3.7 C.4 (N-ACTION-RSP): class-instance conflict
    CLASS_INSTANCE_CONFLICT = 0x0119
    #: PS3.7 C.5.x: refused, SOP class not supported
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    #: PS3.7 C.4 (N-ACTION-RSP): no such action, refused: not authorized
    NO_SUCH_ACTION = 0x0123
    NOT_AUTHORIZED = 0x0124
    #: PS3.7 C.4 (N-ACTION-RSP): duplicate invocation, unrecognized operation, mistyped argument
    DUPLICATE_INVOCATION = 0x0210
    UNRECOGNIZED_OPERATION = 0x0211
    MISTYPED_ARGUMENT = 0x0212
    #: PS3.7 C.4 (N-ACTION-RSP): resource limitation (the SCP may do it later)
    RESOURCE_LIMITATION = 0x0213
    #: PS3.4 B.2-1 A7xx: refused, out of resources (the sender may retry)
    OUT_OF_RESOURCES = 0xA700
    #: PS3.4 B.2-1 A9xx / PS3.18 10.5.3: error, data set does not match SOP class (STOW-RS: nor the request's study)
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    #: PS3.4 B.2-1 Cxxx / PS3.18 10.5.3: error, cannot understand (STOW-RS: not a Part 10 file)
    CANNOT_UNDERSTAND = 0xC000
    #: segnode's Cxxx: the dataset does not decode
    CANNOT_DECODE = 0xC210
    #: segnode's Cxxx: a SOP Class/Instance, Study or Series UID missing or breaking the UID grammar
    INVALID_UID = 0xC211
    #: segnode's Cxxx: the dataset's SOP Instance UID differs from the request's
    UID_MISMATCH = 0xC212


@dataclass(frozen=True)
class _Entry:
    category: Category
    reason: str | None  # the metric label of a refusal; None for a stored status


_TABLE: dict[Status, _Entry] = {
    Status.SUCCESS: _Entry(Category.STORED, None),
    Status.OPTIONAL_ATTRIBUTES_NOT_SUPPORTED: _Entry(Category.STORED, None),
    Status.COERCION_OF_DATA_ELEMENTS: _Entry(Category.STORED, None),
    Status.ELEMENTS_DISCARDED: _Entry(Category.STORED, None),
    Status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS_WARNING: _Entry(Category.STORED, None),
    Status.PROCESSING_FAILURE: _Entry(Category.PERMANENT, "processing_failure"),
    Status.NO_SUCH_SOP_INSTANCE: _Entry(Category.PERMANENT, "no_such_sop_instance"),
    Status.NO_SUCH_EVENT_TYPE: _Entry(Category.PERMANENT, "no_such_event_type"),
    Status.INVALID_ARGUMENT_VALUE: _Entry(Category.PERMANENT, "invalid_argument_value"),
    Status.NO_SUCH_ARGUMENT: _Entry(Category.PERMANENT, "no_such_argument"),
    Status.INVALID_OBJECT_INSTANCE: _Entry(Category.PERMANENT, "invalid_object_instance"),
    Status.NO_SUCH_SOP_CLASS: _Entry(Category.PERMANENT, "no_such_sop_class"),
    Status.CLASS_INSTANCE_CONFLICT: _Entry(Category.PERMANENT, "class_instance_conflict"),
    Status.SOP_CLASS_NOT_SUPPORTED: _Entry(Category.PERMANENT, "sop_class_not_supported"),
    Status.NO_SUCH_ACTION: _Entry(Category.PERMANENT, "no_such_action"),
    Status.NOT_AUTHORIZED: _Entry(Category.PERMANENT, "not_authorized"),
    Status.DUPLICATE_INVOCATION: _Entry(Category.PERMANENT, "duplicate_invocation"),
    Status.UNRECOGNIZED_OPERATION: _Entry(Category.PERMANENT, "unrecognized_operation"),
    Status.MISTYPED_ARGUMENT: _Entry(Category.PERMANENT, "mistyped_argument"),
    Status.RESOURCE_LIMITATION: _Entry(Category.RETRYABLE, "resource_limitation"),
    Status.OUT_OF_RESOURCES: _Entry(Category.RETRYABLE, "out_of_resources"),
    Status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS: _Entry(Category.PERMANENT, "sop_class_mismatch"),
    Status.CANNOT_UNDERSTAND: _Entry(Category.PERMANENT, "cannot_understand"),
    Status.CANNOT_DECODE: _Entry(Category.PERMANENT, "cannot_decode"),
    Status.INVALID_UID: _Entry(Category.PERMANENT, "invalid_uid"),
    Status.UID_MISMATCH: _Entry(Category.PERMANENT, "uid_mismatch"),
}


def category(code: int) -> Category:
    """The category of ``code``: from the table, else from its PS3.7 Annex C range."""
    if code in _TABLE:
        return _TABLE[Status(code)].category
    if code & 0xFF00 == 0xA700:
        return Category.RETRYABLE
    if code & 0xF000 == 0xB000:
        return Category.STORED
    return Category.PERMANENT


def is_stored(code: int) -> bool:
    """Whether a peer answering ``code`` kept the instance (success or a warning)."""
    return category(code) is Category.STORED


def reason(code: int) -> str | None:
    """The metric reason of a refusal with ``code``; ``None`` for a stored status.

    A code not in the table: ``out_of_resources`` for ``0xA7xx``, else
    ``status_0xXXXX``.
    """
    if code in _TABLE:
        return _TABLE[Status(code)].reason
    match category(code):
        case Category.STORED:
            return None
        case Category.RETRYABLE:
            return "out_of_resources"
        case _:
            return f"status_0x{code:04X}"


@dataclass(frozen=True)
class Refusal:
    """One way the node refuses an instance: the status it answers, a narrower metric reason, the comment.

    ``reason`` defaults to the table's reason of ``status``; the store path
    narrows ``0xA700`` into ``too_large``, ``disk_full``, ``write_failed`` and
    ``internal_error`` (:mod:`segnode.node.ingest.store`).  ``comment`` is the
    Error Comment sent to the peer (at most 64 characters).
    """

    status: Status
    comment: str
    reason: str = ""

    def __post_init__(self) -> None:
        if category(self.status) is Category.STORED:
            raise ValueError(f"status 0x{self.status:04X} is not a refusal")
        if len(self.comment) > 64:
            raise ValueError("an Error Comment holds at most 64 characters")
        if not self.reason:
            object.__setattr__(self, "reason", reason(self.status) or "")
