"""StudyID and the institution attributes as the destination is configured, read back from a real
PACS (Orthanc), each changed value kept in OriginalAttributesSequence like every other coercion."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session

from broker.app import create_app
from broker.deps import AppState
from broker.imports import service
from broker.imports.models import ImportDestination
from broker.settings import Settings
from tests.imports.conftest import (
    MINE,
    Outside,
    add_destination,
    ingest_outside,
    pacs_clear,
    pacs_instances,
    register_local_patient,
)
from tests.peers import OrthancPeer
from tests.support import auth_headers


@pytest.fixture
def outside(state: AppState, pacs: OrthancPeer, tmp_path: Path) -> Outside:
    pacs_clear(pacs)
    add_destination(state, pacs)
    study = ingest_outside(state, tmp_path)  # StudyID S-OUT-1, InstitutionName/Address set, no department
    register_local_patient(state)
    return study


@pytest.fixture
def client(settings: Settings, state: AppState) -> Iterator[TestClient]:
    with TestClient(create_app(settings=settings, state=state)) as c:
        yield c


def _import(client: TestClient, state: AppState, study: Outside, **extra: str) -> dict[str, object]:
    rsp = client.post(
        "/api/imports",
        json={"study_uid": study.study_uid, "facility": MINE, **extra},
        headers=auth_headers("radiologist"),
    )
    assert rsp.status_code == 202, rsp.text
    final = service.run_now(engine=state.engine, store=state.store, import_id=rsp.json()["id"])
    assert final.status == "done", final.message
    return rsp.json()


@pytest.mark.parametrize("via", ["dimse", "dicomweb"])
def test_study_id_and_institution_as_configured(
    state: AppState, pacs: OrthancPeer, outside: Outside, client: TestClient, via: str
) -> None:
    admin = auth_headers("admin")
    config = {
        "study_id_policy": "from-accession",
        "institution": {"InstitutionName": "My Hospital", "InstitutionalDepartmentName": "Radiology",
                        "InstitutionAddress": None},
    }  # fmt: skip
    rsp = client.put(f"/api/imports/destinations/{MINE}", json=config, headers=admin)
    assert rsp.status_code == 200, rsp.text
    got = client.get(f"/api/imports/destinations/{MINE}", headers=auth_headers("radiologist")).json()
    assert got["study_id_policy"] == "from-accession"
    assert got["institution"] == {
        "InstitutionName": "My Hospital",
        "InstitutionalDepartmentName": "Radiology",
    }
    created = _import(client, state, outside, accession_policy="new", via=via)
    accession = created["plan"]["accession"]  # type: ignore[index]
    held = pacs_instances(pacs)
    assert len(held) == 5
    for ds in held:
        assert ds.AccessionNumber == accession and ds.StudyID == accession  # SH: 16 characters
        assert ds.InstitutionName == "My Hospital"
        assert ds.InstitutionalDepartmentName == "Radiology"
        if ds.Modality == "CT":  # the SR had none: nothing to keep, nothing invented
            assert ds.InstitutionAddress == "1 Far Road"  # kept as it came
        before = ds.OriginalAttributesSequence[-1].ModifiedAttributesSequence[0]
        assert before.AccessionNumber == "OUT-77"
        assert ds.OriginalAttributesSequence[-1].ReasonForTheAttributeModification == "COERCE"
        if ds.Modality == "CT":
            assert (before.StudyID, before.InstitutionName) == ("S-OUT-1", "Outside General")
            assert "InstitutionAddress" not in before  # unchanged: not an original value
        assert before.InstitutionalDepartmentName == ""  # it was absent


def test_study_id_empty_and_the_dry_run_shows_it(
    state: AppState, pacs: OrthancPeer, outside: Outside, client: TestClient
) -> None:
    admin = auth_headers("admin")
    body = {"study_id_policy": "empty", "institution": {"InstitutionName": ""}}
    assert client.put(f"/api/imports/destinations/{MINE}", json=body, headers=admin).status_code == 200
    rsp = client.post(
        "/api/imports",
        json={"study_uid": outside.study_uid, "facility": MINE, "dry_run": True},
        headers=auth_headers("radiologist"),
    )
    ct = next(i for i in rsp.json()["instances"] if i["sop_uid"] == outside.ct_uids[0])
    changes = {c["attribute"]: (c["before"], c["after"]) for c in ct["changes"]}
    assert changes["StudyID"] == ("S-OUT-1", "")
    assert changes["InstitutionName"] == ("Outside General", "")
    assert "AccessionNumber" not in changes  # policy keep
    _import(client, state, outside)
    cts = [d for d in pacs_instances(pacs) if d.Modality == "CT"]
    assert {(d.StudyID, d.InstitutionName, d.AccessionNumber) for d in cts} == {("", "", "OUT-77")}
    assert {d.OriginalAttributesSequence[-1].ModifiedAttributesSequence[0].StudyID for d in cts} == {
        "S-OUT-1"
    }


def test_default_keeps_study_id_and_institution(
    state: AppState, pacs: OrthancPeer, outside: Outside, client: TestClient
) -> None:
    _import(client, state, outside)
    for ds in pacs_instances(pacs):
        if ds.Modality == "CT":
            assert (ds.StudyID, ds.InstitutionName) == ("S-OUT-1", "Outside General")
            before = ds.OriginalAttributesSequence[-1].ModifiedAttributesSequence[0]
            assert "StudyID" not in before and "InstitutionName" not in before


def test_bad_configuration_is_refused_and_changes_nothing(
    state: AppState, pacs: OrthancPeer, outside: Outside, client: TestClient
) -> None:
    admin = auth_headers("admin")
    url = f"/api/imports/destinations/{MINE}"
    rsp = client.put(url, json={"study_id_policy": "invent"}, headers=admin)
    assert rsp.status_code == 400 and "study_id_policy" in rsp.text
    rsp = client.put(url, json={"institution": {"PatientName": "X"}}, headers=admin)
    assert rsp.status_code == 400 and "PatientName" in rsp.text
    rsp = client.put(url, json={"institution": {"InstitutionName": "x" * 65}}, headers=admin)
    assert rsp.status_code == 400 and "64" in rsp.json()["detail"]
    rsp = client.put("/api/imports/destinations/nowhere", json={}, headers=admin)
    assert rsp.status_code == 404 and "nowhere" in rsp.json()["detail"]
    assert client.put(url, json={}, headers=auth_headers("radiologist")).status_code == 403
    with Session(state.engine) as session:
        assert session.get(ImportDestination, MINE) is None
        assert session.get(ImportDestination, "nowhere") is None


def test_cli_import_config(state: AppState, settings: Settings, pacs: OrthancPeer, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from broker.cli import app

    add_destination(state, pacs)
    env = {
        "SCANONCE_DATABASE_URL": settings.database_url or "",
        "SCANONCE_STORAGE_URL": settings.storage_url or "",
    }
    run = CliRunner().invoke
    base = ["import-config", MINE, "--data-dir", str(tmp_path)]
    out = run(app, [*base, "--study-id", "from-accession", "--institution-name", "My Hospital",
                    "--department", "Radiology"], env=env)  # fmt: skip
    assert out.exit_code == 0, out.output
    out = run(app, [*base, "--keep", "InstitutionalDepartmentName"], env=env)  # the rest stays
    assert out.exit_code == 0, out.output
    with Session(state.engine) as session:
        row = service.destination_config(session=session, facility_id=MINE)
        assert (row.study_id_policy, row.institution) == (
            "from-accession",
            '{"InstitutionName": "My Hospital"}',
        )
    bad = run(app, [*base, "--study-id", "bogus"], env=env)
    assert bad.exit_code != 0 and "StudyID policy must be one of" in bad.output
    with Session(state.engine) as session:
        assert (
            service.destination_config(session=session, facility_id=MINE).study_id_policy == "from-accession"
        )
