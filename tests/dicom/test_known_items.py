"""Presentation contexts decoded and answered once per distinct proposal
(broker.dicom.known_items): each association still sees exactly what its peer proposed, and
its A-ASSOCIATE-AC carries exactly the bytes pynetdicom would have sent."""

from __future__ import annotations

import struct

import pytest
from pynetdicom.pdu import A_ASSOCIATE_RQ, PDU
from pynetdicom.pdu_items import PresentationContextItemAC
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext

from broker.dicom import known_items, reactor

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
IMPLICIT = "1.2.840.10008.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
JPEG2000 = "1.2.840.10008.1.2.4.90"


@pytest.fixture(autouse=True)
def installed() -> None:
    reactor.install()
    assert A_ASSOCIATE_RQ._wrap_generate_items is known_items.known_items


def _context(context_id: int, abstract: str, syntaxes: list[str]) -> PresentationContext:
    context = PresentationContext()
    context.context_id = context_id
    context.abstract_syntax = abstract
    for syntax in syntaxes:
        context.add_transfer_syntax(syntax)
    return context


def _request(contexts: list[tuple[int, str, list[str]]], *, max_pdu: int = 16382) -> bytes:
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = "MODALITY"
    primitive.called_ae_title = "SCANONCE"
    primitive.presentation_context_definition_list = [_context(*c) for c in contexts]
    length = MaximumLengthNotification()
    length.maximum_length_received = max_pdu
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = "1.2.826.0.1.3680043.9.3811.3.0"
    primitive.user_information = [length, implementation]
    return bytes(A_ASSOCIATE_RQ(primitive).encode())


def _received(data: bytes) -> A_ASSOCIATE:
    pdu = A_ASSOCIATE_RQ()
    pdu.decode(data)
    return pdu.to_primitive()


def _proposed(primitive: A_ASSOCIATE) -> list[tuple[int | None, str, list[str]]]:
    return [
        (c.context_id, str(c.abstract_syntax), [str(s) for s in c.transfer_syntax])
        for c in primitive.presentation_context_definition_list
    ]


def _max_pdu(primitive: A_ASSOCIATE) -> int:
    (length,) = [i for i in primitive.user_information if isinstance(i, MaximumLengthNotification)]
    return int(length.maximum_length_received)


def test_a_repeated_proposal_is_decoded_as_proposed_and_from_the_table() -> None:
    contexts = [(1, CT, [EXPLICIT, IMPLICIT]), (3, MR, [IMPLICIT])]
    data = _request(contexts)
    first, again = _received(data), _received(data)
    assert _proposed(first) == _proposed(again) == contexts
    # pynetdicom's own decoding of the same bytes says the same.
    reference = A_ASSOCIATE_RQ()
    reference.variable_items = PDU._wrap_generate_items(reference, data[74:])  # type: ignore[assignment]
    assert _proposed(reference.to_primitive()) == contexts
    # The second association's context items came from the table.
    item_bytes = [data[74:][o : o + n] for o, n in _item_spans(data[74:]) if data[74 + o] == 0x20]
    assert all(b in known_items._known for b in item_bytes)


def _item_spans(items: bytes) -> list[tuple[int, int]]:
    spans, offset = [], 0
    while offset < len(items):
        (length,) = struct.unpack(">H", items[offset + 2 : offset + 4])
        spans.append((offset, 4 + length))
        offset += 4 + length
    return spans


def test_another_proposal_of_the_same_syntaxes_is_decoded_as_its_own() -> None:
    _received(_request([(1, CT, [EXPLICIT, IMPLICIT])]))
    # The same SOP class under another context ID, and with other transfer syntaxes.
    assert _proposed(_received(_request([(5, CT, [EXPLICIT, IMPLICIT])]))) == [(5, CT, [EXPLICIT, IMPLICIT])]
    assert _proposed(_received(_request([(1, CT, [JPEG2000])]))) == [(1, CT, [JPEG2000])]


def test_each_association_gets_its_own_user_information() -> None:
    contexts = [(1, CT, [EXPLICIT])]
    assert _max_pdu(_received(_request(contexts, max_pdu=16382))) == 16382
    assert _max_pdu(_received(_request(contexts, max_pdu=65536))) == 65536


def test_a_malformed_context_item_is_refused_and_not_remembered() -> None:
    data = bytearray(_request([(7, MR, [JPEG2000])]))
    items = bytes(data[74:])
    offset, size = next((o, n) for o, n in _item_spans(items) if items[o] == 0x20)
    # The context's abstract syntax sub-item claims more bytes than its item holds.
    sub = 74 + offset + 8
    data[sub + 2 : sub + 4] = struct.pack(">H", size + 50)
    broken = bytes(data[74 + offset : 74 + offset + size])
    for _ in range(2):
        with pytest.raises(Exception):  # noqa: B017 - whatever pynetdicom's decoding raises
            _received(bytes(data))
    assert broken not in known_items._known


@pytest.mark.parametrize(
    ("context_id", "result", "syntax"),
    [(1, 0, EXPLICIT), (3, 0, IMPLICIT), (1, 3, IMPLICIT), (5, 4, EXPLICIT)],
    ids=["accepted", "accepted-other", "abstract-syntax-refused", "transfer-syntax-refused"],
)
def test_an_answer_is_the_bytes_pynetdicom_would_send(context_id: int, result: int, syntax: str) -> None:
    answer = _context(context_id, CT, [syntax])
    answer.result = result
    reference = PresentationContextItemAC()
    known_items._ac_from_primitive(reference, answer)
    expected = known_items._ac_encode(reference)
    for _ in range(2):  # built, then taken from the table
        item = PresentationContextItemAC()
        item.from_primitive(answer)
        assert item.encode() == expected
        assert (item.presentation_context_id, item.result_reason) == (context_id, result)
        assert str(item.transfer_syntax) == syntax


def test_each_association_negotiates_on_its_own_contexts() -> None:
    """The negotiation writes its result and roles on the proposal's PresentationContexts: one
    association's answers must not show in the next one's proposal."""
    data = _request([(1, CT, [EXPLICIT, IMPLICIT])])
    (first,) = _received(data).presentation_context_definition_list
    first.result = 0
    del first._transfer_syntax[1:]
    (again,) = _received(data).presentation_context_definition_list
    assert again is not first
    assert (again.result, again.transfer_syntax) == (None, [EXPLICIT, IMPLICIT])
