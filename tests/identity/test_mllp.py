"""HL7 v2 ADT over MLLP (ITI-8): real bytes over loopback sockets, ACK codes, merge and split,
and a listener that survives broken frames and senders that vanish."""

from __future__ import annotations

import logging
import socket
import struct
from typing import Any

import pytest
from sqlmodel import Session, select

from broker.db import make_engine
from broker.identity import service
from broker.identity.adt import feed_principal
from broker.identity.mllp import MAX_MESSAGE_BYTES, MllpHandle, start_mllp, stop_mllp
from broker.identity.models import IdentityRecord
from broker.identity.schemas import Identifier
from broker.index.models import Patient, Study

from .conftest import acting, ingest_patient

SB, EB = b"\x0b", b"\x1c\r"


def adt(
    event: str,
    control: str,
    pid3: str,
    name: str = "",
    dob: str = "",
    sex: str = "",
    extra: str = "",
    sending_facility: str = "HOSP",
) -> str:
    return (
        f"MSH|^~\\&|ADT|{sending_facility}|SCANONCE|BROKER|20240101120000||ADT^{event}^ADT_A01|{control}|P|2.5\r"
        f"EVN|{event}|20240101120000\r"
        f"PID|1||{pid3}||{name}||{dob}|{sex}|||1 Main Street^^Town^ST^12345||555-0100\r{extra}"
    )


def frame(msg: str) -> bytes:
    return SB + msg.encode() + EB


def read_ack(sock: socket.socket) -> str:
    """One MLLP block from the socket (the ACK), without its framing."""
    data = b""
    while not data.endswith(EB):
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed after {data!r}")
        data += chunk
    assert data.startswith(SB), data
    return data[1:-2].decode()


def msa(ack: str) -> list[str]:
    line = next(s for s in ack.split("\r") if s.startswith("MSA|"))
    return line.split("|")


def connect(handle: MllpHandle) -> socket.socket:
    return socket.create_connection((handle.host, handle.port), timeout=20)


def exchange(handle: MllpHandle, payloads: list[bytes]) -> list[str]:
    """Send each block on one connection, one at a time, and collect the ACKs."""
    with connect(handle) as sock:
        acks = []
        for p in payloads:
            sock.sendall(p)
            acks.append(read_ack(sock))
    return acks


def test_adt_feed_links_and_acknowledges(engine: Any, listener: MllpHandle) -> None:
    acks = exchange(
        listener,
        [
            frame(adt("A01", "M1", "A1^^^ISSUER-A", "NEUMANN^MICHAELA", "19151111", "F")),
            # Issuer given by the sending facility (a registered facility id) when CX.4 is empty.
            frame(adt("A04", "M2", "B1", "NEUMAN^MICHEALA", "19151111", "F", sending_facility="fac-b")),
            frame(adt("A08", "M3", "B1^^^ISSUER-B", "NEUMAN^MICHAELA", "19151111", "F")),
        ],
    )
    assert [msa(a)[1:3] for a in acks] == [["AA", "M1"], ["AA", "M2"], ["AA", "M3"]]
    assert all("ACK^A0" in a.split("\r")[0] for a in acks)
    with Session(engine) as s:
        assert service.cross_reference(session=s, identifier=Identifier("ISSUER-B", "B1")) == [
            Identifier("ISSUER-A", "A1")
        ]


def test_bad_messages_get_errors_and_change_nothing(engine: Any, listener: MllpHandle) -> None:
    acks = exchange(
        listener,
        [
            frame("this is not HL7 at all"),
            frame(adt("A31", "E1", "A1^^^ISSUER-A", "X^Y")),
            frame(adt("A01", "E2", "A1", "NOBODY^KNOWN", sending_facility="UNKNOWN-HOSP")),
            frame(adt("A01", "E3", "A1^^^ISSUER-A", "SMITH^ANN", "20230230")),
            frame(adt("A40", "E4", "A1^^^ISSUER-A", extra="MRG|NOPE^^^ISSUER-A\r")),
            frame("MSH|^~\\&|ADT|HOSP|||20240101||ADT^A01|E5|P|2.5\r"),
            SB + EB,  # an empty block
        ],
    )
    codes = [msa(a)[1] for a in acks]
    assert codes == ["AR", "AR", "AE", "AE", "AE", "AE", "AR"]
    assert "could not be parsed" in msa(acks[0])[3]
    assert "assigning authority" in msa(acks[2])[3]
    assert "birth date" in msa(acks[3])[3]
    assert msa(acks[1])[2] == "E1"
    with Session(engine) as s:
        assert service.get_record(session=s, issuer="ISSUER-A", value="A1") is None


