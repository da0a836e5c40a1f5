"""HL7 v2 ADT over MLLP (ITI-8): real bytes over a loopback socket, ACK codes, merge and split."""

from __future__ import annotations

import asyncio
from typing import Any

from sqlmodel import Session, select

from broker.identity import service
from broker.identity.mllp import start_mllp_listener
from broker.identity.schemas import Identifier
from broker.index.models import Patient, Study

from .conftest import ingest_patient

SB, EB = b"\x0b", b"\x1c\r"


def _adt(
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


def _exchange(engine: Any, payloads: list[bytes]) -> list[str]:
    """Start the listener on a free port, send each frame on one connection, collect the ACKs."""

    async def run() -> list[str]:
        server = await start_mllp_listener(engine=engine, host="127.0.0.1", port=0)
        port = server.sockets[0].getsockname()[1]
        acks: list[str] = []
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            for p in payloads:
                writer.write(p)
                await writer.drain()
                block = await asyncio.wait_for(reader.readuntil(EB), timeout=20)
                assert block.startswith(SB)
                acks.append(block[1:-2].decode())
            writer.close()
        finally:
            server.close()
            await server.wait_closed()
        return acks

    return asyncio.run(run())


def _frame(msg: str) -> bytes:
    return SB + msg.encode() + EB


def _msa(ack: str) -> list[str]:
    msa = next(s for s in ack.split("\r") if s.startswith("MSA|"))
    return msa.split("|")


def test_adt_feed_links_and_acknowledges(engine: Any) -> None:
    acks = _exchange(
        engine,
        [
            _frame(_adt("A01", "M1", "A1^^^ISSUER-A", "NEUMANN^MICHAELA", "19151111", "F")),
            # Issuer given by the sending facility (a registered facility id) when CX.4 is empty.
            _frame(_adt("A04", "M2", "B1", "NEUMAN^MICHEALA", "19151111", "F", sending_facility="fac-b")),
            _frame(_adt("A08", "M3", "B1^^^ISSUER-B", "NEUMAN^MICHAELA", "19151111", "F")),
        ],
    )
    assert [_msa(a)[1:3] for a in acks] == [["AA", "M1"], ["AA", "M2"], ["AA", "M3"]]
    assert all("ACK^A0" in a.split("\r")[0] for a in acks)
    with Session(engine) as s:
        assert service.cross_reference(session=s, identifier=Identifier("ISSUER-B", "B1")) == [
            Identifier("ISSUER-A", "A1")
        ]


def test_bad_messages_get_errors_and_change_nothing(engine: Any) -> None:
    acks = _exchange(
        engine,
        [
            _frame("this is not HL7 at all"),
            _frame(_adt("A31", "E1", "A1^^^ISSUER-A", "X^Y")),
            _frame(_adt("A01", "E2", "A1", "NOBODY^KNOWN", sending_facility="UNKNOWN-HOSP")),
            _frame(_adt("A01", "E3", "A1^^^ISSUER-A", "SMITH^ANN", "20230230")),
            _frame(_adt("A40", "E4", "A1^^^ISSUER-A", extra="MRG|NOPE^^^ISSUER-A\r")),
            _frame("MSH|^~\\&|ADT|HOSP|||20240101||ADT^A01|E5|P|2.5\r"),
        ],
    )
    codes = [_msa(a)[1] for a in acks]
    assert codes == ["AR", "AR", "AE", "AE", "AE", "AE"]
    assert "assigning authority" in _msa(acks[2])[3]
    assert "birth date" in _msa(acks[3])[3]
    assert _msa(acks[1])[2] == "E1"
    with Session(engine) as s:
        assert service.get_record(session=s, issuer="ISSUER-A", value="A1") is None


def test_a40_merge_moves_studies_and_unlink_splits_back(engine: Any) -> None:
    with Session(engine, expire_on_commit=False) as s:
        survivor = ingest_patient(s, "fac-a", "A1", "REID^RUBY", "19300620")
        temp = ingest_patient(s, "fac-a", "TMP9", "TRAUMA^ALPHA")
        s.add(Study(study_uid="1.2.840.99.1", facility_id="fac-a", patient_pk=temp.pk))  # type: ignore[arg-type]
        s.commit()
    acks = _exchange(engine, [_frame(_adt("A40", "G1", "A1^^^ISSUER-A", extra="MRG|TMP9^^^ISSUER-A\r"))])
    assert _msa(acks[0])[1] == "AA"
    with Session(engine) as s:
        study = s.exec(select(Study).where(Study.study_uid == "1.2.840.99.1")).one()
        assert s.get(Patient, study.patient_pk).person_id == survivor.person_id  # type: ignore[union-attr]
        rec = service.get_record(session=s, issuer="ISSUER-A", value="TMP9")
        service.unlink(session=s, record_id=rec.id, who="him", why="merged the wrong patient")  # type: ignore[union-attr, arg-type]
    with Session(engine) as s:
        study = s.exec(select(Study).where(Study.study_uid == "1.2.840.99.1")).one()
        assert s.get(Patient, study.patient_pk).person_id != survivor.person_id  # type: ignore[union-attr]
        assert s.get(Patient, study.patient_pk) is not None
