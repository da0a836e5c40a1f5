"""What the ADT receiver checks before it applies a message, and how it answers what it cannot
handle, over a real MLLP socket (HL7 v2.5 2.9): MSH-11 processing ID and MSH-12 version ID
(rejects with ERR codes 202 / 203, nothing stored), MSH-15/16 matched in any case, MSA-3 bounded
to its 80 characters, and failures outside message processing answered in the mode the
message's MSH asks for when it can be read."""

from __future__ import annotations

import logging
import re
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from sqlmodel import Session

from broker.errors import InvalidSetting
from broker.identity import mllp, service
from broker.identity.adt import feed_principal
from broker.identity.mllp import MAX_MESSAGE_BYTES, MllpHandle, start_mllp, stop_mllp
from broker.settings import load

from .test_mllp import EB, SB, adt, err, frame, msa
from .test_mllp_ack_modes import Frames, _normalised, enhanced


def msh(message: str, **fields: str) -> str:
    """`message` with MSH fields replaced: msh(m, f11="T", f12="2.3") (MSH-n is the n-1th
    "|"-separated item, MSH-1 being the separator itself)."""
    header, rest = message.split("\r", 1)
    items = header.split("|")
    for name, value in fields.items():
        index = int(name[1:]) - 1
        items += [""] * (index + 1 - len(items))
        items[index] = value
    return "|".join(items) + "\r" + rest


def good(control: str, **fields: str) -> str:
    """An A01 registering `control`^^^ISSUER-A, with the MSH fields given."""
    return msh(adt("A01", control, f"{control}^^^ISSUER-A", "NEUMANN^MICHAELA", "19151111", "F"), **fields)


def replies(handle: MllpHandle, payloads: list[bytes]) -> list[list[str]]:
    """Send each payload (MLLP bytes, framed or not) on one connection and collect the frames
    that answer it, up to the ACK of an original-mode probe sent after it (always answered with
    one AA), so "no answer" is seen for certain. Frames are ACK texts."""
    out = []
    with socket.create_connection((handle.host, handle.port), timeout=20) as sock:
        frames = Frames(sock)
        for n, payload in enumerate(payloads):
            sock.sendall(payload)
            probe = f"PROBE{n}"
            sock.sendall(frame(adt("A08", probe, f"{probe}^^^ISSUER-A", "PROBE^PAT", "19700101", "F")))
            got = []
            while msa(ack := frames.next())[2] != probe:
                got.append(ack)
            assert msa(ack)[1] == "AA", ack
            out.append(got)
    return out


def codes(acks: list[str]) -> list[list[str]]:
    """MSA-1 and MSA-2 of each ACK."""
    return [msa(a)[1:3] for a in acks]


def stored(engine: Any, *values: str) -> list[str]:
    with Session(engine) as s:
        return [v for v in values if service.get_record(session=s, issuer="ISSUER-A", value=v) is not None]


# -- MSH-11 processing ID -------------------------------------------------------------------------