def test_broken_frames_and_vanishing_senders_do_not_stop_the_listener(
    engine: Any, listener: MllpHandle, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="scanonce")
    # A sender stalled mid-message holds its own connection only.
    stalled = connect(listener)
    stalled.sendall(SB + adt("A01", "S1", "S1^^^ISSUER-A", "STALLED^SAM").encode()[:40])

    # Bytes before <VT>: AR, and the next block on the same connection is still read.
    with connect(listener) as sock:
        sock.sendall(b"GARBAGE" + frame(adt("A01", "G0", "G0^^^ISSUER-A", "LOST^LUKE")))
        ack = read_ack(sock)
        assert msa(ack)[1] == "AR" and "<VT>" in msa(ack)[3]
        sock.sendall(frame(adt("A01", "G1", "G1^^^ISSUER-A", "NEUMANN^MICHAELA", "19151111", "F")))
        assert msa(read_ack(sock))[1:3] == ["AA", "G1"]

    # Half a message, then gone: politely (FIN) and abruptly (RST).
    with connect(listener) as sock:
        sock.sendall(SB + adt("A01", "H1", "H1^^^ISSUER-A", "HALF^HARRY").encode()[:60])
    sock = connect(listener)
    sock.sendall(SB + adt("A01", "H2", "H2^^^ISSUER-A", "RESET^ROSA").encode()[:60])
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()

    # A block over the limit: AR, then the connection is closed (where the next block starts is unknown).
    with connect(listener) as sock:
        sock.sendall(SB + b"MSH|" + b"X" * (MAX_MESSAGE_BYTES + 10) + EB)
        ack = read_ack(sock)
        assert msa(ack)[1] == "AR" and "larger than" in msa(ack)[3]
        assert sock.recv(10) == b""

    # Still serving.
    acks = exchange(listener, [frame(adt("A01", "OK1", "OK1^^^ISSUER-B", "REID^RUBY", "19300620", "F"))])
    assert msa(acks[0])[1:3] == ["AA", "OK1"]
    stalled.close()
    with Session(engine) as s:
        assert service.get_record(session=s, issuer="ISSUER-B", value="OK1") is not None
        assert service.get_record(session=s, issuer="ISSUER-A", value="G1") is not None
        for value in ("G0", "S1", "H1", "H2"):
            assert service.get_record(session=s, issuer="ISSUER-A", value=value) is None
    for secret in ("NEUMANN", "MICHAELA", "REID", "STALLED", "HALF", "RESET", "LOST", "19151111"):
        assert secret not in caplog.text


def test_connections_are_served_side_by_side(engine: Any, listener: MllpHandle) -> None:
    """Two senders with open connections, interleaved: neither waits for the other to leave."""
    with connect(listener) as one, connect(listener) as two:
        for n in range(3):
            one.sendall(frame(adt("A01", f"X{n}", f"X{n}^^^ISSUER-A", f"ONE^P{n}")))
            two.sendall(frame(adt("A01", f"Y{n}", f"Y{n}^^^ISSUER-B", f"TWO^Q{n}")))
            assert msa(read_ack(two))[1:3] == ["AA", f"Y{n}"]
            assert msa(read_ack(one))[1:3] == ["AA", f"X{n}"]


def test_stop_closes_the_socket_and_joins_its_threads(engine: Any) -> None:
    handle = start_mllp(engine=engine, principal=feed_principal(facility="fac-a"), host="127.0.0.1", port=0)
    idle = connect(handle)  # an open connection must not keep the listener alive
    assert msa(exchange(handle, [frame(adt("A01", "Z1", "Z1^^^ISSUER-A", "X^Y"))])[0])[1] == "AA"
    stop_mllp(handle)
    assert not handle.thread.is_alive()
    assert idle.recv(10) == b""
    idle.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((handle.host, handle.port), timeout=5)
    stop_mllp(handle)  # a second stop is harmless


def test_a_taken_port_is_a_clear_error(engine: Any, listener: MllpHandle) -> None:
    with pytest.raises(OSError):
        start_mllp(
            engine=engine, principal=feed_principal(facility="fac-a"), host="127.0.0.1", port=listener.port
        )


