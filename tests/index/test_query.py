"""The one query engine: PS3.4 C.2.2.2 matching as a clinician or a PACS would notice it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlmodel import Session

from broker.app import build_state
from broker.deps import AppState
from broker.errors import BadRequest
from broker.facilities import service as facilities
from broker.index import service
from broker.index.schemas import Query
from broker.security.schemas import Principal, Role
from broker.settings import Settings
from tests.support import ADMIN, make_ds, write

P = Principal(who="test", role=Role.admin, facility="local")

STUDIES = [
    # study uid, name, pid, date, time, accession, modalities, facility
    ("1.9.1", "Müller^Zoë", "M1", "20200115", "083000", "ACC1", ["CT", "SR"], "local"),
    ("1.9.2", "MULLER^ZOE", "M2", "20210620", "141500.000", "ACC2", ["MR"], "local"),
    ("1.9.3", "Doe^John", "D1", "20230301", "230000", "ACC3", ["CTX"], "local"),
    ("1.9.4", "Doe^Jane", "D2", "20240412", "090000", "ACC4", ["CR"], "other"),
    ("1.9.5", "Smith^Anna", "S1", "20241231", "000001", "ACC5", ["US"], "other"),
]


@pytest.fixture
def state(settings: Settings, tmp_path: Path) -> Iterator[AppState]:
    st = build_state(settings)
    with Session(st.engine) as s:
        facilities.add_facility(session=s, principal=ADMIN, facility_id="other", issuer="OTHER")
    for uid, name, pid, date, time, acc, mods, facility in STUDIES:
        paths = []
        for n, mod in enumerate(mods, start=1):
            paths.append(
                write(
                    tmp_path,
                    f"{uid}-{n}.dcm",
                    make_ds(
                        sop=f"{uid}.{n}.1",
                        study=uid,
                        series=f"{uid}.{n}",
                        name=name,
                        pid=pid,
                        date=date,
                        time=time,
                        accession=acc,
                        modality=mod,
                        instance_number=n,
                    ),
                )
            )
        outcomes = service.ingest_files(
            engine=st.engine, store=st.store, principal=P, facility_id=facility, paths=paths
        )
        assert all(o.status == "stored" for o in outcomes)
    yield st
    st.engine.dispose()


def _uids(state: AppState, **kw: object) -> list[str]:
    with Session(state.engine) as s:
        result = service.search(session=s, query=Query(level="study", **kw))  # type: ignore[arg-type]
    return [m["0020000D"]["Value"][0] for m in result.matches]


def test_patient_name_is_case_insensitive_with_wildcards(state: AppState) -> None:
    assert _uids(state, filters={"PatientName": "doe*"}) == ["1.9.3", "1.9.4"]
    assert _uids(state, filters={"PatientName": "DOE^J?HN"}) == ["1.9.3"]
    assert _uids(state, filters={"PatientName": "doe^john"}) == ["1.9.3"]
    assert _uids(state, filters={"PatientName": "müller^zoë"}) == ["1.9.1"]


def test_fuzzy_matching_ignores_accents_per_name_component(state: AppState) -> None:
    assert _uids(state, filters={"PatientName": "muller"}) == []
    assert _uids(state, filters={"PatientName": "muller"}, fuzzy=True) == ["1.9.1", "1.9.2"]
    assert _uids(state, filters={"PatientName": "zoe"}, fuzzy=True) == ["1.9.1", "1.9.2"]
    assert _uids(state, filters={"PatientName": "Mül*"}, fuzzy=True) == ["1.9.1", "1.9.2"]


def test_date_and_time_ranges(state: AppState) -> None:
    assert _uids(state, filters={"StudyDate": "20210101-20231231"}) == ["1.9.2", "1.9.3"]
    assert _uids(state, filters={"StudyDate": "20240101-"}) == ["1.9.4", "1.9.5"]
    assert _uids(state, filters={"StudyDate": "-20200115"}) == ["1.9.1"]
    assert _uids(state, filters={"StudyDate": "20230301"}) == ["1.9.3"]
    assert _uids(state, filters={"StudyTime": "0800-0930"}) == ["1.9.1", "1.9.4"]
    assert _uids(state, filters={"StudyTime": "2300-"}) == ["1.9.3"]


def test_a_single_time_finds_the_instants_it_names_however_the_object_wrote_them(state: AppState) -> None:
    # 1.9.2 wrote 141500.000, 1.9.3 230000: a time matches at the precision it is given.
    for value in ("141500", "1415", "14", "141500.000000", "14:15:00", "141500.0"):
        assert _uids(state, filters={"StudyTime": value}) == ["1.9.2"], value
    assert _uids(state, filters={"StudyTime": "141500.5"}) == []
    assert _uids(state, filters={"StudyTime": "141501"}) == []
    assert _uids(state, filters={"StudyTime": "230000.000"}) == ["1.9.3"]
    assert _uids(state, filters={"StudyTime": "141500.000-141500.000"}) == ["1.9.2"]


def test_uid_lists_and_exact_keys(state: AppState) -> None:
    assert _uids(state, filters={"StudyInstanceUID": "1.9.5,1.9.2"}) == ["1.9.2", "1.9.5"]
    assert _uids(state, filters={"StudyInstanceUID": "1.9.5\\1.9.1"}) == ["1.9.1", "1.9.5"]
    assert _uids(state, filters={"AccessionNumber": "ACC4"}) == ["1.9.4"]
    assert _uids(state, filters={"PatientID": "M*"}) == ["1.9.1", "1.9.2"]
    assert _uids(state, filters={"PatientID": "m1"}) == []  # case-sensitive outside PN


def test_modalities_in_study_matches_whole_codes(state: AppState) -> None:
    assert _uids(state, filters={"ModalitiesInStudy": "CT"}) == ["1.9.1"]
    assert _uids(state, filters={"ModalitiesInStudy": "SR"}) == ["1.9.1"]
    assert _uids(state, filters={"ModalitiesInStudy": "MR,US"}) == ["1.9.2", "1.9.5"]
    with Session(state.engine) as s:
        (m,) = service.search(
            session=s, query=Query(level="study", filters={"StudyInstanceUID": "1.9.1"})
        ).matches
    assert m["00080061"]["Value"] == ["CT", "SR"]
    assert m["00201206"]["Value"] == [2] and m["00201208"]["Value"] == [2]


def test_universal_matching_returns_the_attribute(state: AppState) -> None:
    with Session(state.engine) as s:
        result = service.search(
            session=s, query=Query(level="study", filters={"StudyDescription": "", "00080090": ""}, limit=1)
        )
    assert "00081030" in result.matches[0] and "00080090" in result.matches[0]


def test_includefield_by_keyword_tag_and_all(state: AppState) -> None:
    with Session(state.engine) as s:
        plain = service.search(session=s, query=Query(level="study", limit=1)).matches[0]
        extra = service.search(
            session=s,
            query=Query(level="study", limit=1, includefields=frozenset({"00100030", "PatientSex"})),
        ).matches[0]
        every = service.search(session=s, query=Query(level="study", limit=1, includefields="all")).matches[0]
    assert "00101010" not in plain  # PatientAge is not a default return attribute
    assert extra["00100030"]["Value"] == ["19800101"] and extra["00100040"]["Value"] == ["M"]
    assert set(plain) <= set(every) | {"00080201"}


def test_paging_is_stable_and_reports_more(state: AppState) -> None:
    with Session(state.engine) as s:
        pages = [service.search(session=s, query=Query(level="study", limit=2, offset=o)) for o in (0, 2, 4)]
    assert [p.more for p in pages] == [True, True, False]
    uids = [m["0020000D"]["Value"][0] for p in pages for m in p.matches]
    assert uids == [s[0] for s in STUDIES]


def test_facility_partition(state: AppState) -> None:
    assert _uids(state, facility_id="other") == ["1.9.4", "1.9.5"]
    assert _uids(state, facility_id="local", filters={"PatientName": "doe*"}) == ["1.9.3"]


def test_series_and_instance_levels_and_relational_paths(state: AppState) -> None:
    with Session(state.engine) as s:
        series = service.search(session=s, query=Query(level="series", study_uid="1.9.1")).matches
        assert [m["00080060"]["Value"][0] for m in series] == ["CT", "SR"]
        assert series[0]["00201209"]["Value"] == [1]
        mr = service.search(session=s, query=Query(level="series", filters={"Modality": "MR"})).matches
        assert [m["0020000D"]["Value"][0] for m in mr] == ["1.9.2"]
        insts = service.search(
            session=s, query=Query(level="instance", study_uid="1.9.1", retrieve_base="http://h/dw")
        ).matches
        assert [m["00080018"]["Value"][0] for m in insts] == ["1.9.1.1.1", "1.9.1.2.1"]
        assert insts[0]["00081190"]["Value"] == [
            "http://h/dw/studies/1.9.1/series/1.9.1.1/instances/1.9.1.1.1"
        ]
        assert all("7FE00010" not in m for m in insts)
        patients = service.search(
            session=s, query=Query(level="patient", filters={"PatientID": "D*"})
        ).matches
        assert sorted(m["00100020"]["Value"][0] for m in patients) == ["D1", "D2"]


@pytest.mark.parametrize(
    ("filters", "message"),
    [
        ({"StudyDate": "2024-01-01"}, "StudyDate"),
        ({"StudyDate": "20241340"}, "valid date"),
        ({"StudyDate": "-"}, "empty range"),
        ({"NotAKeyword": "x"}, "unknown attribute"),
        ({"StudyInstanceUID": "../../etc/passwd"}, "not a valid UID"),
        ({"SeriesNumber": "one"}, "not an integer"),
    ],
)
def test_bad_values_get_a_clear_error(state: AppState, filters: dict[str, str], message: str) -> None:
    level = "series" if "SeriesNumber" in filters else "study"
    with Session(state.engine) as s, pytest.raises(BadRequest, match=message):
        service.search(session=s, query=Query(level=level, filters=filters))  # type: ignore[arg-type]


def test_unsupported_keys_are_ignored_with_a_warning(state: AppState) -> None:
    with Session(state.engine) as s:
        result = service.search(session=s, query=Query(level="study", filters={"PatientWeight": "70"}))
    assert len(result.matches) == len(STUDIES)
    assert "PatientWeight" in result.warnings[0]


@pytest.mark.parametrize(
    ("filters", "index"),
    [
        ({"PatientID": "M1"}, "ix_study_patient_id"),
        ({"AccessionNumber": "ACC1"}, "ix_study_accession"),
        ({"StudyInstanceUID": "1.9.1"}, "study_uid"),
        ({"PatientName": "doe*"}, "ix_study_name_norm"),
    ],
)
def test_indexed_matches_never_scan_the_archive(
    state: AppState, backend: object, filters: dict[str, str], index: str
) -> None:
    """Query cost must not grow with the archive: an index can serve each indexed match.

    On PostgreSQL sequential scans are priced out first, since on a five-row table the
    planner would rightly prefer one; what matters is that an index exists that can serve."""
    from sqlalchemy.dialects import postgresql, sqlite

    from broker.index import query as q

    conds, _asked, _ignored = q._filters(Query(level="study", filters=filters))
    stmt = q.select(q._study).where(*conds).limit(101)
    is_pg = state.engine.dialect.name == "postgresql"
    dialect = postgresql.dialect() if is_pg else sqlite.dialect()
    sql = str(stmt.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))
    with state.engine.connect() as conn:
        if is_pg:
            conn.execute(text("SET enable_seqscan = off"))
            plan = " ".join(str(r[0]) for r in conn.execute(text("EXPLAIN " + sql)))
            assert "Index" in plan and "Seq Scan" not in plan, plan
            assert index.split("_")[-1] in plan or index in plan, plan
        else:
            plan = " ".join(str(r[-1]) for r in conn.execute(text("EXPLAIN QUERY PLAN " + sql)))
            assert "USING INDEX" in plan or "USING COVERING INDEX" in plan, plan
            assert index in plan, plan
