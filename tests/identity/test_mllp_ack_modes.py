"""Original and enhanced acknowledgement mode over a real MLLP socket (HL7 v2.5 2.9): a sender
that fills MSH-15 (accept acknowledgement) or MSH-16 (application acknowledgement) gets exactly
the frames those conditions (table 0155: AL, NE, ER, SU) ask for, accept ack first; one that
fills neither gets the one ACK it always got."""

from __future__ import annotations

import logging
import re
import socket
from typing import Any

import pytest
from sqlmodel import Session

from broker.db import make_engine
from broker.identity import service
from broker.identity.adt import feed_principal
from broker.identity.mllp import MllpHandle, start_mllp, stop_mllp

from .test_mllp import EB, SB, adt, err, frame, msa


def enhanced(message: str, accept: str, application: str) -> str:
    """`message` with MSH-15 and MSH-16 filled (its header ends at MSH-12)."""
    header, rest = message.split("\r", 1)
    return f"{header}|||{accept}|{application}\r{rest}"


class Frames:
    """MLLP blocks read off one connection one at a time: two frames may arrive in one recv."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def next(self) -> str:
        while EB not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"connection closed after {self.buffer!r}")
            self.buffer += chunk
        block, self.buffer = self.buffer.split(EB, 1)
        assert block.startswith(SB), block
        return block[1:].decode()


def answers(handle: MllpHandle, messages: list[str]) -> list[list[list[str]]]:
    """Send each message on one connection and collect the frames that answer it, as MSA fields.

    A message's answers end where the next message's begin: after each message, an original-mode
    probe (which is always answered, with one ACK) is sent, and the frames up to the probe's ACK
    are the message's. So "no answer" is seen for certain, not guessed from a timeout."""
    out = []
    with socket.create_connection((handle.host, handle.port), timeout=20) as sock:
        frames = Frames(sock)
        for n, message in enumerate(messages):
            sock.sendall(frame(message))
            probe = f"PROBE{n}"
            sock.sendall(frame(adt("A08", probe, f"{probe}^^^ISSUER-A", "PROBE^PAT", "19700101", "F")))
            got = []
            while (fields := msa(ack := frames.next()))[2] != probe:
                got.append(fields + [ack])
            assert fields[1] == "AA", ack
            out.append(got)
    return out


def codes(frames: list[list[str]]) -> list[str]:
    return [f[1] for f in frames]


GOOD = adt("A01", "G1", "G1^^^ISSUER-A", "NEUMANN^MICHAELA", "19151111", "F")
CONTENT_ERROR = adt("A01", "B1", "B1^^^ISSUER-A", "SMITH^ANN", "20230230")  # no 30 February
UNSUPPORTED = adt("A31", "R1", "R1^^^ISSUER-A", "REFUSED^RITA")


def test_al_al_gets_the_accept_ack_then_the_application_ack(engine: Any, listener: MllpHandle) -> None:
    [frames] = answers(listener, [enhanced(GOOD, "AL", "AL")])
    assert [f[1:3] for f in frames] == [["CA", "G1"], ["AA", "G1"]]
    for fields in frames:
        msh = fields[-1].split("\r")[0].split("|")
        # Our acknowledgements ask for none back: an ACK is never acknowledged.
        assert msh[8] == "ACK^A01^ACK" and msh[14:16] == ["NE", "NE"], msh
        assert "\rERR|" not in fields[-1]
    with Session(engine) as s:
        assert service.get_record(session=s, issuer="ISSUER-A", value="G1") is not None


def test_ne_al_gets_only_the_application_ack(listener: MllpHandle) -> None:
    good, refused = answers(listener, [enhanced(GOOD, "NE", "AL"), enhanced(UNSUPPORTED, "NE", "AL")])
    assert [f[1:3] for f in good] == [["AA", "G1"]]
    # An enhanced-mode acknowledgement (it asks for none back), not an original-mode ACK.
    assert good[0][-1].split("\r")[0].split("|")[14:16] == ["NE", "NE"]
    assert codes(refused) == ["AR"] and err(refused[0][-1])[3].startswith("201^")


