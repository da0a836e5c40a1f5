"""PatientName's component groups (PS3.5 6.2.1): the Japanese, Korean and Chinese files pydicom
ships, in their own character sets, matched on any group and answered with every group."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlmodel import Session

from broker.app import build_state
from broker.db import make_engine, migrate
from broker.deps import AppState
from broker.index import service
from broker.index.schemas import Level, Query
from broker.security.schemas import Principal, Role
from broker.settings import Settings
from tests.conftest import Backend
from tests.support import CHARSET_FILES, insert_row, make_ds, migrated_back_to, write

P = Principal(who="test", role=Role.admin, facility="local")
NAME, PID, STUDY = "00100010", "00100020", "0020000D"

FILES = {
    "chrH31.dcm": "H31EXAMPLE",  # Yamada^Tarou=山田^太郎=やまだ^たろう (ISO 2022 IR 87)
    "chrH32.dcm": "H32EXAMPLE",  # ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう (half-width katakana, IR 13)
    "chrI2.dcm": "I2EXAMPLE",  # Hong^Gildong=洪^吉洞=홍^길동 (ISO 2022 IR 149)
    "chrX1.dcm": "X1EXAMPLE",  # Wang^XiaoDong=王^小東 (ISO_IR 192)
    "chrX2.dcm": "X2EXAMPLE",  # Wang^XiaoDong=王^小东 (GB18030)
    "chrKoreanMulti.dcm": "2008-3",  # 김희중, Hangul in the Alphabetic group alone
    "chrGreek.dcm": "SCSGREEK",  # Διονυσιος
    "chrRuss.dcm": "SCSRUSS",  # Люкceмбypг
}


@pytest.fixture
def state(settings: Settings, tmp_path: Path) -> Iterator[AppState]:
    st = build_state(settings)
    paths = [str(CHARSET_FILES / name) for name in FILES]
    # ヤマタ (Yamata) is another name than ヤマダ (Yamada): the voicing mark is no accent.
    paths.append(
        write(
            tmp_path,
            "yamata.dcm",
            make_ds(sop="1.9.9.1", study="1.9.9", series="1.9.9.1", name="ヤマタ^ハナコ", pid="YAMATA"),
        )
    )
    outcomes = service.ingest_files(
        engine=st.engine, store=st.store, principal=P, facility_id="local", paths=paths
    )
    assert all(o.status == "stored" for o in outcomes), [o.message for o in outcomes]
    yield st
    st.engine.dispose()


def _search(state: AppState, level: Level, name: str, *, fuzzy: bool = False) -> list[str]:
    """The Patient IDs a PatientName query finds."""
    with Session(state.engine) as s:
        query = Query(level=level, filters={"PatientName": name}, fuzzy=fuzzy, limit=100)
        matches = service.search(session=s, query=query).matches
    return sorted(m[PID]["Value"][0] for m in matches)


def test_patient_level_answers_every_component_group(state: AppState) -> None:
    with Session(state.engine) as s:
        matches = service.search(
            session=s, query=Query(level="patient", filters={"PatientID": "H31EXAMPLE"})
        ).matches
    assert [m[NAME]["Value"] for m in matches] == [
        [{"Alphabetic": "Yamada^Tarou", "Ideographic": "山田^太郎", "Phonetic": "やまだ^たろう"}]
    ]


@pytest.mark.parametrize("level", ["study", "patient"])
@pytest.mark.parametrize(
    ("name", "found"),
    [
        ("山田*", ["H31EXAMPLE", "H32EXAMPLE"]),  # Ideographic
        ("山田^太郎", ["H31EXAMPLE", "H32EXAMPLE"]),
        ("やまだ*", ["H31EXAMPLE", "H32EXAMPLE"]),  # Phonetic
        ("洪^吉洞", ["I2EXAMPLE"]),
        ("홍*", ["I2EXAMPLE"]),
        ("王*", ["X1EXAMPLE", "X2EXAMPLE"]),
        ("王^小東", ["X1EXAMPLE"]),
        ("김희중", ["2008-3"]),  # Hangul in the Alphabetic group
        ("yamada*", ["H31EXAMPLE"]),  # Latin, case-insensitive, as before
        ("ΔΙΟΝΥΣΙΟΣ", ["SCSGREEK"]),
        ("люк*", ["SCSRUSS"]),
        # Groups given: each matches its own group.
        ("Yamada^Tarou=山田^太郎", ["H31EXAMPLE"]),
        ("ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう", ["H32EXAMPLE"]),
        ("=山田*", ["H31EXAMPLE", "H32EXAMPLE"]),
        ("==やまだ^たろう", ["H31EXAMPLE", "H32EXAMPLE"]),
        ("*=王*", ["X1EXAMPLE", "X2EXAMPLE"]),
        ("Yamada*=洪*", []),
        ("=やまだ*", []),  # Phonetic, asked for as Ideographic
    ],
)
def test_a_name_is_found_by_the_groups_it_is_given_in(
    state: AppState, level: Level, name: str, found: list[str]
) -> None:
    assert _search(state, level, name) == found


def test_fuzzy_matching_folds_width_and_keeps_what_tells_names_apart(state: AppState) -> None:
    # Full-width ヤマダ finds the half-width ﾔﾏﾀﾞ of the Alphabetic group; not ヤマタ^ハナコ.
    assert _search(state, "study", "ヤマダ", fuzzy=True) == ["H32EXAMPLE"]
    assert _search(state, "study", "ヤマタ", fuzzy=True) == ["YAMATA"]
    assert _search(state, "study", "ヤマダ") == []  # exact matching stays exact
    assert _search(state, "study", "山田^太", fuzzy=True) == ["H31EXAMPLE", "H32EXAMPLE"]
    assert _search(state, "study", "==やま^た", fuzzy=True) == ["H31EXAMPLE", "H32EXAMPLE"]
    assert _search(state, "study", "김희", fuzzy=True) == ["2008-3"]
    assert _search(state, "study", "διονύσιος", fuzzy=True) == ["SCSGREEK"]  # tonos is an accent


def test_a_match_on_any_group_is_served_by_indexes(state: AppState) -> None:
    """Each group's condition is a prefix scan of an index (as the Alphabetic group's always was),
    not a scan of every study: planned as the broker runs it, with the match value bound (SQLite
    scanned the table in key order for an OR of bound LIKE patterns)."""
    from broker.index import query as q

    engine = state.engine
    for name, index in (
        ("山田*", "name_ideographic"),
        ("やまだ^たろう", "name_phonetic"),
        ("Yamada^Tarou=山田*", "name_"),
    ):
        query = Query(level="study", filters={"PatientName": name})
        conds, _asked, _ignored = q._filters(query, engine.dialect.name)
        compiled = (
            q.select(q._study)
            .where(*conds)
            .order_by(q._study.c.pk)
            .limit(101)
            .compile(dialect=engine.dialect)
        )
        with engine.connect() as conn:
            if engine.dialect.name == "postgresql":
                conn.exec_driver_sql("SET enable_seqscan = off")
                rows = conn.exec_driver_sql("EXPLAIN " + str(compiled), compiled.params)
                plan = " ".join(str(r[0]) for r in rows)
                assert "Seq Scan" not in plan and index in plan, plan
            else:
                params = tuple(compiled.params[k] for k in compiled.positiontup or ())
                rows = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + str(compiled), params)
                plan = " ".join(str(r[-1]) for r in rows)
                assert "SCAN study" not in plan and f"INDEX ix_study_{index}" in plan, plan


def test_the_migration_fills_the_groups_of_existing_rows(backend: Backend, tmp_path: Path) -> None:
    """Rows written before the groups were kept (Alphabetic only) are filled from the stored
    study JSON, and then found and answered as new ones are."""
    engine = make_engine(backend.database_url)
    try:
        migrated_back_to(engine, "0009_h41_imports")
        t = "2026-01-01T00:00:00+00:00"
        jp = (
            '{"vr": "PN", "Value": [{"Alphabetic": "ﾔﾏﾀﾞ^ﾀﾛｳ", "Ideographic": "山田^太郎",'
            ' "Phonetic": "やまだ^たろう"}]}'
        )
        with engine.begin() as conn:
            insert_row(conn, "facility", id="local", name="L", issuer="LOCAL", created_at=t)
            # As the previous release wrote them: the Alphabetic group, folded by NFKD.
            for pk, pid, name, norm, fuzzy in (
                (1, "JP", "ﾔﾏﾀﾞ^ﾀﾛｳ", "ﾔﾏﾀﾞ^ﾀﾛｳ", "ヤマタ^タロウ"),
                (2, "DE", "Müller^Hans", "müller^hans", "muller^hans"),
            ):
                insert_row(
                    conn, "patient", pk=pk, facility_id="local", issuer="LOCAL", patient_id=pid,
                    patient_name=name, name_norm=norm, name_fuzzy=fuzzy, birth_date="", sex="", updated_at=t,
                )  # fmt: skip
                pn = jp if pk == 1 else f'{{"vr": "PN", "Value": [{{"Alphabetic": "{name}"}}]}}'
                study_json = f'{{"00100010": {pn}, "00100020": {{"vr": "LO", "Value": ["{pid}"]}}}}'
                insert_row(
                    conn, "study", pk=pk, study_uid=f"1.7.{pk}", facility_id="local", patient_pk=pk,
                    patient_id=pid, issuer="LOCAL", issuer_in_data="", patient_name=name, name_norm=norm,
                    name_fuzzy=fuzzy, birth_date="", sex="", study_date="", study_time="",
                    accession_number="", study_id="", study_description="", referring_physician="",
                    modalities="\\", num_series=0, num_instances=0, study_json=study_json, updated_at=t,
                )  # fmt: skip
        migrate(engine)
        with engine.connect() as conn:
            for table in ("patient", "study"):
                rows = conn.execute(
                    text(
                        "SELECT patient_name, name_norm, name_fuzzy, name_ideographic,"
                        " name_ideographic_fuzzy, name_phonetic, name_phonetic_fuzzy"
                        f" FROM {table} ORDER BY pk"
                    )
                ).all()
                assert [tuple(r) for r in rows] == [
                    (
                        "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう",
                        "ﾔﾏﾀﾞ^ﾀﾛｳ",
                        "ヤマダ^タロウ",
                        "山田^太郎",
                        "山田^太郎",
                        "やまだ^たろう",
                        "やまだ^たろう",
                    ),
                    ("Müller^Hans", "müller^hans", "muller^hans", "", "", "", ""),
                ], table
    finally:
        engine.dispose()
    settings = Settings(
        data_dir=tmp_path / "data", database_url=backend.database_url, storage_url=backend.storage_url
    )
    st = build_state(settings)
    try:
        assert _search(st, "study", "山田*") == ["JP"]
        assert _search(st, "patient", "=山田^太郎") == ["JP"]
        assert _search(st, "study", "mul^ha", fuzzy=True) == ["DE"]
        with Session(st.engine) as s:
            (match,) = service.search(
                session=s, query=Query(level="patient", filters={"PatientID": "JP"})
            ).matches
        assert match[NAME]["Value"][0]["Ideographic"] == "山田^太郎"
    finally:
        st.engine.dispose()


REFERRED = {
    "REF-JP": "Yamada^Tarou=山田^太郎=やまだ^たろう",
    "REF-KR": "Hong^Gildong=洪^吉洞=홍^길동",
    "REF-LATIN": "Smith^Anne",
    "REF-NONE": "",
}


@pytest.fixture
def referred(settings: Settings, tmp_path: Path) -> Iterator[AppState]:
    """One study per referring physician of REFERRED (its Patient ID names it)."""
    st = build_state(settings)
    paths = []
    for n, (pid, referrer) in enumerate(REFERRED.items()):
        ds = make_ds(sop=f"1.8.{n}.1.1", study=f"1.8.{n}", series=f"1.8.{n}.1", name="DOE^JOHN", pid=pid)
        ds.ReferringPhysicianName = referrer
        paths.append(write(tmp_path, f"ref{n}.dcm", ds))
    outcomes = service.ingest_files(
        engine=st.engine, store=st.store, principal=P, facility_id="local", paths=paths
    )
    assert all(o.status == "stored" for o in outcomes), [o.message for o in outcomes]
    yield st
    st.engine.dispose()


@pytest.mark.parametrize(
    ("name", "found"),
    [
        ("山田*", ["REF-JP"]),  # Ideographic
        ("山田^太郎", ["REF-JP"]),
        ("やまだ^たろう", ["REF-JP"]),  # Phonetic
        ("홍*", ["REF-KR"]),
        ("Yamada^Tarou=山田^太郎", ["REF-JP"]),  # groups given: each its own
        ("=山田*", ["REF-JP"]),
        ("=やまだ*", []),  # Phonetic, asked for as Ideographic
        # Latin as before: the Alphabetic group, case-insensitive, with wildcards.
        ("yamada*", ["REF-JP"]),
        ("SMITH^ANNE", ["REF-LATIN"]),
        ("sm?th*", ["REF-LATIN"]),
        ("smith", []),
        ("*", ["REF-JP", "REF-KR", "REF-LATIN", "REF-NONE"]),
    ],
)
def test_a_referring_physician_is_found_by_any_component_group(
    referred: AppState, name: str, found: list[str]
) -> None:
    """ReferringPhysicianName is matched as PatientName is (PS3.4 C.2.2.2 makes no difference
    between PN keys): before, its Alphabetic group alone, so 山田* found nothing."""
    with Session(referred.engine) as s:
        query = Query(level="study", filters={"ReferringPhysicianName": name}, limit=100)
        matches = service.search(session=s, query=query).matches
    assert sorted(m[PID]["Value"][0] for m in matches) == found
    for m in matches:
        if m[PID]["Value"][0] == "REF-JP":
            assert m["00080090"]["Value"] == [
                {"Alphabetic": "Yamada^Tarou", "Ideographic": "山田^太郎", "Phonetic": "やまだ^たろう"}
            ]


def test_the_migration_fills_the_referring_physicians_groups(backend: Backend, tmp_path: Path) -> None:
    """Studies stored before ReferringPhysicianName's groups had columns are filled from their
    stored study JSON, and then found by any group as new ones are."""
    engine = make_engine(backend.database_url)
    try:
        migrated_back_to(engine, "0012_pn_groups")
        t = "2026-01-01T00:00:00+00:00"
        referrers = {
            "JP": '{"vr": "PN", "Value": [{"Alphabetic": "Yamada^Tarou", "Ideographic": "山田^太郎",'
            ' "Phonetic": "やまだ^たろう"}]}',
            "DE": '{"vr": "PN", "Value": [{"Alphabetic": "Müller^Hans"}]}',
        }
        with engine.begin() as conn:
            insert_row(conn, "facility", id="local", name="L", issuer="LOCAL", created_at=t)
            for pk, (pid, pn) in enumerate(referrers.items(), start=1):
                insert_row(
                    conn, "patient", pk=pk, facility_id="local", issuer="LOCAL", patient_id=pid,
                    patient_name="Doe^John", name_norm="doe^john", name_fuzzy="doe^john", birth_date="",
                    sex="", updated_at=t,
                )  # fmt: skip
                # The patient's name has groups too: the referrer's are read from their own tag.
                study_json = (
                    '{"00080090": ' + pn + ', "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Doe^John",'
                    ' "Ideographic": "道^譲"}]}, "00100020": {"vr": "LO", "Value": ["' + pid + '"]}}'
                )
                referring = "yamada^tarou" if pid == "JP" else "müller^hans"
                insert_row(
                    conn, "study", pk=pk, study_uid=f"1.7.{pk}", facility_id="local", patient_pk=pk,
                    patient_id=pid, issuer="LOCAL", issuer_in_data="", patient_name="Doe^John",
                    name_norm="doe^john", name_fuzzy="doe^john", birth_date="", sex="", study_date="",
                    study_time="", accession_number="", study_id="", study_description="",
                    referring_physician=referring, modalities="\\", num_series=0, num_instances=0,
                    study_json=study_json, updated_at=t,
                )  # fmt: skip
        migrate(engine)
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT referring_physician, referring_physician_ideographic,"
                    " referring_physician_phonetic FROM study ORDER BY pk"
                )
            ).all()
        assert [tuple(r) for r in rows] == [
            ("yamada^tarou", "山田^太郎", "やまだ^たろう"),
            ("müller^hans", "", ""),
        ]
    finally:
        engine.dispose()
    settings = Settings(
        data_dir=tmp_path / "data", database_url=backend.database_url, storage_url=backend.storage_url
    )
    st = build_state(settings)
    try:
        with Session(st.engine) as s:
            for name, found in (("山田*", ["JP"]), ("müller*", ["DE"]), ("道*", [])):
                query = Query(level="study", filters={"ReferringPhysicianName": name})
                matches = service.search(session=s, query=query).matches
                assert [m[PID]["Value"][0] for m in matches] == found, name
    finally:
        st.engine.dispose()
