"""Indexed values are bounded by their VR's maximum length (PS3.5 Table 6.2-1); the stored object
keeps every value whole."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom import config
from pydicom.uid import ImplicitVRLittleEndian
from sqlalchemy import func, select
from sqlmodel import Session

from broker.app import build_state
from broker.deps import AppState
from broker.dicom.bounds import bound_dataset, bound_text
from broker.index import service
from broker.index.models import Patient, Series, Study
from broker.index.schemas import Query
from broker.security.schemas import Principal, Role
from broker.settings import Settings
from tests.support import make_ds, write

P = Principal(who="test", role=Role.admin, facility="local")
FAMILY = "Z" * 2_500_000
GIVEN = "Y" * 2_500_001
HUGE_NAME = f"{FAMILY}^{GIVEN}"  # 5,000,002 characters
LONG_ACCESSION = "ACC-0123456789-0123456789"  # SH allows 16


@pytest.fixture
def state(settings: Settings) -> Iterator[AppState]:
    st = build_state(settings)
    yield st
    st.engine.dispose()


@pytest.fixture
def huge(state: AppState, tmp_path: Path) -> tuple[AppState, str, bytes]:
    with config.disable_value_validation():
        ds = make_ds(
            sop="1.2.77.1.1", study="1.2.77", series="1.2.77.1", name=HUGE_NAME, accession=LONG_ACCESSION
        )
        ds.SeriesDescription = "D" * 100_000  # LO allows 64
        ds.StudyTime = "101500.123456"
        ds.OtherPatientIDs = "\\".join(f"OID{i}" for i in range(5000))  # LO, VM 1-n
        # Implicit VR: explicit VR's 16-bit lengths cannot carry a 5 MB PN.
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        path = write(tmp_path, "huge.dcm", ds)
    outcomes = service.ingest_files(
        engine=state.engine, store=state.store, principal=P, facility_id="local", paths=[path]
    )
    assert [o.status for o in outcomes] == ["stored"], outcomes
    return state, path, Path(path).read_bytes()


def _studies(state: AppState, **kw: object) -> list[dict]:
    with Session(state.engine) as s:
        return service.search(session=s, query=Query(level="study", **kw)).matches  # type: ignore[arg-type]


def test_a_huge_patient_name_is_indexed_and_answered_at_its_vr_maximum(
    huge: tuple[AppState, str, bytes],
) -> None:
    state, _path, _data = huge
    with Session(state.engine) as s:
        longest = max(
            s.execute(select(func.length(col))).scalar_one()
            for col in (
                Study.patient_name,
                Study.name_norm,
                Study.name_fuzzy,
                Patient.patient_name,
                Patient.name_norm,
                Patient.name_fuzzy,
            )
        )
        assert longest == 64  # PN: 64 characters per component group
        assert s.execute(select(func.length(Study.study_json))).scalar_one() < 4096
        assert s.execute(select(func.length(Series.series_json))).scalar_one() < 4096
    (study,) = _studies(state, filters={"PatientName": "z*"}, includefields="all")
    assert study["00100010"]["Value"] == [{"Alphabetic": "Z" * 64}]
    assert study["00080050"]["Value"] == [LONG_ACCESSION[:16]]
    assert len(study["00101000"]["Value"]) == 256  # OtherPatientIDs: VM capped in the index copy
    with Session(state.engine) as s:
        (series,) = service.search(
            session=s, query=Query(level="series", filters={"SeriesDescription": "", "PatientName": ""})
        ).matches
        (inst,) = service.search(
            session=s, query=Query(level="instance", filters={"PatientName": ""})
        ).matches
    assert series["0008103E"]["Value"] == ["D" * 64]
    assert series["00100010"]["Value"] == study["00100010"]["Value"]
    assert inst["00100010"]["Value"] == study["00100010"]["Value"]


def test_the_whole_value_stays_in_the_stored_object(huge: tuple[AppState, str, bytes]) -> None:
    state, _path, data = huge
    with Session(state.engine) as s:
        (ref,) = service.find_instances(session=s, study_uid="1.2.77")
    stored = b"".join(state.store.get(ref.object_key))
    assert stored == data
    assert str(pydicom.dcmread(io.BytesIO(stored)).PatientName) == HUGE_NAME


@pytest.mark.parametrize(
    "filters",
    [
        {"AccessionNumber": LONG_ACCESSION},  # the whole over-long value still finds it
        {"AccessionNumber": LONG_ACCESSION[:16]},
        {"PatientName": f"{FAMILY[:100]}^{GIVEN[:100]}"},  # an over-long name, cut like the index's
        {"PatientName": "ZZZZ*"},
    ],
    ids=["long-accession", "cut-accession", "long-name", "name-prefix"],
)
def test_matching_cuts_match_values_by_the_same_rule(
    huge: tuple[AppState, str, bytes], filters: dict[str, str]
) -> None:
    state, _path, _data = huge
    assert [m["0020000D"]["Value"][0] for m in _studies(state, filters=filters)] == ["1.2.77"]


def test_bound_text_and_dataset_follow_ps3_5_table_6_2_1() -> None:
    assert bound_text("SH", "x" * 40) == "x" * 16
    assert bound_text("CS", "ABCDEFGHIJKLMNOPQRS") == "ABCDEFGHIJKLMNOP"
    assert bound_text("UI", "1." * 50) == ("1." * 50)[:64]
    assert bound_text("PN", "a" * 70 + "=" + "b" * 70 + "=" + "c" * 3) == "a" * 64 + "=" + "b" * 64 + "=ccc"
    assert bound_text("UN", "z" * 10_000) == "z" * 10_000  # no text VR, no bound
    attrs: dict[str, Any] = {
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": "a" * 100, "Ideographic": "b" * 100}]},
        "00081032": {"vr": "SQ", "Value": [{"00080104": {"vr": "LO", "Value": ["m" * 99]}}] * 100},
        "00280010": {"vr": "US", "Value": [512]},
    }
    out = bound_dataset(attrs)
    assert out["00100010"]["Value"] == [{"Alphabetic": "a" * 64, "Ideographic": "b" * 64}]
    assert len(out["00081032"]["Value"]) == 64
    assert out["00081032"]["Value"][0]["00080104"]["Value"] == ["m" * 64]
    assert out["00280010"] is attrs["00280010"]
    assert attrs["00100010"]["Value"][0]["Alphabetic"] == "a" * 100  # the input is not changed