def test_a_training_or_debugging_message_is_rejected_by_a_production_receiver(
    engine: Any, listener: MllpHandle
) -> None:
    """HL7 v2.5 2.9.2: a message whose processing ID is not the receiver's is rejected (AR),
    ERR-3 202 at MSH-11; a test system's registrations never reach the production index."""
    training, debugging, lower, empty, production = replies(
        listener,
        [
            frame(good("PT1", f11="T")),
            frame(good("PD1", f11="D")),
            frame(good("PL1", f11="p")),  # P, as table 0103 spells it in any case
            frame(good("PE1", f11="")),
            frame(good("PP1", f11="P^T")),  # MSH-11.2, the processing mode, is not read
        ],
    )
    assert [_normalised(a) for a in training] == [
        "MSH|^~\\&|SCANONCE|BROKER|ADT|HOSP|T||ACK^A01^ACK|C|T|2.5\r"
        "MSA|AR|PT1|MSH-11 processing ID 'T' is not processed here (P)\r"
        "ERR|MSH^1^11^202&Unsupported processing id&HL70357|MSH^1^11|202^Unsupported processing id^HL70357"
        "|E||||MSH-11 processing ID 'T' is not processed here (P)\r"
    ]
    assert codes(debugging) == [["AR", "PD1"]] and err(debugging[0])[2:4] == [
        "MSH^1^11",
        "202^Unsupported processing id^HL70357",
    ]
    assert codes(lower) == [["AA", "PL1"]] and codes(production) == [["AA", "PP1"]]
    # MSH-11 is required in every v2 version: none at all is a required field missing.
    assert codes(empty) == [["AR", "PE1"]] and "empty" in msa(empty[0])[3]
    assert err(empty[0])[2:4] == ["MSH^1^11", "101^Required field missing^HL70357"]
    assert stored(engine, "PT1", "PD1", "PE1", "PL1", "PP1") == ["PL1", "PP1"]


def test_a_rejected_processing_id_in_enhanced_mode_is_a_commit_reject(
    engine: Any, listener: MllpHandle
) -> None:
    """Enhanced mode (2.9.3): the accept acknowledgement is CR, and the application
    acknowledgement AR, each sent only as MSH-15/16 ask."""
    training = good("ET1", f11="T")
    al_al, al_ne, ne_al, er_er, su_su = replies(
        listener,
        [
            frame(enhanced(training, "AL", "AL")),
            frame(enhanced(training, "AL", "NE")),
            frame(enhanced(training, "NE", "AL")),
            frame(enhanced(training, "ER", "ER")),
            frame(enhanced(training, "SU", "SU")),
        ],
    )
    assert codes(al_al) == [["CR", "ET1"], ["AR", "ET1"]]
    for ack in al_al:
        assert err(ack)[2:4] == ["MSH^1^11", "202^Unsupported processing id^HL70357"]
        assert ack.split("\r")[0].split("|")[10:16] == ["T", "2.5", "", "", "NE", "NE"]
    assert codes(al_ne) == [["CR", "ET1"]] and codes(ne_al) == [["AR", "ET1"]]
    assert codes(er_er) == [["CR", "ET1"], ["AR", "ET1"]] and su_su == []
    assert stored(engine, "ET1") == []


@pytest.fixture
def training_listener(engine: Any) -> Iterator[MllpHandle]:
    """A listener set to process training messages only (SCANONCE_MLLP_PROCESSING_IDS=T)."""
    handle = start_mllp(
        engine=engine,
        principal=feed_principal(facility="fac-a"),
        host="127.0.0.1",
        port=0,
        processing_ids=["T"],
    )
    try:
        yield handle
    finally:
        stop_mllp(handle)


def test_a_training_receiver_applies_training_messages_and_rejects_production_ones(
    engine: Any, training_listener: MllpHandle
) -> None:
    with socket.create_connection((training_listener.host, training_listener.port), timeout=20) as sock:
        frames = Frames(sock)
        sock.sendall(frame(good("TT1", f11="T")))
        assert codes([frames.next()]) == [["AA", "TT1"]]
        sock.sendall(frame(good("TP1", f11="P")))
        rejected = frames.next()
    assert codes([rejected]) == [["AR", "TP1"]]
    assert msa(rejected)[3] == "MSH-11 processing ID 'P' is not processed here (T)"
    assert err(rejected)[3] == "202^Unsupported processing id^HL70357"
    assert stored(engine, "TT1", "TP1") == ["TT1"]