def test_al_ne_gets_only_the_accept_ack(listener: MllpHandle) -> None:
    good, content, refused = answers(
        listener,
        [enhanced(GOOD, "AL", "NE"), enhanced(CONTENT_ERROR, "AL", "NE"), enhanced(UNSUPPORTED, "AL", "NE")],
    )
    assert codes(good) == ["CA"]
    # Accepted (its header is one we take), then refused by the application: the accept ack
    # says only that it was accepted, and no application ack was asked for.
    assert codes(content) == ["CA"]
    assert codes(refused) == ["CR"] and "unsupported message type" in refused[0][3]
    assert err(refused[0][-1])[3] == "201^Unsupported event code^HL70357"


def test_er_er_answers_only_errors_and_the_connection_goes_on(engine: Any, listener: MllpHandle) -> None:
    good, content, refused, after = answers(
        listener,
        [
            enhanced(GOOD, "ER", "ER"),
            enhanced(CONTENT_ERROR, "ER", "ER"),
            enhanced(UNSUPPORTED, "ER", "ER"),
            adt("A01", "N1", "N1^^^ISSUER-A", "NEXT^NORA", "19800101", "F"),
        ],
    )
    assert good == []
    assert codes(content) == ["AE"] and "birth date" in content[0][3]
    assert err(content[0][-1])[3].startswith("102^")
    assert codes(refused) == ["CR", "AR"] and all(f[2] == "R1" for f in refused)
    assert [f[1:3] for f in after] == [["AA", "N1"]]
    with Session(engine) as s:
        assert service.get_record(session=s, issuer="ISSUER-A", value="G1") is not None
        assert service.get_record(session=s, issuer="ISSUER-A", value="R1") is None


def test_su_su_answers_only_successes(engine: Any, listener: MllpHandle) -> None:
    good, content, refused = answers(
        listener,
        [enhanced(GOOD, "SU", "SU"), enhanced(CONTENT_ERROR, "SU", "SU"), enhanced(UNSUPPORTED, "SU", "SU")],
    )
    assert codes(good) == ["CA", "AA"]
    assert codes(content) == ["CA"]  # accepted, then not applied: the AE is not asked for
    assert refused == []
    with Session(engine) as s:
        assert service.get_record(session=s, issuer="ISSUER-A", value="B1") is None


def test_ne_ne_gets_no_answer_but_is_applied(engine: Any, listener: MllpHandle) -> None:
    silent, refused = answers(listener, [enhanced(GOOD, "NE", "NE"), enhanced(UNSUPPORTED, "NE", "NE")])
    assert silent == [] and refused == []
    with Session(engine) as s:
        assert service.get_record(session=s, issuer="ISSUER-A", value="G1") is not None


def test_one_condition_left_empty_in_enhanced_mode_asks_for_nothing_at_that_level(
    listener: MllpHandle,
) -> None:
    """Enhanced mode once either field is filled; the empty one is taken as NE, so a sender that
    asked for one acknowledgement gets one (a frame it did not ask for would be read as the
    answer to its next message)."""
    accept_only, application_only = answers(listener, [enhanced(GOOD, "AL", ""), enhanced(GOOD, "", "AL")])
    assert codes(accept_only) == ["CA"]
    assert codes(application_only) == ["AA"]


def test_an_invalid_condition_is_one_clear_reject(engine: Any, listener: MllpHandle) -> None:
    bad_accept, bad_application = answers(
        listener, [enhanced(GOOD, "XX", "AL"), enhanced(UNSUPPORTED, "NE", "ALWAYS")]
    )
    [fields] = bad_accept
    assert fields[1:3] == ["CR", "G1"]
    assert "MSH-15" in fields[3] and "XX" in fields[3] and "AL, NE, ER or SU" in fields[3]
    error = err(fields[-1])
    assert error[1] == "MSH^1^15^103&Table value not found&HL70357"
    assert error[2:5] == ["MSH^1^15", "103^Table value not found^HL70357", "E"]
    [fields] = bad_application
    assert fields[1] == "CR" and "MSH-16" in fields[3] and "ALWAYS" in fields[3]
    with Session(engine) as s:
        assert service.get_record(session=s, issuer="ISSUER-A", value="G1") is None


