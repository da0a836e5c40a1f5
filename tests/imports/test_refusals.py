"""A destination PACS that refuses some instances: Orthanc with its own Lua script (in its
temporary config) whose `ReceivedInstanceFilter` raises an error for the SR, so C-STORE answers it
with a real DIMSE failure status (0xA700), and returns false for the third CT slice, which Orthanc
1.10.1 drops while answering Success. The import reports each on its own instance (the silent drop
caught by asking the PACS afterwards), delivers the rest, shows the failures on the radiologist's
import list, and changes nothing stored in the broker."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session

from broker.app import create_app
from broker.deps import AppState
from broker.imports import service
from broker.index import service as index
from broker.jobs import service as jobs
from broker.settings import Settings
from tests.imports.conftest import (
    BASIC_TEXT_SR,
    BROKER_AE,
    LOCAL_MRN,
    MINE,
    Outside,
    add_destination,
    ingest_outside,
    pacs_clear,
    pacs_instances,
    register_local_patient,
)
from tests.peers import OrthancPeer, orthanc
from tests.support import ADMIN, auth_headers

# Orthanc 1.10.1 asks ReceivedInstanceFilter about every instance it receives, by any route. Raising
# an error there makes it refuse the instance: C-STORE answers 0xA700 (Refused: Out of Resources).
# Returning false drops the instance yet C-STORE still answers Success: a silent loss that only
# asking the PACS afterwards (the import's verification) reveals.
REFUSED_STATUS = 0xA700
REFUSE = f"""
function ReceivedInstanceFilter(dicom, origin, info)
  if dicom.SOPClassUID == '{BASIC_TEXT_SR}' then
    error('this PACS takes no structured reports')
  end
  if dicom.InstanceNumber == '3' then
    return false
  end
  return true
