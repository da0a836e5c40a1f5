"""Names in any script are names: a Cyrillic, Greek, Han, Hangul or kana name is evidence for
(and against) a link, and a person found or shown by it; Latin names normalise as they always did."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlmodel import Session, select

from broker.identity import matching, service
from broker.index.models import Patient
from broker.index.service import ingest_files
from broker.security.schemas import Principal, Role
from storage import open_store
from tests.support import CHARSET_FILES

from .conftest import write_part10

P = Principal(who="test", role=Role.admin, facility="fac-a")


@pytest.mark.parametrize(
    ("pn", "expected"),
    [
        ("Müller^Zoë", ("MULLER", "ZOE", "")),
        ("O'Brien^Seán Óg", ("OBRIEN", "SEAN", "OG")),
        ("Łukasz^Ørsted", ("UKASZ", "RSTED", "")),  # no ASCII form: dropped, as always
        ("DOE^JOHN", ("", "JOHN", "")),  # a placeholder is no name
        ("12345^678", ("", "", "")),
    ],
)
def test_latin_names_normalise_as_before(pn: str, expected: tuple[str, str, str]) -> None:
    assert matching.parse_person_name(pn) == expected


@pytest.mark.parametrize(
    ("pn", "expected"),
    [
        ("Иванов^Пётр Ильич", ("ИВАНОВ", "ПЁТР", "ИЛЬИЧ")),
        ("Διονύσιος^Νίκος", ("ΔΙΟΝΥΣΙΟΣ", "ΝΙΚΟΣ", "")),  # Greek capitals have no tonos
        ("王^小東", ("王", "小東", "")),
        ("김희중", ("김희중", "", "")),
        ("ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎", ("ヤマダ", "タロウ", "")),  # half-width katakana as full-width
        ("=山田^太郎=やまだ^たろう", ("山田", "太郎", "")),  # no Alphabetic group: the Ideographic
        ("Yamada^Tarou=山田^太郎", ("YAMADA", "TAROU", "")),  # the Alphabetic group first, as before
        ("शर्मा^राहुल", ("शर्मा", "राहुल", "")),  # vowel signs are part of the letters
    ],
)
def test_names_in_other_scripts_are_names(pn: str, expected: tuple[str, str, str]) -> None:
    assert matching.parse_person_name(pn) == expected


def test_blocking_keys_of_other_scripts_neither_crash_nor_crowd() -> None:
    # Soundex codes only A-Z: ИВАНОВ and ИГОРЕВ were both И000 and would have blocked together
    # with every И... name born that month.
    ivanov = matching.demographics(patient_name="Иванов^Пётр", birth_date="19800115")
    igorev = matching.demographics(patient_name="Игорев^Павел", birth_date="19800117")
    shared = matching.block_keys(ivanov) & matching.block_keys(igorev)
    assert not {k for k in shared if not k.startswith("di:")}
    assert matching.block_keys(matching.demographics(patient_name="王^小東", birth_date="19800115")) == {
        "d:19800115",
        "di:198001王小",
        "fm:~王198001",
        "fd:~王198015",
        "gm:~小東0115",
        "fg:~王~小東",
    }
    # Latin keys are what they were (stored keys stay valid: no KEYS_VERSION change).
    assert matching.block_keys(matching.demographics(patient_name="Müller^Zoë", birth_date="19800115")) == {
        "d:19800115",
        "di:198001MZ",
        "fm:M460198001",
        "fd:M460198015",
        "gm:Z0000115",
        "fg:M460Z000",
    }


def _ingest(engine: Any, store: Any, facility: str, path: str) -> None:
    outcomes = ingest_files(engine=engine, store=store, principal=P, facility_id=facility, paths=[path])
    assert [o.status for o in outcomes] == ["stored"], outcomes


def _person(engine: Any, issuer: str, patient_id: str) -> int | None:
    with Session(engine) as s:
        return s.exec(
            select(Patient.person_id).where(Patient.issuer == issuer, Patient.patient_id == patient_id)
        ).one()


def test_a_chinese_name_links_one_patient_and_keeps_another_apart(engine: Any, tmp_path: Path) -> None:
    store = open_store((tmp_path / "objects").as_uri())
    common = {"SpecificCharacterSet": "ISO_IR 192", "PatientBirthDate": "19700312", "PatientSex": "M"}
    address = "北京市朝阳区建国路88号 100022"
    for facility, pid, name in (
        ("fac-a", "A1", "王^小東"),
        ("fac-b", "B1", "王^小東"),
        ("fac-b", "B2", "王^建国"),
    ):
        _ingest(
            engine,
            store,
            facility,
            write_part10(
                tmp_path / f"{pid}.dcm", PatientID=pid, PatientName=name, PatientAddress=address, **common
            ),
        )
    # The same name, birth date and address at two facilities: one person. Before, a Han name
    # was no name at all, and birth date and address alone never link.
    assert _person(engine, "ISSUER-A", "A1") == _person(engine, "ISSUER-B", "B1")
    # Same family name, birth date and address, a plainly different given name: what twins look
    # like. Held apart (for review), as ZHANG^WEI and ZHANG^FANG would be.
    assert _person(engine, "ISSUER-B", "B2") != _person(engine, "ISSUER-A", "A1")


def test_a_hangul_name_finds_and_shows_its_person(engine: Any, tmp_path: Path) -> None:
    """chrKoreanMulti.dcm (ISO 2022 IR 149), its name in Hangul in the Alphabetic group alone: the
    person has that name, and the lookup's search by family name (PDQm) finds it."""
    store = open_store((tmp_path / "objects").as_uri())
    _ingest(engine, store, "fac-a", str(CHARSET_FILES / "chrKoreanMulti.dcm"))
    with Session(engine) as s:
        (person,) = service.search_persons(session=s, family="김희")
        assert (person.family, person.given) == ("김희중", "")
        assert [i.value for i in person.identifiers] == ["2008-3"]


def test_records_stored_without_their_name_are_relinked_on_it(engine: Any, tmp_path: Path) -> None:
    """Upgrade: records linked before names in other scripts counted have empty names; the
    relink reads their patients' names and links them as a changed header would."""
    store = open_store((tmp_path / "objects").as_uri())
    common = {"SpecificCharacterSet": "ISO_IR 192", "PatientBirthDate": "19700312", "PatientSex": "M"}
    for facility, pid, address in (
        ("fac-a", "A1", "1 Chang'an Ave 100022"),
        ("fac-b", "B1", "9 Other Rd 200000"),
    ):
        _ingest(
            engine,
            store,
            facility,
            write_part10(
                tmp_path / f"{pid}.dcm",
                PatientID=pid,
                PatientName="王^小東",
                PatientAddress=address,
                **common,
            ),
        )
    with Session(engine) as s:
        # What the previous release stored: no name, so two persons (birth date alone never links).
        s.execute(text("UPDATE identity_record SET family = '', given = ''"))
        s.execute(text("UPDATE patient SET person_id = pk"))
        s.execute(text("UPDATE identity_record SET person_id = id"))
        s.commit()
        assert service.relink_named(session=s) == 2
        assert service.relink_named(session=s) == 0  # named now: not read again
    assert _person(engine, "ISSUER-A", "A1") == _person(engine, "ISSUER-B", "B1")
