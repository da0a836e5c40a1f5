"""A person is found by any of its PatientName's component groups: PDQm's family and given (and
the lookup page's search, which is the same) match the MPI's name and a record's Ideographic and
Phonetic groups, `Yamada^Tarou=山田^太郎=やまだ^たろう` by 山田 or やまだ as by YAMADA; Latin as before."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from psycopg import sql
from sqlalchemy import inspect, text
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from broker.db import make_engine, migrate
from broker.identity import matching, service
from broker.identity.models import IdentityName, IdentityRecord
from broker.identity.schemas import Identifier
from broker.index.service import ingest_files
from broker.security.schemas import Principal, Role
from storage import open_store
from tests.conftest import Backend, PgAdmin
from tests.support import CHARSET_FILES, insert_row, migrated_back_to

from .conftest import ingest_patient

P = Principal(who="test", role=Role.admin, facility="fac-a")
JAPANESE = "Yamada^Tarou=山田^太郎=やまだ^たろう"


def _found(engine: Any, **criteria: str) -> list[str]:
    """The identifier values of the persons a PDQm search finds."""
    with Session(engine) as s:
        people = service.search_persons(session=s, **criteria)  # type: ignore[arg-type]
    return sorted(i.value for p in people for i in p.identifiers)


@pytest.mark.parametrize(
    ("pn", "expected"),
    [
        (JAPANESE, (("山田", "太郎", "IDE"), ("やまだ", "たろう", "SYL"))),
        ("ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎", (("山田", "太郎", "IDE"),)),
        ("Wang^XiaoDong=王^小東", (("王", "小東", "IDE"),)),
        ("Hong^Gildong==홍^길동", (("홍", "길동", "SYL"),)),  # an empty Ideographic group
        ("=山田^太郎", (("山田", "太郎", "IDE"),)),  # the record's own name too: found either way
        ("Lee^Anna=李^安娜=李^安娜", (("李", "安娜", "IDE"),)),  # one name, one row: the first
        ("Smith^Anne", ()),
        ("", ()),
    ],
)
def test_other_names_are_the_ideographic_and_phonetic_groups(
    pn: str, expected: tuple[tuple[str, str, str], ...]
) -> None:
    assert matching.other_names(pn) == expected


@pytest.mark.parametrize(
    ("criteria", "found"),
    [
        ({"family": "山田"}, ["JP1"]),  # Ideographic
        ({"family": "山"}, ["JP1"]),  # a prefix, as for the Alphabetic group
        ({"family": "やまだ"}, ["JP1"]),  # Phonetic
        ({"given": "太郎"}, ["JP1"]),
        ({"given": "たろ"}, ["JP1"]),
        # Each of family and given matches any of the names (FHIR search), as PDQm defines them.
        ({"family": "山田", "given": "TAROU"}, ["JP1"]),
        ({"family": "山田", "birth_date": "1970-03-12"}, ["JP1"]),
        ({"family": "山田", "birth_date": "1970-03-13"}, []),
        ({"family": "太郎"}, []),  # a given name is no family name in any group
        ({"family": "田中"}, []),
        # Latin as before: the MPI's name, prefix, case-insensitive.
        ({"family": "YAMADA"}, ["JP1"]),
        ({"family": "yam"}, ["JP1"]),
        ({"family": "neu"}, ["DE1"]),
        ({"given": "Michaela"}, ["DE1"]),
        ({"family": "smith"}, []),
    ],
)
def test_pdq_finds_a_person_by_any_component_group(
    session: Session, engine: Any, criteria: dict[str, str], found: list[str]
) -> None:
    ingest_patient(session, "fac-a", "JP1", JAPANESE, "19700312", "M")
    ingest_patient(session, "fac-a", "DE1", "NEUMANN^MICHAELA", "19151111", "F")
    assert _found(engine, **criteria) == found


def test_a_record_the_caller_may_not_see_is_not_found_by_its_other_names(session: Session) -> None:
    ingest_patient(session, "fac-a", "JP1", JAPANESE, "19700312", "M")
    ingest_patient(session, "fac-b", "JP2", "Tanaka^Hanako=田中^花子", "19800101", "F")
    hidden = set(session.exec(select(IdentityRecord.id).where(IdentityRecord.value == "JP1")).all())
    people = service.search_persons(session=session, family="山田", keep=lambda ids: set(ids) - hidden)
    assert people == []
    people = service.search_persons(session=session, family="田中", keep=lambda ids: set(ids) - hidden)
    assert [i.value for p in people for i in p.identifiers] == ["JP2"]


def test_a_changed_header_changes_the_other_names_and_a_feed_keeps_them(
    session: Session, engine: Any
) -> None:
    ingest_patient(session, "fac-a", "JP1", JAPANESE, "19700312", "M")
    # The name corrected at the facility: the old groups no longer find the patient.
    ingest_patient(session, "fac-a", "JP1", "Tanaka^Hanako=田中^花子", "19700312", "M")
    assert _found(engine, family="山田") == [] and _found(engine, family="田中") == ["JP1"]
    # A header without a name says nothing of it: what is stored stays.
    ingest_patient(session, "fac-a", "JP1", "", "19700312", "M")
    assert _found(engine, family="田中") == ["JP1"]
    # A feed (FHIR, HL7) carries no other names: its update keeps them.
    service.upsert_record(
        session=session,
        identifier=Identifier(issuer="ISSUER-A", value="JP1"),
        demographics=matching.demographics(family="TANAKA", given="HANAKO", birth_date="19700312"),
        source="fhir",
    )
    session.commit()
    assert _found(engine, family="田中") == ["JP1"]


def test_a_study_sent_with_three_groups_is_found_by_each(engine: Any, tmp_path: Path) -> None:
    """chrH31.dcm (ISO 2022 IR 87) and chrH32.dcm (half-width katakana) sent together: linked in
    one batch (new records), each stored with its other names."""
    store = open_store((tmp_path / "objects").as_uri())
    outcomes = ingest_files(
        engine=engine,
        store=store,
        principal=P,
        facility_id="fac-a",
        paths=[str(CHARSET_FILES / name) for name in ("chrH31.dcm", "chrH32.dcm", "chrX1.dcm")],
    )
    assert all(o.status == "stored" for o in outcomes), [o.message for o in outcomes]
    assert _found(engine, family="山田") == ["H31EXAMPLE", "H32EXAMPLE"]
    assert _found(engine, family="やまだ", given="たろう") == ["H31EXAMPLE", "H32EXAMPLE"]
    assert _found(engine, family="王") == ["X1EXAMPLE"]
    assert _found(engine, family="ﾔﾏﾀﾞ") == ["H32EXAMPLE"]  # its own name, as before
    with Session(engine) as s:
        names = s.exec(select(IdentityName)).all()
        assert len(names) == 5
        assert {(n.family, n.given, n.representation) for n in names} == {
            ("山田", "太郎", "IDE"),
            ("やまだ", "たろう", "SYL"),
            ("王", "小東", "IDE"),
        }


@pytest.mark.parametrize("part", ["family", "given"])
def test_the_other_names_are_searched_through_an_index(engine: Any, part: str) -> None:
    """Their part of the search is a prefix scan of an index of identity_name, planned as the
    broker runs it (SQLite serves only a bound pattern; PostgreSQL only a pattern_ops index)."""
    from broker.identity import queries

    stmt = select(IdentityRecord.id).where(queries._name_starts(part, "山田"))
    compiled = stmt.compile(dialect=engine.dialect)
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            conn.exec_driver_sql("SET enable_seqscan = off")
            rows = conn.exec_driver_sql("EXPLAIN " + str(compiled), compiled.params)
            plan = " ".join(str(r[0]) for r in rows)
            assert f"ix_identity_name_{part}_pat" in plan, plan
        else:
            params = tuple(compiled.params[k] for k in compiled.positiontup or ())
            rows = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + str(compiled), params)
            plan = " ".join(str(r[-1]) for r in rows)
            assert f"SEARCH identity_name USING INDEX ix_identity_name_{part}" in plan, plan


def test_the_migration_fills_the_other_names_of_existing_records(backend: Backend) -> None:
    """Records linked before other names were kept are given them from the index's patient row
    they mirror (whose name keeps every group since 0012), and are then found by them."""
    engine = make_engine(backend.database_url)
    try:
        migrated_back_to(engine, "0005_identity_settings")
        t = "2026-01-01T00:00:00+00:00"
        with engine.begin() as conn:
            insert_row(conn, "facility", id="fac-a", name="A", issuer="ISSUER-A", created_at=t)
            for pk, (pid, name, family, given) in enumerate(
                (
                    ("JP1", JAPANESE, "YAMADA", "TAROU"),
                    ("CN1", "Wang^XiaoDong=王^小東", "WANG", "XIAODONG"),
                    ("DE1", "Müller^Hans", "MULLER", "HANS"),
                ),
                start=1,
            ):
                insert_row(
                    conn, "patient", pk=pk, facility_id="fac-a", issuer="ISSUER-A", patient_id=pid,
                    patient_name=name, name_norm="", name_fuzzy="", name_ideographic="",
                    name_ideographic_fuzzy="", name_phonetic="", name_phonetic_fuzzy="", birth_date="",
                    sex="", person_id=pk, updated_at=t,
                )  # fmt: skip
                insert_row(conn, "identity_person", id=pk, created_at=t)
                insert_row(
                    conn, "identity_record", id=pk, issuer="ISSUER-A", value=pid, person_id=pk,
                    facility_id="fac-a", patient_pk=pk, source="dicom", family=family, given=given,
                    middle="", birth_date="", sex="", address="", phone="", updated_at=t,
                )  # fmt: skip
        migrate(engine)
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT record_id, family, given FROM identity_name")).all()
        assert sorted(tuple(r) for r in rows) == [
            (1, "やまだ", "たろう"),
            (1, "山田", "太郎"),
            (2, "王", "小東"),
        ]
        assert _found(engine, family="山田") == ["JP1"]
        assert _found(engine, given="小") == ["CN1"]
        assert _found(engine, family="mul") == ["DE1"]
    finally:
        engine.dispose()


@pytest.fixture
def collated_engine(backend: Backend, request: pytest.FixtureRequest) -> Iterator[Engine]:
    """A migrated index whose text sorts by a language's rules, as a production server's
    en_US.UTF-8 does (ICU here), not by bytes as the test server's C.UTF-8 does: under C a plain
    btree index serves LIKE too, so only under another collation does the pattern index show."""
    if backend.name != "postgres-s3":
        engine = make_engine(backend.database_url)
        migrate(engine)
        yield engine
        engine.dispose()
        return
    pg_admin: PgAdmin = request.getfixturevalue("pg_admin")
    name = pg_admin.new_name("icu")
    icu = "CREATE DATABASE {} TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'und' LOCALE 'C.UTF-8'"
    pg_admin.conn.execute(sql.SQL(icu).format(sql.Identifier(name)))
    engine = make_engine(pg_admin.url(name))
    try:
        migrate(engine)
        yield engine
    finally:
        engine.dispose()
        pg_admin.drop(name)


@pytest.mark.parametrize("part", ["family", "given"])
def test_the_record_name_is_searched_through_an_index(collated_engine: Engine, part: str) -> None:
    """The record's own name's part of the search is a prefix scan of an index of identity_record
    too (before, the record table was read whole: an OR with the other names' subquery is served
    by no index, and PostgreSQL had no pattern index on it), planned as the broker runs it."""
    from broker.identity import queries

    stmt = select(IdentityRecord.id).where(queries._name_starts(part, "YAM"))
    compiled = stmt.compile(dialect=collated_engine.dialect)
    with collated_engine.connect() as conn:
        if collated_engine.dialect.name == "postgresql":
            conn.exec_driver_sql("SET enable_seqscan = off")
            rows = conn.exec_driver_sql("EXPLAIN " + str(compiled), compiled.params)
            plan = " ".join(str(r[0]) for r in rows)
            assert f"Index Scan using ix_identity_record_{part}_pat" in plan, plan
            assert f"ix_identity_name_{part}_pat" in plan, plan
        else:
            params = tuple(compiled.params[k] for k in compiled.positiontup or ())
            rows = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + str(compiled), params)
            plan = " ".join(str(r[-1]) for r in rows)
            assert f"SEARCH identity_record USING COVERING INDEX ix_identity_record_{part} (" in plan, plan
            assert f"SEARCH identity_name USING INDEX ix_identity_name_{part}" in plan, plan


_PATTERN_INDEXES = {"ix_identity_record_family_pat", "ix_identity_record_given_pat"}


def _indexes(engine: Engine) -> set[str]:
    inspector = inspect(engine)
    tables = ("identity_record", "identity_name")
    return {str(i["name"]) for table in tables for i in inspector.get_indexes(table)}


def test_the_migration_says_which_representation_each_stored_other_name_is_in(backend: Backend) -> None:
    """0014 on names stored before it: a name a header of the record gives (its index patient
    row's groups) takes that group's representation; one a feed alone gave has none ("") and is
    still searched by. Downgraded, the column and PostgreSQL's pattern indexes go and the names
    stay; upgraded again, the same."""
    engine = make_engine(backend.database_url)
    try:
        migrated_back_to(engine, "0013_identity_names")
        assert not _indexes(engine) & _PATTERN_INDEXES
        t = "2026-01-01T00:00:00+00:00"
        with engine.begin() as conn:
            insert_row(conn, "facility", id="fac-a", name="A", issuer="ISSUER-A", created_at=t)
            for pk, (pid, patient_name, source, family, given) in enumerate(
                (
                    ("JP1", JAPANESE, "dicom", "YAMADA", "TAROU"),  # a header's names
                    ("JP2", None, "fhir", "LI", "XIAOLONG"),  # a feed's alone
                    ("JP3", "Yamada^Hanako=山田^花子", "hl7", "YAMADA", "HANAKO"),  # one of each
                ),
                start=1,
            ):
                if patient_name is not None:
                    insert_row(
                        conn, "patient", pk=pk, facility_id="fac-a", issuer="ISSUER-A", patient_id=pid,
                        patient_name=patient_name, name_norm="", name_fuzzy="", name_ideographic="",
                        name_ideographic_fuzzy="", name_phonetic="", name_phonetic_fuzzy="",
                        birth_date="", sex="", person_id=pk, updated_at=t,
                    )  # fmt: skip
                insert_row(conn, "identity_person", id=pk, created_at=t)
                insert_row(
                    conn, "identity_record", id=pk, issuer="ISSUER-A", value=pid, person_id=pk,
                    facility_id="fac-a", patient_pk=pk if patient_name else None, source=source,
                    family=family, given=given, middle="", birth_date="", sex="", address="", phone="",
                    updated_at=t,
                )  # fmt: skip
            for record_id, family, given in (
                (1, "山田", "太郎"),
                (1, "やまだ", "たろう"),
                (2, "李", "小龍"),
                (3, "山田", "花子"),
                (3, "やまだ", "はなこ"),
            ):
                insert_row(conn, "identity_name", record_id=record_id, family=family, given=given)
        migrate(engine)
        query = text("SELECT record_id, family, given, representation FROM identity_name")
        expected = [
            (1, "やまだ", "たろう", "SYL"),
            (1, "山田", "太郎", "IDE"),
            (2, "李", "小龍", ""),
            (3, "やまだ", "はなこ", ""),
            (3, "山田", "花子", "IDE"),
        ]
        with engine.connect() as conn:
            assert sorted(tuple(r) for r in conn.execute(query)) == expected
        assert _found(engine, family="李") == ["JP2"]
        assert _found(engine, family="やまだ", given="は") == ["JP3"]
        assert _indexes(engine) >= (_PATTERN_INDEXES if backend.name == "postgres-s3" else set())

        migrated_back_to(engine, "0013_identity_names")
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT record_id, family, given FROM identity_name")).all()
        assert sorted(tuple(r) for r in rows) == [r[:3] for r in expected]
        assert "representation" not in {c["name"] for c in inspect(engine).get_columns("identity_name")}
        assert {"ix_identity_name_family", "ix_identity_name_given"} <= _indexes(engine)
        assert not _indexes(engine) & _PATTERN_INDEXES
        migrate(engine)
        with engine.connect() as conn:
            assert sorted(tuple(r) for r in conn.execute(query)) == expected
        assert _found(engine, family="李") == ["JP2"]
    finally:
        engine.dispose()
