"""HTTP accesses recorded as the caller would expect to find them, on SQLite and PostgreSQL+S3:
a STOW-RS store written with its rows, QIDO-RS and WADO-RS with the patient named, refused
sign-ins, no events for health checks and discovery, the FHIR AuditEvent search for auditors,
and 503 (with nothing stored or returned) when the event cannot be written."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydicom.uid import generate_uid
from sqlalchemy import text

from broker.app import create_app
from broker.settings import Settings
from tests.dicomweb.data import multipart_body
from tests.support import auth_headers, make_ds, to_bytes

STUDY = generate_uid()
SERIES = generate_uid()


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as c:
        yield c


def _stow(client: TestClient, *, pid: str = "AUD-1", n: int = 2) -> Any:
    parts = [
        to_bytes(
            make_ds(
                sop=generate_uid(), study=STUDY, series=SERIES, pid=pid, name="AUDIT^PAT", instance_number=i
            )
        )
        for i in range(n)
    ]
    body, ctype = multipart_body(parts)
    headers = auth_headers("facility", subject="node-a") | {
        "Content-Type": ctype,
        "Accept": "application/dicom+json",
    }
    return client.post("/dicom-web/studies", content=body, headers=headers)


def _events(client: TestClient, **params: Any) -> list[dict[str, Any]]:
    r = client.get("/fhir/AuditEvent", params=params, headers=auth_headers("auditor", subject="aud"))
    assert r.status_code == 200, r.text
    bundle = r.json()
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset"
    assert bundle["total"] == len(bundle.get("entry", []))
    return [e["resource"] for e in bundle.get("entry", [])]


def _patient(event: dict[str, Any]) -> dict[str, str] | None:
    for entity in event.get("entity", []):
        if entity.get("role", {}).get("code") == "1":
            return dict(entity["what"]["identifier"])
    return None


def _subtype(event: dict[str, Any]) -> str:
    return str(event["subtype"][0]["code"])


def test_store_query_and_retrieve_are_recorded_with_who_and_which_patient(client: TestClient) -> None:
    assert _stow(client).status_code == 200
    clinician = auth_headers("clinician", subject="dr-who")
    assert (
        client.get("/dicom-web/studies", params={"PatientID": "AUD-1"}, headers=clinician).status_code == 200
    )
    r = client.get(f"/dicom-web/studies/{STUDY}/metadata", headers=clinician)
    assert r.status_code == 200

    events = _events(client, patient="AUD-1")
    kinds = sorted((_subtype(e), e["action"]) for e in events)
    assert kinds == [("query", "E"), ("retrieve", "R"), ("store", "C")]
    by_kind = {_subtype(e): e for e in events}
    store = by_kind["store"]
    # One event per study, written in the ingest's transaction (not also by the middleware).
    assert store["agent"][0]["who"]["display"] == "node-a"
    assert store["agent"][0]["role"] == [{"text": "facility"}]
    assert store["outcomeDesc"] == "2 instance(s) stored"
    assert _patient(store) == {"value": "AUD-1", "system": _patient(by_kind["retrieve"])["system"]}  # type: ignore[index]
    retrieve = by_kind["retrieve"]
    # WADO-RS names only the study: the patient comes from the index.
    assert _patient(retrieve)["value"] == "AUD-1"  # type: ignore[index]
    assert retrieve["agent"][0]["who"]["display"] == "dr-who"
    assert retrieve["agent"][0]["network"]["address"] == "testclient"
    assert retrieve["outcome"] == "0"
    assert any(
        e["what"]["identifier"]["value"] == f"urn:oid:{STUDY}" for e in retrieve["entity"] if "what" in e
    )
    assert by_kind["query"]["source"]["site"] == "dicomweb"
    assert client.get("/api/audit/verify", headers=auth_headers("auditor")).json()["ok"] is True


def test_refused_sign_ins_and_denials_are_recorded(client: TestClient) -> None:
    assert (
        client.get("/dicom-web/studies", headers={"Authorization": "Bearer not-a-token"}).status_code == 401
    )
    assert client.get("/api/priors", params={"facility": "local", "mrn": "AUD-9"}).status_code == 401
    # A facility node may not read the lookup: refused, and recorded as a failed query.
    denied = client.get(
        "/api/priors",
        params={"facility": "local", "mrn": "AUD-9"},
        headers=auth_headers("facility", subject="node-x"),
    )
    assert denied.status_code == 403
    failures = _events(client, subtype="sign-in-failure")
    assert len(failures) == 2
    assert {e["outcome"] for e in failures} == {"4"}
    assert {e["agent"][0]["who"]["display"] for e in failures} == {"unknown"}
    refused = _events(client, agent="node-x")
    assert len(refused) == 1
    assert refused[0]["outcome"] == "4" and _patient(refused[0]) == {"value": "AUD-9", "system": "local"}


def test_health_discovery_and_metadata_leave_no_event(client: TestClient) -> None:
    for path in ("/healthz", "/readyz", "/cds-services", "/fhir/metadata", "/.well-known/jwks.json"):
        assert client.get(path).status_code == 200, path
    assert client.get("/api/facilities", headers=auth_headers("clinician")).status_code == 200
    assert _events(client) == []
    served = client.get("/fhir/metadata").json()["rest"][0]["resource"]
    assert "AuditEvent" in {r["type"] for r in served}


def test_audit_event_search_by_agent_date_action_and_who_may_search(client: TestClient) -> None:
    _stow(client)
    client.get(
        "/dicom-web/studies",
        params={"PatientID": "AUD-1"},
        headers=auth_headers("radiologist", subject="rad-1"),
    )
    today = _events(client)[0]["recorded"][:10]
    assert {_subtype(e) for e in _events(client, agent="rad-1")} == {"query"}
    assert len(_events(client, date=[f"ge{today}", f"le{today}"], action="C")) == 1
    assert _events(client, date="le2000-01-01") == []
    bad = client.get("/fhir/AuditEvent", params={"date": "yesterday"}, headers=auth_headers("auditor"))
    assert bad.status_code == 400 and bad.json()["resourceType"] == "OperationOutcome"
    for role in ("clinician", "radiologist", "facility", "reviewer"):
        assert client.get("/fhir/AuditEvent", headers=auth_headers(role)).status_code == 403
        assert client.get("/api/audit", headers=auth_headers(role)).status_code == 403
    listed = client.get("/api/audit", params={"subtype": "store"}, headers=auth_headers("admin")).json()
    assert [e["patient_id"] for e in listed] == ["AUD-1"]
    # Reading the audit trail is itself recorded.
    assert _events(client, subtype="audit-read")


def test_an_access_that_cannot_be_audited_is_refused_and_stores_nothing(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    _stow(client, pid="AUD-1", n=1)
    caplog.set_level(logging.DEBUG)
    engine = client.app.state.scanonce.engine  # type: ignore[attr-defined]
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE audit_event RENAME TO audit_event_away"))
    try:
        r = client.get("/dicom-web/studies", params={"PatientID": "AUD-1"}, headers=auth_headers("clinician"))
        assert r.status_code == 503
        assert "AUD-1" not in r.text and "AUDIT" not in r.text
        global STUDY
        old, STUDY = STUDY, generate_uid()
        try:
            stored = _stow(client, pid="AUD-2", n=1)
        finally:
            new, STUDY = STUDY, old
        assert stored.status_code >= 500
    finally:
        with engine.begin() as conn:
            conn.execute(text("ALTER TABLE audit_event_away RENAME TO audit_event"))
    # The store whose event could not be written left no rows behind.
    found = client.get("/dicom-web/studies", params={"StudyInstanceUID": new}, headers=auth_headers("admin"))
    assert found.status_code == 204 or found.json() == []
    assert client.get("/api/audit/verify", headers=auth_headers("auditor")).json()["ok"] is True
    # The failures were logged, without the patient data the failed statements carried.
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("scanonce"))
    assert "not recorded" in ours
    for secret in ("AUD-1", "AUD-2", "AUDIT^PAT", new):
        assert secret not in ours


def test_cds_calls_and_identity_links_name_what_their_bodies_name(client: TestClient) -> None:
    hook = {
        "hook": "order-select",
        "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
        "fhirServer": "https://ehr.example/fhir",
        "context": {
            "userId": "Practitioner/1",
            "patientId": "EHR-PAT-7",
            "selections": [],
            "draftOrders": {},
        },
    }
    clinician = auth_headers("clinician", subject="dr-cds")
    client.post("/cds-services/prior-imaging", json=hook, headers=clinician)
    (cds,) = _events(client, agent="dr-cds")
    assert cds["source"]["site"] == "cds" and _subtype(cds) == "query"
    assert _patient(cds) == {"value": "EHR-PAT-7", "system": "https://ehr.example/fhir"}

    reviewer = auth_headers("reviewer", subject="rev-1")
    client.post(
        "/api/identity/link", json={"record_id": 41, "to_record_id": 42, "reason": "same"}, headers=reviewer
    )
    client.post("/api/identity/unlink", json={"record_id": 41, "reason": "not the same"}, headers=reviewer)
    events = _events(client, agent="rev-1")
    assert sorted(_subtype(e) for e in events) == ["link", "unlink"]
    link = next(e for e in events if _subtype(e) == "link")
    assert link["action"] == "U"
    described = " ".join(x.get("description", "") for x in link["entity"])
    assert '"to_record_id": 42' in described or '"to_record_id":42' in described