def test_a40_merge_moves_studies_and_unlink_splits_back(engine: Any, listener: MllpHandle) -> None:
    with Session(engine, expire_on_commit=False) as s:
        survivor = ingest_patient(s, "fac-a", "A1", "REID^RUBY", "19300620")
        temp = ingest_patient(s, "fac-a", "TMP9", "TRAUMA^ALPHA")
        s.add(Study(study_uid="1.2.840.99.1", facility_id="fac-a", patient_pk=temp.pk))  # type: ignore[arg-type]
        s.commit()
    acks = exchange(listener, [frame(adt("A40", "G1", "A1^^^ISSUER-A", extra="MRG|TMP9^^^ISSUER-A\r"))])
    assert msa(acks[0])[1] == "AA"
    with Session(engine) as s:
        study = s.exec(select(Study).where(Study.study_uid == "1.2.840.99.1")).one()
        assert s.get(Patient, study.patient_pk).person_id == survivor.person_id  # type: ignore[union-attr]
        rec = service.get_record(session=s, issuer="ISSUER-A", value="TMP9")
        service.unlink(session=s, record_id=rec.id, principal=acting("him"), why="merged the wrong patient")  # type: ignore[union-attr, arg-type]
    with Session(engine) as s:
        study = s.exec(select(Study).where(Study.study_uid == "1.2.840.99.1")).one()
        assert s.get(Patient, study.patient_pk).person_id != survivor.person_id  # type: ignore[union-attr]
        assert s.get(Patient, study.patient_pk) is not None


def test_a_header_too_short_or_without_a_trigger_event_is_rejected_not_an_internal_error(
    engine: Any, listener: MllpHandle, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="scanonce")
    acks = exchange(
        listener,
        [
            frame("MSH|^~\\&"),  # the delimiters and nothing else
            frame("MSH|^~\\&|ADT|HOSP\rPID|1||T1^^^ISSUER-A||SHORT^SUE\r"),  # stops before MSH-9
            # MSH-9 without its trigger event: an unsupported event, said so, not a crash.
            frame("MSH|^~\\&|ADT|HOSP|||20240101||ADT|T2|P|2.5\rPID|1||T2^^^ISSUER-A||NOEVENT^NED\r"),
            # Delimiters of its own: MSH-9 is then one opaque string, an unsupported type.
            frame("MSH|#|ADT|HOSP|||20240101||ADT^A01|T3|P|2.5\rPID|1||T3^^^ISSUER-A||ODD^OLGA\r"),
        ],
    )
    assert [msa(a)[1] for a in acks] == ["AR", "AR", "AR", "AR"]
    assert msa(acks[2])[2] == "T2" and "unsupported" in msa(acks[2])[3]
    assert msa(acks[3])[2] == "T3"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    with Session(engine) as s:
        for value in ("T1", "T2", "T3"):
            assert service.get_record(session=s, issuer="ISSUER-A", value=value) is None


def err(ack: str) -> list[str]:
    line = next((s for s in ack.split("\r") if s.startswith("ERR|")), "")
    return line.split("|")


def test_errors_and_rejections_carry_an_err_segment_with_the_hl7_error_code(
    engine: Any, listener: MllpHandle
) -> None:
    """HL7 v2.5 2.15.5: a negative ACK says why in ERR (ERR-3 from table 0357, ERR-4 severity);
    interface engines route on ERR-3, not on MSA-3's free text."""
    acks = exchange(
        listener,
        [
            frame("this is not HL7 at all"),
            frame(adt("A31", "R1", "A1^^^ISSUER-A", "X^Y")),
            frame(adt("A01", "R2", "A1", "NOBODY^KNOWN", sending_facility="UNKNOWN-HOSP")),
            frame(adt("A01", "R3", "A1^^^ISSUER-A", "SMITH^ANN", "20230230")),
            frame(adt("A40", "R4", "A1^^^ISSUER-A", extra="MRG|NOPE^^^ISSUER-A\r")),
            frame("MSH|^~\\&|ADT|HOSP|||20240101||ADT^A01|R5|P|2.5\r"),
            frame("MSH|^~\\&|ADT|HOSP|||20240101||ORU^R01|R6|P|2.5\r"),
            frame(adt("A01", "R8", "A" * 200 + "^^^ISSUER-A", "SMITH^ANN", "19800101")),
            frame(adt("A01", "R7", "A7^^^ISSUER-A", "SMITH^ANN", "19800101")),
        ],
    )
    got = [(msa(a)[1], err(a)[3:5]) for a in acks]
    assert got == [
        ("AR", ["100^Segment sequence error^HL70357", "E"]),
        ("AR", ["201^Unsupported event code^HL70357", "E"]),
        ("AE", ["101^Required field missing^HL70357", "E"]),
        ("AE", ["102^Data type error^HL70357", "E"]),
        ("AE", ["204^Unknown key identifier^HL70357", "E"]),
        ("AE", ["100^Segment sequence error^HL70357", "E"]),
        ("AR", ["200^Unsupported message type^HL70357", "E"]),
        ("AE", ["102^Data type error^HL70357", "E"]),  # an identifier longer than the index takes
        ("AA", []),
    ]
    # ERR-8, the text for a person, says what MSA-3 says.
    assert err(acks[3])[8] == msa(acks[3])[3] and "birth date" in err(acks[3])[8]