end
"""


@pytest.fixture(scope="module")
def picky(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancPeer]:
    base = tmp_path_factory.mktemp("picky")
    script = base / "refuse.lua"
    script.write_text(REFUSE)
    with orthanc(
        base, aet="MYPACS", modalities={"scanonce": [BROKER_AE, "127.0.0.1", 104]},
        extra={"LuaScripts": [str(script)]},
    ) as peer:  # fmt: skip
        yield peer


def _stored(state: AppState, study_uid: str) -> dict[str, bytes]:
    with Session(state.engine) as session:
        refs = index.find_instances(session=session, study_uid=study_uid)
    return {r.sop_uid: b"".join(state.store.get(r.object_key)) for r in refs}


@pytest.mark.parametrize("via", ["dimse", "dicomweb"])
def test_refused_instances_are_reported_one_by_one(
    state: AppState, settings: Settings, picky: OrthancPeer, tmp_path: Path, via: str
) -> None:
    pacs_clear(picky)
    add_destination(state, picky)
    outside: Outside = ingest_outside(state, tmp_path)
    register_local_patient(state)
    before = _stored(state, outside.study_uid)
    refused = {outside.sr_uid, outside.ct_uids[2]}  # the SR (error) and InstanceNumber 3 (dropped)

    row = service.start_import(
        engine=state.engine, principal=ADMIN, study_uid=outside.study_uid, facility_id=MINE, via=via
    )
    final = service.run_now(engine=state.engine, store=state.store, import_id=row.id or 0)

    with Session(state.engine) as session:
        rows = {r.source_sop_uid: r for r in service.instances_of(session=session, import_id=row.id or 0)}
    outcomes = {(sop in refused, r.status, r.code, r.detail) for sop, r in rows.items()}
    assert (final.status, final.sent, final.failed, final.verified) == ("failed", 3, 2, 3), outcomes
    assert final.message == (
        "3 of 5 instances delivered, 3 found at the destination; 2 not accepted by facility 'mine' "
        "(see each instance)"
    )
    for sop, r in rows.items():
        assert r.attempts == 1  # a refusal is an answer, not retried
        if sop not in refused:
            assert (r.status, r.code, r.detail) == ("sent", 0, "")
    sr, dropped = rows[outside.sr_uid], rows[outside.ct_uids[2]]
    if via == "dimse":
        assert (sr.status, sr.code) == ("failed", REFUSED_STATUS)  # the PACS's own DIMSE status
        assert sr.detail == "refused by the archive: status 0xA700 (Refused: Out of Resources)"
    else:
        # Orthanc's DICOMweb plugin leaves a refused instance out of its answer altogether.
        assert (sr.status, sr.code, sr.detail) == ("failed", 200, "not acknowledged (HTTP 200)")
    # Acknowledged, then absent: found out by asking the PACS what it holds.
    assert dropped.status == "failed"
    assert dropped.detail in (
        "acknowledged but not found at the destination afterwards",
        "not acknowledged (HTTP 200)",
    ), dropped.detail
    if via == "dimse":
        assert dropped.code == 0  # what the PACS answered: Success
    # The PACS holds exactly the accepted ones, coerced; the refused are absent.
    held = {str(d.SOPInstanceUID): d for d in pacs_instances(picky)}
    assert set(held) == set(outside.files) - refused
    assert {d.PatientID for d in held.values()} == {LOCAL_MRN}
    # The radiologist's import list names each instance not delivered, with the archive's answer.
    with TestClient(create_app(settings=settings, state=state)) as client:
        page = client.get("/imports", headers=auth_headers("radiologist"))
    assert page.status_code == 200
    failures = page.text[page.text.index('class="failures"') :]
    assert "2 instances not delivered" in failures
    assert outside.sr_uid in failures and outside.ct_uids[2] in failures
    assert sr.detail in failures and outside.ct_uids[0] not in failures
    # Nothing stored in the broker changed: the same objects, byte for byte, under the outside ID.
    assert _stored(state, outside.study_uid) == before
    for data in before.values():
        assert pydicom.dcmread(__import__("io").BytesIO(data), stop_before_pixels=True).PatientID == "P1"


# A PACS that goes away when asked what it holds of a study it was just sent: its verification
# query (QIDO-RS, per series or per instance) ends the Orthanc process on the spot, so the
# connection drops as an unreachable archive's would. Planning's study-level query is answered.
GO_AWAY = """
function IncomingHttpRequestFilter(method, uri, ip, username, httpHeaders)
  if method == 'GET' and string.find(uri, '^/dicom%-web/studies/[^/]+/') then
    os.exit(1)
  end
  return true
end
"""


@pytest.fixture
def vanishing(tmp_path: Path) -> Iterator[OrthancPeer]:
    script = tmp_path / "go-away.lua"
    script.write_text(GO_AWAY)
    with orthanc(tmp_path / "vanishing", aet="MYPACS", extra={"LuaScripts": [str(script)]}) as peer:
        yield peer


def test_destination_gone_when_verifying_keeps_each_outcome_and_fails_clearly(
    state: AppState, vanishing: OrthancPeer, tmp_path: Path
) -> None:
    add_destination(state, vanishing)
    outside = ingest_outside(state, tmp_path)
    register_local_patient(state)
    # Run at once (planning found the study absent): the PACS is first asked after the sends.
    row, claimed = service.start_claimed(
        engine=state.engine, principal=ADMIN, study_uid=outside.study_uid, facility_id=MINE, via="dicomweb"
    )
    final = service.run_claimed(engine=state.engine, store=state.store, import_id=row.id or 0, job=claimed)
    assert vanishing.process.wait(timeout=30) is not None  # it did go away
    with Session(state.engine) as session:
        rows = service.instances_of(session=session, import_id=row.id or 0)
        job = jobs.get_job(session=session, job_id=row.job_id or 0)
    # Every instance's outcome, answered before the PACS went away, is recorded.
    assert {r.source_sop_uid: (r.status, r.attempts) for r in rows} == {
        sop: ("sent", 1) for sop in outside.files
    }
    assert (final.status, final.sent, final.failed, final.verified) == ("failed", 5, 0, None), final.message
    assert "5 of 5 instances delivered" in final.message
    assert "could not be asked" in final.message and "not verified" in final.message
    assert final.finished_at is not None
    assert (job.status, job.error) == ("failed", final.message)
