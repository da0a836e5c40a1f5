"""pynetdicom's UID checks remembered for DICOM-defined UIDs (broker.dicom.known_uids): the
same results as pynetdicom's own, and every warning and refusal still given, every time."""

from __future__ import annotations

import logging

import pytest
from pydicom.uid import UID
from pynetdicom import dimse_primitives, pdu_items
from pynetdicom.presentation import PresentationContext

from broker.dicom import known_uids, reactor

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


@pytest.fixture(autouse=True)
def installed() -> None:
    reactor.install()
    assert pdu_items.set_uid is known_uids.known_set_uid


def test_a_dicom_uid_is_the_same_uid_each_time_and_checked_once() -> None:
    first = pdu_items.set_uid(CT.encode(), "Abstract Syntax Name")
    again = dimse_primitives.set_uid(CT, "Affected SOP Class UID")
    assert first == again == UID(CT) and isinstance(first, UID)
    assert known_uids._known.get(CT) is again


@pytest.mark.parametrize("value", ["1.2.840.10008.01.2", "1.2.3.4.5.6.7.8.9.0", "9.9.9"])
def test_non_conformant_and_private_uids_warn_every_time(
    caplog: pytest.LogCaptureFixture, value: str
) -> None:
    caplog.set_level(logging.WARNING, logger="pynetdicom")
    for _ in range(2):
        caplog.clear()
        result = dimse_primitives.set_uid(value, "Affected SOP Class UID")
        assert result == value
        if not UID(value).is_valid:
            assert any("Non-conformant" in m for m in caplog.messages)
    assert value not in known_uids._known


def test_an_invalid_uid_is_refused_every_time() -> None:
    for _ in range(2):
        with pytest.raises(ValueError, match="Invalid"):
            dimse_primitives.set_uid("1.2.840.10008." + "1" * 60, "Affected SOP Class UID")


def test_transfer_syntaxes_are_added_once_and_a_sop_class_still_warns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="pynetdicom")
    context = PresentationContext()
    for _ in range(3):
        context.add_transfer_syntax(EXPLICIT_LE)
        context.add_transfer_syntax(EXPLICIT_LE.encode())
    assert context.transfer_syntax == [EXPLICIT_LE]
    assert caplog.messages == []
    dimse_primitives.set_uid(CT, "Affected SOP Class UID")  # remembered as a SOP class
    for _ in range(2):
        caplog.clear()
        context.add_transfer_syntax(CT)
    assert context.transfer_syntax == [EXPLICIT_LE, CT]
    assert not caplog.messages  # already present: pynetdicom says nothing the second time
    other = PresentationContext()
    caplog.clear()
    other.add_transfer_syntax(CT)
    assert any("not a transfer syntax" in m for m in caplog.messages)