def test_escape_sequences_are_decoded_so_a_feed_reads_a_name_as_the_images_spell_it(
    engine: Any, listener: MllpHandle
) -> None:
    """HL7 v2 escapes its delimiters (\\T\\ for &, \\S\\ for ^ ...) and may carry UTF-8 as \\X..\\:
    the record must hold the characters, not the escape codes or UTF-8 bytes read as Latin-1,
    or the feed's O&BRIEN-MÜLLER never meets the O&BRIEN-MÜLLER of the DICOM header."""
    with Session(engine, expire_on_commit=False) as s:
        image = ingest_patient(s, "fac-b", "B7", "O&BRIEN-MÜLLER^SIOBHÁN", "19700101", "F")
    name = "O\\T\\BRIEN-M\\XC3BC\\LLER^SIOBH\\XC381\\N"
    acks = exchange(listener, [frame(adt("A01", "X1", "H\\T\\7^^^ISSUER-A", name, "19700101", "F"))])
    assert msa(acks[0])[1:3] == ["AA", "X1"]
    with Session(engine) as s:
        fed = service.get_record(session=s, issuer="ISSUER-A", value="H&7")
        dicom = service.get_record(session=s, issuer="ISSUER-B", value="B7")
        assert fed is not None and dicom is not None
        assert (fed.family, fed.given) == (dicom.family, dicom.given) == ("O BRIEN-MULLER", "SIOBHAN")
        assert fed.person_id == dicom.person_id == s.get(Patient, image.pk).person_id  # type: ignore[union-attr]


def test_odd_escape_sequences_put_no_patient_data_in_the_logs(
    engine: Any, listener: MllpHandle, caplog: pytest.LogCaptureFixture
) -> None:
    """The hl7 library logs the whole field (a name, an address) when it meets an escape it does
    not know, an empty one or a character-set switch; the feed must not let it."""
    caplog.set_level(logging.DEBUG)
    acks = exchange(
        listener,
        [
            frame(adt("A01", "L1", "L1^^^ISSUER-A", "KOWALSKA\\Z12\\^ZOFIA", "19500505", "F")),
            frame(adt("A01", "L2", "L2^^^ISSUER-A", "WIŚNIEWSKA\\\\^HALINA", "19500505", "F")),
            frame(adt("A01", "L3", "L3^^^ISSUER-A", "DĄBROWSKA\\C2D42\\^IRENA", "19500505", "F")),
            frame(adt("A01", "L4", "L4^^^ISSUER-A", "LEWANDOWSKA\\XZZ\\^JADWIGA", "19500505", "F")),
        ],
    )
    assert [msa(a)[1] for a in acks] == ["AA", "AA", "AA", "AA"]
    for secret in ("KOWALSKA", "ZOFIA", "WIŚNIEWSKA", "HALINA", "DĄBROWSKA", "IRENA", "LEWANDOWSKA"):
        assert secret not in caplog.text
    with Session(engine) as s:
        record = service.get_record(session=s, issuer="ISSUER-A", value="L1")
        assert record is not None and (record.family, record.given) == ("KOWALSKA", "ZOFIA")


def test_a_message_in_the_character_set_msh18_names_is_read_in_it(engine: Any, listener: MllpHandle) -> None:
    """MSH-18 says how the bytes are encoded; a Polish registration system sending ISO 8859-2
    must not have its Ś read as Latin-1's ¦ (and dropped), or ŚLIWA never meets ŚLIWA."""
    with Session(engine, expire_on_commit=False) as s:
        ingest_patient(s, "fac-b", "B8", "ŚLIWA^ŻANETA", "19610203", "F")
    header = "MSH|^~\\&|ADT|HOSP|SCANONCE|BROKER|20240101120000||ADT^A01^ADT_A01|CS1|P|2.5||||||8859/2"
    message = f"{header}\rEVN|A01|20240101120000\rPID|1||P8^^^ISSUER-A||ŚLIWA^ŻANETA||19610203|F\r"
    acks = exchange(listener, [SB + message.encode("iso8859-2") + EB])
    assert msa(acks[0])[1:3] == ["AA", "CS1"]
    with Session(engine) as s:
        fed = service.get_record(session=s, issuer="ISSUER-A", value="P8")
        dicom = service.get_record(session=s, issuer="ISSUER-B", value="B8")
        assert fed is not None and dicom is not None
        assert (fed.family, fed.given) == (dicom.family, dicom.given) == ("SLIWA", "ZANETA")