def test_the_processing_ids_setting_takes_table_0103_codes_only(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load().mllp_processing_ids == ["P"]
    monkeypatch.setenv("SCANONCE_MLLP_PROCESSING_IDS", " t, p ,T")
    assert load().mllp_processing_ids == ["P", "T"]
    for wrong in ("X", "P,TRAINING", ""):
        monkeypatch.setenv("SCANONCE_MLLP_PROCESSING_IDS", wrong)
        with pytest.raises(InvalidSetting, match="SCANONCE_MLLP_PROCESSING_IDS.*table 0103"):
            load()


# -- MSH-12 version ID ----------------------------------------------------------------------------


def test_a_version_the_receiver_does_not_read_is_rejected_and_changes_nothing(
    engine: Any, listener: MllpHandle
) -> None:
    """HL7 v2.1 and later (2.3.1, 2.5.1, 2.8.2, a 2.x to come) are read; anything else is
    rejected with ERR-3 203 at MSH-12, and a missing one is a required field missing (101)."""
    versions = ["2.3.1", "2.5.1", "2.8.2", "2.9", "2.10", "3.0", "2.0", "V2.5", "2", "2.5.1.1", ""]
    acks = replies(listener, [frame(good(f"V{n}", f12=v)) for n, v in enumerate(versions)])
    got = {v: (msa(a)[1], err(a)[2:4]) for v, [a] in zip(versions, acks, strict=True)}
    for version in ("2.3.1", "2.5.1", "2.8.2", "2.9", "2.10"):
        assert got[version] == ("AA", [])
    for version in ("3.0", "2.0", "V2.5", "2", "2.5.1.1"):
        assert got[version] == ("AR", ["MSH^1^12", "203^Unsupported version id^HL70357"]), version
    assert got[""] == ("AR", ["MSH^1^12", "101^Required field missing^HL70357"])
    [v3] = acks[versions.index("3.0")]
    assert _normalised(v3) == (
        "MSH|^~\\&|SCANONCE|BROKER|ADT|HOSP|T||ACK^A01^ACK|C|P|3.0\r"
        "MSA|AR|V5|MSH-12 version ID '3.0' is not HL7 v2.1 or later\r"
        "ERR|MSH^1^12^203&Unsupported version id&HL70357|MSH^1^12|203^Unsupported version id^HL70357"
        "|E||||MSH-12 version ID '3.0' is not HL7 v2.1 or later\r"
    )
    assert stored(engine, *(f"V{n}" for n in range(len(versions)))) == ["V0", "V1", "V2", "V3", "V4"]


def test_an_unsupported_version_in_enhanced_mode_is_a_commit_reject(
    engine: Any, listener: MllpHandle
) -> None:
    [frames] = replies(listener, [frame(enhanced(good("EV1", f12="3.0"), "AL", "AL"))])
    assert codes(frames) == [["CR", "EV1"], ["AR", "EV1"]]
    assert all(err(a)[3] == "203^Unsupported version id^HL70357" for a in frames)
    assert stored(engine, "EV1") == []


def test_the_message_type_is_checked_before_version_and_processing_id(listener: MllpHandle) -> None:
    """2.9.2's order: type, version, processing ID; the first that fails is the one ERR names."""
    unsupported = msh(adt("A31", "O1", "O1^^^ISSUER-A", "X^Y"), f11="T", f12="3.0")
    both = good("O2", f11="T", f12="3.0")
    [[first], [second]] = replies(listener, [frame(unsupported), frame(both)])
    assert err(first)[3].startswith("201^") and err(second)[3].startswith("203^")


# -- MSH-15/16 in any case ------------------------------------------------------------------------


def test_acknowledgement_conditions_are_matched_in_any_case_and_trimmed(
    engine: Any, listener: MllpHandle
) -> None:
    al_al, al_ne, er_er, su_su, refused = replies(
        listener,
        [
            frame(enhanced(good("C1"), "al", "Al")),
            frame(enhanced(good("C2"), " aL ", "ne")),
            frame(enhanced(good("C3"), "er", "Er ")),
            frame(enhanced(good("C4"), "su", "sU")),
            frame(enhanced(adt("A31", "C5", "C5^^^ISSUER-A", "X^Y"), "er", "er")),
        ],
    )
    assert codes(al_al) == [["CA", "C1"], ["AA", "C1"]]
    assert codes(al_ne) == [["CA", "C2"]]
    assert er_er == []
    assert codes(su_su) == [["CA", "C4"], ["AA", "C4"]]
    assert codes(refused) == [["CR", "C5"], ["AR", "C5"]]
    assert stored(engine, "C1", "C2", "C3", "C4") == ["C1", "C2", "C3", "C4"]


# -- MSA-3 at most 80 characters ------------------------------------------------------------------

_ESCAPE = re.compile(r"\\[FSTRE]\\")


def test_msa3_is_cut_to_80_characters_at_a_word_and_err8_says_it_whole(listener: MllpHandle) -> None:
    [[cr]] = replies(listener, [frame(enhanced(good("M1"), "AL", "ALWAYS-OR-NEVER"))])
    whole = (
        "MSH-16 application acknowledgment type 'ALWAYS-OR-NEVER' is not AL, NE, ER or SU (HL7 table 0155)"
    )
    assert msa(cr)[3] == "MSH-16 application acknowledgment type 'ALWAYS-OR-NEVER' is not AL, NE, ER or..."
    assert len(msa(cr)[3]) <= 80
    assert err(cr)[8] == whole


def test_msa3_is_never_cut_inside_an_escape_sequence(engine: Any, listener: MllpHandle) -> None:
    """Delimiters in the sender's value (sent escaped, \\F\\ for |) are escaped again in the ACK;
    a cut between the backslashes of one would leave the receiver an escape sequence it cannot
    read, or a stray delimiter."""
    pipes = "\\F\\" * 20  # twenty | in MSH-15, and in MSH-12
    original, enhanced_mode = replies(
        listener,
        [frame(good("M2", f12=f"2.5{pipes}")), frame(enhanced(good("M3"), pipes, "AL"))],
    )
    for [ack] in (original, enhanced_mode):
        text = msa(ack)[3]
        assert len(text) <= 80 and text.endswith("..."), text
        assert "\\" not in _ESCAPE.sub("", text), text  # only whole escape sequences
        assert "\\F\\" * 10 in text and "\\F\\" * 17 in err(ack)[8]  # the value's first 20 characters
    assert stored(engine, "M2", "M3") == []


# -- failures outside message processing ----------------------------------------------------------


def with_blank_line(message: str) -> str:
    """`message` with an empty line between two segments: the parser refuses it, while its MSH
    segment can still be read."""
    return message.replace("\rPID|", "\r\rPID|", 1)


def test_an_unparseable_message_with_a_readable_msh_is_answered_in_the_mode_it_asks_for(
    engine: Any, listener: MllpHandle
) -> None:
    al_al, ne_ne, er_ne, plain = replies(
        listener,
        [
            frame(with_blank_line(enhanced(good("U1"), "AL", "AL"))),
            frame(with_blank_line(enhanced(good("U2"), "NE", "NE"))),
            frame(with_blank_line(enhanced(good("U3"), "ER", "NE"))),
            frame(with_blank_line(good("U4"))),
        ],
    )
    assert codes(al_al) == [["CR", "U1"], ["AR", "U1"]]
    for ack in al_al:
        assert "could not be parsed" in msa(ack)[3] and err(ack)[3].startswith("100^")
        assert ack.split("\r")[0].split("|")[14:16] == ["NE", "NE"]
    assert ne_ne == []
    assert codes(er_ne) == [["CR", "U3"]]
    # Original mode, as before, and now naming the message it answers (MSA-2).
    assert codes(plain) == [["AR", "U4"]] and plain[0].split("\r")[0].endswith("|P|2.5")
    assert stored(engine, "U1", "U2", "U3", "U4") == []


def test_a_block_whose_msh_cannot_be_read_is_answered_in_original_mode(
    engine: Any, listener: MllpHandle
) -> None:
    """No MSH segment to read means no MSH-15/16: one original-mode AR, with no control id."""
    not_hl7, junk_first = replies(
        listener,
        [frame("this is not HL7 at all"), frame("JUNK\r" + enhanced(good("J1"), "AL", "AL"))],
    )
    for acks in (not_hl7, junk_first):
        assert codes(acks) == [["AR", ""]]
        assert len(acks[0].split("\r")[0].split("|")) == 12  # an original-mode ACK: no MSH-15/16
    assert stored(engine, "J1") == []


def test_a_block_without_vt_is_answered_in_the_mode_its_msh_asks_for(
    engine: Any, listener: MllpHandle
) -> None:
    """A stray byte before <VT> (or no <VT>): the block is refused (the next is still read),
    with CE in enhanced mode (framed as it should be, the same message may be taken)."""
    al_al, ne_ne, no_vt_at_all, garbage = replies(
        listener,
        [
            b"x" + frame(enhanced(good("F1"), "AL", "AL")),
            b"x" + frame(enhanced(good("F2"), "NE", "NE")),
            frame(enhanced(good("F3"), "AL", "ER"))[1:],
            b"NO-VT" + EB,
        ],
    )
    assert codes(al_al) == [["CE", "F1"], ["AR", "F1"]]
    assert all("<VT>" in msa(a)[3] and err(a)[3].startswith("100^") for a in al_al)
    assert ne_ne == []
    assert codes(no_vt_at_all) == [["CE", "F3"], ["AR", "F3"]]
    assert codes(garbage) == [["AR", ""]] and "<VT>" in msa(garbage[0])[3]
    assert stored(engine, "F1", "F2", "F3") == []


def _after_oversized(handle: MllpHandle, message: str) -> list[str]:
    """The frames an oversized block starting with `message`'s MSH gets before the connection
    closes."""
    header = message.split("\r", 1)[0]
    acks = []
    with socket.create_connection((handle.host, handle.port), timeout=20) as sock:
        sock.sendall(SB + header.encode() + b"\rNTE|1||" + b"X" * (MAX_MESSAGE_BYTES + 10) + EB)
        frames = Frames(sock)
        while True:
            try:
                acks.append(frames.next())
            except ConnectionError:
                return acks


def test_an_oversized_block_is_answered_in_the_mode_its_msh_asks_for(listener: MllpHandle) -> None:
    al_al = _after_oversized(listener, enhanced(good("B1"), "AL", "AL"))
    assert codes(al_al) == [["CR", "B1"], ["AR", "B1"]]
    assert all("larger than" in msa(a)[3] for a in al_al)
    assert _after_oversized(listener, enhanced(good("B2"), "NE", "NE")) == []
    assert codes(_after_oversized(listener, good("B3"))) == [["AR", "B3"]]


def test_a_failure_of_the_listener_itself_is_answered_in_the_mode_asked_for(
    engine: Any, listener: MllpHandle, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A failure before the message is processed (here the handler itself raising): CE and AE
    in enhanced mode (nothing was stored: send it again), one AE in original mode."""
    caplog.set_level(logging.DEBUG)

    def broken(**_: Any) -> Any:
        raise RuntimeError("NEUMANN")

    with socket.create_connection((listener.host, listener.port), timeout=20) as sock:
        frames = Frames(sock)
        monkeypatch.setattr(mllp, "handle_message", broken)
        sock.sendall(frame(enhanced(good("I1"), "AL", "AL")))
        enhanced_acks = [frames.next(), frames.next()]
        sock.sendall(frame(good("I2")))
        original_ack = frames.next()
    assert codes(enhanced_acks) == [["CE", "I1"], ["AE", "I1"]]
    assert codes([original_ack]) == [["AE", "I2"]]
    assert all(err(a)[3].startswith("207^") for a in [*enhanced_acks, original_ack])
    assert "could not be applied" in caplog.text and "NEUMANN" not in caplog.text
    assert stored(engine, "I1", "I2") == []
