"""The one status table (node/status.py): every code the node answers or reads, its category and metric reason."""

from __future__ import annotations

import pytest
from segnode.node.status import Category, Refusal, Status, category, is_stored, reason

STORED, RETRYABLE, PERMANENT = Category.STORED, Category.RETRYABLE, Category.PERMANENT


@pytest.mark.parametrize(("code", "expected_category", "expected_reason"), [
    (0x0000, STORED, None), (0x0001, STORED, None), (0xB000, STORED, None), (0xB006, STORED, None),
    (0xB007, STORED, None),
    (0x0110, PERMANENT, "processing_failure"), (0x0122, PERMANENT, "sop_class_not_supported"),
    # N-EVENT-REPORT-RSP to a Storage Commitment report (node/commitment.py)
    (0x0112, PERMANENT, "no_such_sop_instance"), (0x0113, PERMANENT, "no_such_event_type"),
    (0x0115, PERMANENT, "invalid_argument_value"), (0x0118, PERMANENT, "no_such_sop_class"),
    # N-ACTION-RSP to a Storage Commitment request (PS3.7 10.1.4.1.10; node/commitment.py action_category)
    (0x0114, PERMANENT, "no_such_argument"), (0x0117, PERMANENT, "invalid_object_instance"),
    (0x0119, PERMANENT, "class_instance_conflict"), (0x0123, PERMANENT, "no_such_action"),
    (0x0124, PERMANENT, "not_authorized"), (0x0210, PERMANENT, "duplicate_invocation"),
    (0x0211, PERMANENT, "unrecognized_operation"), (0x0212, PERMANENT, "mistyped_argument"),
    (0x0213, RETRYABLE, "resource_limitation"),
    (0xA700, RETRYABLE, "out_of_resources"), (0xA900, PERMANENT, "sop_class_mismatch"),
    (0xC000, PERMANENT, "cannot_understand"), (0xC210, PERMANENT, "cannot_decode"),
    (0xC211, PERMANENT, "invalid_uid"), (0xC212, PERMANENT, "uid_mismatch"),
    # not in the table: by their PS3.7 Annex C range
    (0xA702, RETRYABLE, "out_of_resources"), (0xA7FF, RETRYABLE, "out_of_resources"),
    (0xB123, STORED, None), (0xA901, PERMANENT, "status_0xA901"), (0xC123, PERMANENT, "status_0xC123"),
    (0xA801, PERMANENT, "status_0xA801"), (0x0125, PERMANENT, "status_0x0125"),
])
def test_each_code_has_its_category_and_reason(code: int, expected_category: Category,
                                               expected_reason: str | None) -> None:
    assert category(code) is expected_category
    assert reason(code) == expected_reason
    assert is_stored(code) == (expected_category is STORED)


def test_the_table_covers_every_member_and_one_name_per_code() -> None:
    assert {int(s) for s in Status} == {0x0000, 0x0001, 0xB000, 0xB006, 0xB007, 0x0110, 0x0112, 0x0113, 0x0114,
                                        0x0115, 0x0117, 0x0118, 0x0119, 0x0122, 0x0123, 0x0124, 0x0210, 0x0211,
                                        0x0212, 0x0213, 0xA700, 0xA900, 0xC000, 0xC210, 0xC211, 0xC212}
    assert Status(0xA900) is Status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS  # C-STORE and STOW-RS alike (PS3.4, PS3.18)
    assert all(reason(s) is None for s in Status if category(s) is STORED)
    assert all(reason(s) for s in Status if category(s) is not STORED)


def test_a_refusal_is_a_failure_with_a_short_comment_and_a_reason() -> None:
    assert Refusal(Status.CANNOT_DECODE, "cut short").reason == "cannot_decode"  # the table's
    assert Refusal(Status.OUT_OF_RESOURCES, "disk", "disk_full").reason == "disk_full"  # narrowed
    with pytest.raises(ValueError, match="not a refusal"):
        Refusal(Status.SUCCESS, "fine")
    with pytest.raises(ValueError, match="64 characters"):
        Refusal(Status.CANNOT_DECODE, "x" * 65)