def test_two_messages_in_one_block_are_rejected_not_half_applied(engine: Any, listener: MllpHandle) -> None:
    """MLLP carries one message per block; the one ACK cannot acknowledge two, so a sender that
    packs two must not be told AA while only the first was applied."""
    one = adt("A01", "D1", "D1^^^ISSUER-A", "FIRST^FRANK", "19400101", "M")
    two = adt("A01", "D2", "D2^^^ISSUER-A", "SECOND^SAM", "19400202", "M")
    acks = exchange(listener, [SB + (one + two).encode() + EB])
    assert msa(acks[0])[1:3] == ["AR", "D1"] and "one message" in msa(acks[0])[3]
    assert err(acks[0])[3].startswith("100^")
    with Session(engine) as s:
        for value in ("D1", "D2"):
            assert service.get_record(session=s, issuer="ISSUER-A", value=value) is None


def test_a_birth_date_known_to_the_year_or_month_is_accepted_not_called_impossible(
    engine: Any, listener: MllpHandle
) -> None:
    """HL7 v2 dates may stop at the year or month (DT/DTM precision); a registration whose
    patient's exact birthday is unknown is applied, matched without a birth date."""
    acks = exchange(
        listener,
        [
            frame(adt("A01", "Y1", "Y1^^^ISSUER-A", "ABDI^AMINA", "1987", "F")),
            frame(adt("A01", "Y2", "Y2^^^ISSUER-A", "HASSAN^OMAR", "198705", "M")),
            frame(adt("A01", "Y3", "Y3^^^ISSUER-A", "ALI^NUR", "198713", "M")),  # no 13th month
            frame(adt("A01", "Y4", "Y4^^^ISSUER-A", "ALI^NUR", "2999", "M")),  # not past
        ],
    )
    assert [msa(a)[1] for a in acks] == ["AA", "AA", "AE", "AE"]
    with Session(engine) as s:
        for value in ("Y1", "Y2"):
            record = service.get_record(session=s, issuer="ISSUER-A", value=value)
            assert record is not None and record.birth_date == ""
        assert service.get_record(session=s, issuer="ISSUER-A", value="Y3") is None


def test_control_characters_in_an_identifier_or_control_id_are_a_clear_answer_on_both_databases(
    engine: Any, listener: MllpHandle, caplog: pytest.LogCaptureFixture
) -> None:
    """A NUL in a value: SQLite stored it, PostgreSQL refused the row and the sender got 'internal
    error' (and the broker logged an error) for a message whose content is simply wrong."""
    caplog.set_level(logging.DEBUG, logger="scanonce")
    with Session(engine, expire_on_commit=False) as s:
        ingest_patient(s, "fac-a", "K1", "KEEP^KATE", "19700101")
        ingest_patient(s, "fac-a", "K2", "KEEP^KATE", "19700101")
    acks = exchange(
        listener,
        [
            frame(adt("A01", "N1", "N\x001^^^ISSUER-A", "NUL^NORA", "19700101", "F")),
            frame(adt("A40", "N\x002", "K1^^^ISSUER-A", extra="MRG|K2^^^ISSUER-A\r")),
        ],
    )
    assert msa(acks[0])[1] == "AE" and err(acks[0])[3].startswith("102^") and "control" in msa(acks[0])[3]
    assert msa(acks[1])[1] == "AA"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    with Session(engine) as s:
        assert s.exec(select(IdentityRecord).where(IdentityRecord.family == "NUL")).first() is None