def test_two_messages_in_one_block_are_a_commit_error(engine: Any, listener: MllpHandle) -> None:
    one = enhanced(adt("A01", "D1", "D1^^^ISSUER-A", "FIRST^FRANK", "19400101", "M"), "AL", "AL")
    two = adt("A01", "D2", "D2^^^ISSUER-A", "SECOND^SAM", "19400202", "M")
    [frames] = answers(listener, [one + two])
    assert [f[1:3] for f in frames] == [["CE", "D1"], ["AR", "D1"]]
    with Session(engine) as s:
        assert service.get_record(session=s, issuer="ISSUER-A", value="D1") is None


def test_a_failure_on_our_side_is_a_commit_error_to_send_again(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing was stored, so the accept ack is CE (send it again later), not CA."""
    caplog.set_level(logging.DEBUG)
    broken = make_engine(f"sqlite:///{tmp_path / 'not-migrated.sqlite3'}")  # no tables: every query fails
    handle = start_mllp(engine=broken, principal=feed_principal(facility="fac-a"), host="127.0.0.1", port=0)
    try:
        with socket.create_connection((handle.host, handle.port), timeout=20) as sock:
            sock.sendall(frame(enhanced(GOOD, "AL", "AL")))
            frames = Frames(sock)
            got = [frames.next(), frames.next()]
    finally:
        stop_mllp(handle)
        broken.dispose()
    assert [msa(a)[1] for a in got] == ["CE", "AE"]
    assert all(err(a)[3].startswith("207^") for a in got)
    for secret in ("NEUMANN", "MICHAELA", "19151111"):
        assert secret not in caplog.text


def _normalised(ack: str) -> str:
    """An ACK with its timestamp (MSH-7) and own control id (MSH-10) blanked out."""
    return re.sub(
        r"^(MSH\|[^|]*\|[^|]*\|[^|]*\|[^|]*\|[^|]*)\|\d{14}\|\|(ACK[^|]*)\|ACK[0-9A-F]{16}\|",
        r"\1|T||\2|C|",
        ack,
    )


def test_empty_msh15_and_msh16_get_exactly_the_original_mode_ack(
    listener: MllpHandle, caplog: pytest.LogCaptureFixture
) -> None:
    """Existing senders fill neither field: one ACK, byte for byte what they always got."""
    caplog.set_level(logging.DEBUG)
    good, content, refused = answers(listener, [GOOD, CONTENT_ERROR, UNSUPPORTED])
    assert [_normalised(f[-1]) for f in good] == [
        "MSH|^~\\&|SCANONCE|BROKER|ADT|HOSP|T||ACK^A01^ACK|C|P|2.5\rMSA|AA|G1\r"
    ]
    assert [_normalised(f[-1]) for f in content] == [
        "MSH|^~\\&|SCANONCE|BROKER|ADT|HOSP|T||ACK^A01^ACK|C|P|2.5\r"
        "MSA|AE|B1|PID-7 birth date is not a real past date\r"
        "ERR|^^^102&Data type error&HL70357||102^Data type error^HL70357|E||||"
        "PID-7 birth date is not a real past date\r"
    ]
    assert [_normalised(f[-1]) for f in refused] == [
        "MSH|^~\\&|SCANONCE|BROKER|ADT|HOSP|T||ACK^A31^ACK|C|P|2.5\r"
        "MSA|AR|R1|unsupported message type ADT\\S\\A31\r"
        "ERR|^^^201&Unsupported event code&HL70357||201^Unsupported event code^HL70357|E||||"
        "unsupported message type ADT\\S\\A31\r"
    ]
    for secret in ("NEUMANN", "MICHAELA", "SMITH", "REFUSED", "19151111"):
        assert secret not in caplog.text
