"""Addresses in any script are addresses: a Cyrillic, Greek, Han or kana address corroborates a
link or tells two patients apart, a Latin letter with no ASCII decomposition (Ø, Ł, Đ, ß) is
spelled in ASCII instead of dropped, and digits of every script are ASCII digits. An address in
ASCII normalises as it always did."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlmodel import Session, select

from broker.identity import matching, service
from broker.identity.models import BlockKey, IdentityRecord
from broker.index.service import ingest_files
from broker.security.schemas import Principal, Role
from storage import open_store

from .conftest import write_part10

P = Principal(who="test", role=Role.admin, facility="fac-a")


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        # What every stored ASCII address and its keys were computed with: must not move.
        ("8 Stanley Street Miami 4223", "8 STANLEY STREET MIAMI 4223"),
        ("12B o'connell st., apt #4 / Dublin D02-X285", "12B O CONNELL ST APT 4 DUBLIN D02 X285"),
        ("  ", ""),
        ("Flat 3, 17-19 Sharwood Cres\tNSW 2866", "FLAT 3 17 19 SHARWOOD CRES NSW 2866"),
    ],
)
def test_ascii_addresses_normalise_as_before(address: str, expected: str) -> None:
    assert matching.normalize_address(address) == expected


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("Müllerstraße 5, Zürich", "MULLERSTRASSE 5 ZURICH"),
        ("Østergade 12, København", "OSTERGADE 12 KOBENHAVN"),
        ("ul. Łąkowa 3, Łódź", "UL LAKOWA 3 LODZ"),
        ("Đakovačka 7, Osijek", "DAKOVACKA 7 OSIJEK"),
        ("Ægirsgade 1, Þórshöfn", "AEGIRSGADE 1 THORSHOFN"),
        # Typographic punctuation separates words as its ASCII form does ('l'Église' is L EGLISE).
        ("Rue de l’Église 5–7", "RUE DE L EGLISE 5 7"),
        # A soft hyphen is inside its word, not between two.
        ("Haupt\u00adstraße 5", "HAUPTSTRASSE 5"),
    ],
)
def test_latin_letters_without_ascii_form_are_spelled_not_dropped(address: str, expected: str) -> None:
    assert matching.normalize_address(address) == expected


def test_cyrillic_addresses_are_kept_and_told_apart() -> None:
    lenina = matching.normalize_address("г. Москва, Ленинский проспект, д. 12")
    assert lenina == "Г МОСКВА ЛЕНИНСКИЙ ПРОСПЕКТ Д 12"
    # The same address written with other punctuation and case is the same address.
    assert matching.normalize_address("Г.МОСКВА  ленинский ПРОСПЕКТ д.12") == lenina
    other = matching.normalize_address("г. Казань, ул. Баумана, д. 12")
    assert other != lenina  # before, both were "12"
    assert matching.normalize_address("Ørsted 1") != matching.normalize_address("rsted 1")


def test_digits_of_every_script_are_ascii_digits() -> None:
    # A Japanese address with full-width digits and a minus sign between the block numbers.
    assert matching.normalize_address("〒１００－０００５ 東京都千代田区丸の内１丁目９−１") == (
        "100 0005 東京都千代田区丸の内 1 丁目 9 1"
    )
    # Arabic-Indic and Devanagari digits (postcodes, house numbers).
    assert matching.normalize_address("شارع الملك فهد ١٢، الرياض ١٢٢٧١") == "شارع الملك فهد 12 الرياض 12271"
    assert matching.normalize_address("मकान १२, नई दिल्ली ११०००१") == "मकान 12 नई दिल्ली 110001"
    # A Han address runs its words together: the house number is a token of its own, so 88号
    # and 89号 are different houses, not one long word with a typo.
    han = matching.normalize_address("北京市朝阳区建国路88号 100022")
    assert han == "北京市朝阳区建国路 88 号 100022"
    assert (
        matching.compare_levels(
            matching.Demographics(address=han),
            matching.Demographics(address=matching.normalize_address("北京市朝阳区建国路89号 100022")),
        )[0][matching.FIELDS.index("address")]
        > 0
    )


def test_greek_addresses_lose_their_accents_as_names_do() -> None:
    assert matching.normalize_address("Οδός Ερμού 10, Αθήνα") == "ΟΔΟΣ ΕΡΜΟΥ 10 ΑΘΗΝΑ"


def test_blocking_keys_read_words_of_every_script() -> None:
    """The postcode, the street word and the street + town key are picked from non-Latin
    tokens too (a Devanagari word, whose vowel signs are marks, is a word), and a non-Latin
    word is keyed on its letters, not on a Soundex that codes only A-Z (Л000 for every Л...)."""
    d = matching.demographics(
        patient_name="Иванов^Пётр", birth_date="19800115", address="Ленинский проспект 12, Москва 101000"
    )
    keys = matching.block_keys(d)
    assert "fp:~ИВАНОВ101000" in keys  # the postcode
    assert "st:~ЛЕНИНС1980" in keys  # the street word
    assert "sb:~ЛЕНИНС~МОСКВА" in keys  # street + town
    other_street = matching.demographics(
        patient_name="Иванов^Пётр", birth_date="19800115", address="Лесная улица 12, Москва 101000"
    )
    assert not {k for k in matching.block_keys(other_street) if k.startswith(("st:", "sb:"))} & keys
    hindi = matching.demographics(
        patient_name="Sharma^Rahul", birth_date="19800115", address="शान्तिनगर मार्ग 12, दिल्ली"
    )
    assert "st:~शान्ति1980" in matching.block_keys(hindi)  # six code points, vowel signs too
    # Latin keys are what they were (no KEYS_VERSION change).
    latin = matching.demographics(
        patient_name="Neumann^Michaela", birth_date="19151111", address="8 Stanley Street Miami 4223"
    )
    assert {k for k in matching.block_keys(latin) if k[:3] in ("fp:", "gp:", "st:", "sb:")} == {
        "fp:N5504223",
        "gp:M2404223",
        "st:S3541915",
        "st:S354N550",
        "sb:S354M500",
    }


def _ingest(engine: Any, store: Any, facility: str, path: str) -> None:
    outcomes = ingest_files(engine=engine, store=store, principal=P, facility_id=facility, paths=[path])
    assert [o.status for o in outcomes] == ["stored"], outcomes


def test_different_cyrillic_addresses_are_not_the_same_address(engine: Any, tmp_path: Path) -> None:
    """Ingest end to end: the same name and birth date at three facilities, two at one Cyrillic
    address and one at another. Before, every Cyrillic address was its house number alone, and
    ЛЕНИНСКИЙ ПРОСПЕКТ 12 in Moscow was "the same" address as БАУМАНА 12 in Kazan."""
    store = open_store((tmp_path / "objects").as_uri())
    common = {
        "SpecificCharacterSet": "ISO_IR 192",
        "PatientName": "Иванов^Пётр",
        "PatientBirthDate": "19800115",
        "PatientSex": "M",
    }
    for facility, pid, address in (
        ("fac-a", "A1", "Москва, Ленинский проспект 12"),
        ("fac-b", "B1", "Казань, Кремлёвская улица 12"),
        ("fac-c", "C1", "МОСКВА ЛЕНИНСКИЙ ПРОСПЕКТ 12"),
    ):
        path = write_part10(tmp_path / f"{pid}.dcm", PatientID=pid, PatientAddress=address, **common)
        _ingest(engine, store, facility, path)

    def address_level(issuer: str, value: str) -> str:
        with Session(engine) as s:
            rec = s.exec(
                select(IdentityRecord).where(IdentityRecord.issuer == issuer, IdentityRecord.value == value)
            ).one()
            assert rec.id is not None
            why = service.explain(session=s, record_id=rec.id)
        return str(why["history"][-1]["contributions"]["address"]["level"])

    assert address_level("ISSUER-B", "B1") == "different"
    assert address_level("1.2.826.0.1.99", "C1") == "same"


def test_addresses_stored_in_the_old_form_are_refreshed(engine: Any, tmp_path: Path) -> None:
    """Upgrade: records stored before kept only the digits of a Cyrillic address, and a new
    study of the same patient does not relink it (ingest relinks on a changed name, birth date
    or sex). `refresh_addresses` recomputes them from the newest study's header, with their
    keys; records still like their person stay linked, with no review item; ASCII addresses
    are not touched."""
    store = open_store((tmp_path / "objects").as_uri())
    common = {"SpecificCharacterSet": "ISO_IR 192", "PatientBirthDate": "19800115", "PatientSex": "M"}
    for facility, pid, name, address in (
        ("fac-a", "A1", "Иванов^Пётр", "Москва, Ленинский проспект 12"),
        ("fac-b", "B1", "Иванов^Пётр", "Москва, Ленинский проспект 12"),
        ("fac-a", "A2", "Smith^John", "12 Main Street Springfield 4000"),
    ):
        header = {**common, "PatientID": pid, "PatientName": name, "PatientAddress": address}
        _ingest(engine, store, facility, write_part10(tmp_path / f"{pid}.dcm", **header))
    with Session(engine) as s:
        # What the previous release stored for the Cyrillic ones.
        s.execute(text("UPDATE identity_record SET address = '12' WHERE value IN ('A1', 'B1')"))
        s.commit()
    again = {**common, "PatientName": "Иванов^Пётр", "PatientAddress": "Москва, Ленинский проспект 12"}
    _ingest(engine, store, "fac-a", write_part10(tmp_path / "A1-next.dcm", PatientID="A1", **again))

    def records() -> dict[str, IdentityRecord]:
        with Session(engine) as s:
            return {r.value: r for r in s.exec(select(IdentityRecord)).all()}

    assert records()["A1"].address == "12"  # a new study alone leaves it
    with Session(engine) as s:
        assert service.refresh_addresses(session=s) == 2
        assert service.refresh_addresses(session=s) == 0  # current now: nothing to do
    after = records()
    assert after["A1"].address == after["B1"].address == "МОСКВА ЛЕНИНСКИЙ ПРОСПЕКТ 12"
    assert after["A2"].address == "12 MAIN STREET SPRINGFIELD 4000"
    assert after["A1"].person_id == after["B1"].person_id != after["A2"].person_id
    with Session(engine) as s:
        keys = set(s.exec(select(BlockKey.key).where(BlockKey.record_id == after["A1"].id)).all())
        assert {"st:~МОСКВА1980", "sb:~ЛЕНИНС~ПРОСПЕ"} <= keys  # keyed on the address's words now
        assert service.review_queue(session=s) == []