def test_an_internal_error_logs_a_bounded_printable_control_id(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The control id is the sender's text: logged as it came, a terminal escape or a megabyte
    of it would land in the broker's log."""
    broken = make_engine(f"sqlite:///{tmp_path / 'not-migrated.sqlite3'}")  # no tables: every query fails
    handle = start_mllp(engine=broken, principal=feed_principal(facility="fac-a"), host="127.0.0.1", port=0)
    try:
        control = "C1\x1b[2J" + "9" * 5000
        acks = exchange(handle, [frame(adt("A01", control, "I1^^^ISSUER-A", "INNER^IDA", "19700101"))])
    finally:
        stop_mllp(handle)
        broken.dispose()
    assert msa(acks[0])[1] == "AE" and err(acks[0])[3].startswith("207^")
    [record] = [r for r in caplog.records if r.name == "scanonce.identity.adt"]
    assert "\x1b" not in record.getMessage() and len(record.getMessage()) < 400
    assert "INNER" not in caplog.text


def test_utf8_bytes_under_a_latin1_declaration_are_read_as_utf8(engine: Any, listener: MllpHandle) -> None:
    """Senders often declare 8859/1 and send UTF-8; valid multi-byte UTF-8 is next to impossible
    in real Latin-1 names, so it wins over a single-byte declaration."""
    with Session(engine, expire_on_commit=False) as s:
        ingest_patient(s, "fac-b", "B9", "MÜLLER^JÜRGEN", "19550505", "M")
    header = "MSH|^~\\&|ADT|HOSP|SCANONCE|BROKER|20240101120000||ADT^A01^ADT_A01|U1|P|2.5||||||8859/1"
    message = f"{header}\rEVN|A01|20240101120000\rPID|1||U9^^^ISSUER-A||MÜLLER^JÜRGEN||19550505|M\r"
    acks = exchange(listener, [SB + message.encode("utf-8") + EB])
    assert msa(acks[0])[1:3] == ["AA", "U1"]
    with Session(engine) as s:
        fed = service.get_record(session=s, issuer="ISSUER-A", value="U9")
        assert fed is not None and (fed.family, fed.given) == ("MULLER", "JURGEN")


def test_line_breaks_between_blocks_are_skipped_not_taken_for_a_broken_block(
    engine: Any, listener: MllpHandle
) -> None:
    """Senders that end each block with <FS><CR><LF> (or add a newline between blocks) are
    common; the next message must be applied, not answered AR and lost."""
    first = frame(adt("A01", "W1", "W1^^^ISSUER-A", "WINDOWS^WILMA", "19600101", "F"))
    second = frame(adt("A01", "W2", "W2^^^ISSUER-A", "NEWLINE^NINA", "19600202", "F"))
    third = frame(adt("A01", "W3", "W3^^^ISSUER-A", "SPACED^SARA", "19600303", "F"))
    with connect(listener) as sock:
        sock.sendall(first + b"\n")
        assert msa(read_ack(sock))[1:3] == ["AA", "W1"]
        sock.sendall(b"\r\n" + second)
        assert msa(read_ack(sock))[1:3] == ["AA", "W2"]
        sock.sendall(b" \t" + third)
        assert msa(read_ack(sock))[1:3] == ["AA", "W3"]
        # Anything else before <VT> is still a broken block.
        sock.sendall(b"x" + frame(adt("A01", "W4", "W4^^^ISSUER-A", "LOST^LUKE")))
        assert msa(read_ack(sock))[1] == "AR"
    with Session(engine) as s:
        for value in ("W1", "W2", "W3"):
            assert service.get_record(session=s, issuer="ISSUER-A", value=value) is not None


def test_segments_ended_by_crlf_are_read_like_segments_ended_by_cr(engine: Any, listener: MllpHandle) -> None:
    """HL7 ends segments with <CR>; files and many test tools use <CR><LF>. LF alone was already
    accepted; CR LF made empty segments and the message was refused as not HL7 v2."""
    message = adt("A01", "CRLF1", "CRLF1^^^ISSUER-A", "CARRIAGE^CARLA", "19710101", "F").replace("\r", "\r\n")
    acks = exchange(listener, [frame(message)])
    assert msa(acks[0])[1:3] == ["AA", "CRLF1"]
    with Session(engine) as s:
        record = service.get_record(session=s, issuer="ISSUER-A", value="CRLF1")
        assert record is not None and record.family == "CARRIAGE"


def test_an_empty_repetition_in_pid3_does_not_hide_the_identifiers_after_it(
    engine: Any, listener: MllpHandle
) -> None:
    pid3 = "RP1^^^ISSUER-A~^^^ISSUER-B~RP2^^^ISSUER-B"
    acks = exchange(listener, [frame(adt("A01", "RP1", pid3, "REPEAT^RITA", "19720101", "F"))])
    assert msa(acks[0])[1:3] == ["AA", "RP1"]
    with Session(engine) as s:
        assert service.cross_reference(session=s, identifier=Identifier("ISSUER-A", "RP1")) == [
            Identifier("ISSUER-B", "RP2")
        ]


def test_a_v23_sender_finds_the_error_code_where_v23_puts_it(engine: Any, listener: MllpHandle) -> None:
    """Before v2.5, ERR had one field: ERR-1, error code and location, the code in its fourth
    component. Many ADT feeds are v2.3/2.4; their engines read ERR-1, so it carries the code too."""
    message = adt("A31", "V23", "V1^^^ISSUER-A", "OLD^OLGA").replace("|P|2.5\r", "|P|2.3\r", 1)
    [ack] = exchange(listener, [frame(message)])
    assert msa(ack)[1] == "AR" and ack.split("\r")[0].endswith("|P|2.3")
    assert err(ack)[1] == "^^^201&Unsupported event code&HL70357"
    assert err(ack)[3] == "201^Unsupported event code^HL70357"


def _raw_ack(handle: MllpHandle, payload: bytes) -> bytes:
    with connect(handle) as sock:
        sock.sendall(payload)
        data = b""
        while not data.endswith(EB):
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
    return data[1:-2]


def test_the_ack_is_written_in_the_character_set_the_message_declared(listener: MllpHandle) -> None:
    """A registration system that declares ISO 8859-1 reads the ACK as ISO 8859-1: the sending
    facility it echoes (MSH-4 into MSH-6) arrives as it was sent, and MSH-18 says so."""
    header = "MSH|^~\\&|ADT|ZÜRICH|SCANONCE|BROKER|20240101120000||ADT^A01^ADT_A01|L1|P|2.5||||||8859/1"
    message = f"{header}\rEVN|A01|20240101120000\rPID|1||L1^^^ISSUER-A||MÜLLER^JÜRG||19610203|M\r"
    raw = _raw_ack(listener, SB + message.encode("latin-1") + EB)
    text = raw.decode("latin-1")
    msh = text.split("\r")[0].split("|")
    assert msh[5] == "ZÜRICH" and msh[17] == "8859/1", msh
    assert msa(text)[1:3] == ["AA", "L1"]
    with pytest.raises(UnicodeDecodeError):
        raw.decode("utf-8")  # not UTF-8: the bytes the sender's own set gives


def test_the_ack_of_a_message_that_declares_no_character_set_is_utf8(listener: MllpHandle) -> None:
    header = "MSH|^~\\&|ADT|ZÜRICH|SCANONCE|BROKER|20240101120000||ADT^A01^ADT_A01|U2|P|2.5"
    message = f"{header}\rEVN|A01|20240101120000\rPID|1||U2^^^ISSUER-A||MÜLLER^JÜRG||19610203|M\r"
    raw = _raw_ack(listener, SB + message.encode("utf-8") + EB)
    msh = raw.decode("utf-8").split("\r")[0].split("|")
    assert msh[5] == "ZÜRICH" and len(msh) == 12, msh


# PID-5 repeated, XPN.8 (name representation code, HL7 table 4000) after seven carets: XPN.7 is
# the name type code (table 0200), where A would be an alias and I, P a licensing and a partner's
# name.
YAMADA = "Yamada^Tarou^^^^^^A~山田^太郎^^^^^^I~やまだ^たろう^^^^^^P"


def _pdq(engine: Any, **criteria: str) -> list[str]:
    with Session(engine) as s:
        people = service.search_persons(session=s, **criteria)  # type: ignore[arg-type]
    return sorted(i.value for p in people for i in p.identifiers)


@pytest.mark.parametrize("event", ["A04", "A08"])
def test_ideographic_and_phonetic_pid5_repetitions_make_the_patient_findable_by_them(
    engine: Any, listener: MllpHandle, event: str
) -> None:
    """山田 and やまだ sent as PID-5 repetitions with XPN.8 I and P are searched as a PatientName's
    Ideographic and Phonetic groups are (before, only a DICOM header supplied them); the record's
    name stays the A repetition, and Latin searches behave as before."""
    acks = exchange(listener, [frame(adt(event, "J1", "J1^^^ISSUER-A", YAMADA, "19800401", "M"))])
    assert msa(acks[0])[1:3] == ["AA", "J1"]
    with Session(engine) as s:
        record = service.get_record(session=s, issuer="ISSUER-A", value="J1")
        assert record is not None and (record.family, record.given) == ("YAMADA", "TAROU")
    assert _pdq(engine, family="山田") == ["J1"]
    assert _pdq(engine, family="やまだ", given="たろう") == ["J1"]
    assert _pdq(engine, family="YAMADA", given="TAROU") == ["J1"]
    assert _pdq(engine, family="山本") == []


def test_ideographic_and_phonetic_pid5_repetitions_are_shown_by_a_fhir_read(
    engine: Any, listener: MllpHandle
) -> None:
    """The I and P repetitions are the FHIR Patient's IDE and SYL names, as the FHIR feed's are
    (the Patient a read answers with, built as the read builds it)."""
    from broker.fhir import service as fhir_service
    from broker.fhir.schemas import OtherNames, patient_resource

    acks = exchange(listener, [frame(adt("A04", "J1", "J1^^^ISSUER-A", YAMADA, "19800401", "M"))])
    assert msa(acks[0])[1:3] == ["AA", "J1"]
    with Session(engine) as s:
        person = service.person_of(session=s, identifier=Identifier(issuer="ISSUER-A", value="J1"))
        assert person is not None
        view = service.person_view(session=s, person_id=person)
        names = fhir_service.other_names(session=s, views=[view]).get(person, OtherNames())
        shown = patient_resource(view, other_names=names)["name"]
        # Names of a record the caller may not see (consent) are not shown.
        assert fhir_service.other_names(session=s, views=[view], keep=lambda ids: set()) == {}
    assert [(n["extension"][0]["valueCode"], n["family"], n["given"]) for n in shown] == [
        ("ABC", "YAMADA", ["TAROU"]),
        ("IDE", "山田", ["太郎"]),
        ("SYL", "やまだ", ["たろう"]),
    ]


def test_an_update_without_other_names_keeps_them_and_one_with_others_replaces_them(
    engine: Any, listener: MllpHandle
) -> None:
    name = "Yamada^Tarou^^^^^^A~山本^太郎^^^^^^I"
    acks = exchange(
        listener,
        [
            frame(adt("A04", "J2", "J2^^^ISSUER-A", YAMADA, "19800401", "M")),
            frame(adt("A08", "J3", "J2^^^ISSUER-A", "Yamada^Tarou", "19800401", "M")),
        ],
    )
    assert [msa(a)[1] for a in acks] == ["AA", "AA"]
    assert _pdq(engine, family="山田") == _pdq(engine, family="やまだ") == ["J2"]
    acks = exchange(listener, [frame(adt("A08", "J4", "J2^^^ISSUER-A", name, "19800401", "M"))])
    assert msa(acks[0])[1] == "AA"
    assert _pdq(engine, family="山田") == _pdq(engine, family="やまだ") == []
    assert _pdq(engine, family="山本") == ["J2"]


def test_other_names_are_read_through_escapes_and_the_declared_character_set(
    engine: Any, listener: MllpHandle, caplog: pytest.LogCaptureFixture
) -> None:
    """An I repetition in ISO IR87 (JIS X 0208, as MSH-18 declares), and one whose family is
    UTF-8 in a \\X..\\ escape, are read as the record's name would be; none of it is logged.
    A code outside table 4000, or an I repetition without family and given, is ignored."""
    caplog.set_level(logging.DEBUG)
    header = "MSH|^~\\&|ADT|HOSP|SCANONCE|BROKER|20240101120000||ADT^A04^ADT_A01|J5|P|2.5||||||ISO IR87"
    pid = "PID|1||J5^^^ISSUER-A||Yamada^Tarou^^^^^^A~山田^太郎^^^^^^I||19800401|M\r"
    escaped = "\\XE5B1B1E69CAC\\^花子^^^^^^I"  # 山本 in UTF-8
    acks = exchange(
        listener,
        [
            SB + f"{header}\rEVN|A04|20240101120000\r{pid}".encode("iso2022_jp") + EB,
            frame(adt("A04", "J6", "J6^^^ISSUER-A", f"Yamada^Hanako^^^^^^A~{escaped}", "19800402", "F")),
            frame(
                adt("A04", "J7", "J7^^^ISSUER-A", "Tanaka^Ichiro~田中^一郎^^^^^^X~^^^^^^^I", "19800403", "M")
            ),
        ],
    )
    assert [msa(a)[1] for a in acks] == ["AA", "AA", "AA"]
    assert _pdq(engine, family="山田") == ["J5"]
    assert _pdq(engine, family="山本", given="花子") == ["J6"]
    assert _pdq(engine, family="田中") == []
    assert _pdq(engine, family="TANAKA") == ["J7"]
    for secret in ("山田", "太郎", "山本", "花子", "田中", "YAMADA", "Yamada", "Tanaka"):
        assert secret not in caplog.text


def test_a_patient_named_only_in_an_ideographic_repetition_has_that_name(
    engine: Any, listener: MllpHandle
) -> None:
    """No A or unmarked repetition: the I one is the record's name, as a PatientName's
    Ideographic group is when its Alphabetic group is empty (and not a missing third one)."""
    acks = exchange(
        listener,
        [frame(adt("A04", "J8", "J8^^^ISSUER-A", "山田^花子^^^^^^I~やまだ^はなこ^^^^^^P", "19800405", "F"))],
    )
    assert msa(acks[0])[1] == "AA"
    with Session(engine) as s:
        record = service.get_record(session=s, issuer="ISSUER-A", value="J8")
        assert record is not None and (record.family, record.given) == ("山田", "花子")
    assert _pdq(engine, family="やまだ", given="はなこ") == ["J8"]
