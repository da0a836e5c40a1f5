"""Consent and break-the-glass on every interface that crosses facilities, on the demo data over
HTTP and DIMSE (dcmtk), SQLite and PostgreSQL.

The demo's ten-year-old has a CT at the children's hospital ("kids", MRN K346295) and one at
St Mary's ("stmarys", MRN M55078256), linked to one person. A clinician at St Mary's looks the
child up; the child opts out at the children's hospital: the opt-out follows the person, so St
Mary's stops seeing the children's hospital's study on every interface, the children's hospital
stops seeing St Mary's, and each still sees its own.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.consent import Consent as FhirConsent
from sqlalchemy import update
from sqlmodel import Session

from broker.audit import service as audit_service
from broker.consent import service as consent_service
from broker.consent.models import BreakGlass
from broker.dimse.scp import ScpHandle, start_scp, stop_scp
from broker.facilities import service as facilities
from tests.dicomweb.conftest import LiveServer
from tests.live_demo import ADULT_MRN, BACKENDS, CHILD_ISSUER, CHILD_MRN, CHILD_ST_MARYS_MRN, demo_server
from tests.peers import dcmtk, storescp
from tests.support import ADMIN, auth_headers

KIDS, STMARYS = "kids", "stmarys"
PACS_AE = "STMARYS_PACS"  # St Mary's PACS calling the broker
EXAM = "CT abdomen pelvis"
HL7 = "http://terminology.hl7.org/CodeSystem"


@pytest.fixture(scope="module", params=BACKENDS)
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with demo_server(request, tmp_path_factory.mktemp("consent")) as s:
        yield s


@pytest.fixture(scope="module")
def scp(server: LiveServer) -> Iterator[ScpHandle]:
    """The broker's DIMSE SCP on the same state, with St Mary's PACS registered as its caller."""
    state = server.app.state.scanonce  # type: ignore[attr-defined]
    with Session(state.engine) as session:
        facilities.update_facility(
            session=session, principal=ADMIN, facility_id=STMARYS, calling_ae_titles=[PACS_AE]
        )
    handle = start_scp(state=state, port=0)
    try:
        yield handle
    finally:
        stop_scp(handle)


def _engine(server: LiveServer) -> Any:
    return server.app.state.scanonce.engine  # type: ignore[attr-defined]


def _client(server: LiveServer, role: str, facility: str, **kw: Any) -> httpx.Client:
    return httpx.Client(
        base_url=server.origin,
        timeout=30,
        trust_env=False,
        headers=auth_headers(role, facility=facility, **{"subject": f"{role}-{facility}", **kw}),
    )


@pytest.fixture(scope="module")
def admin(server: LiveServer) -> Iterator[httpx.Client]:
    with _client(server, "admin", "local") as c:
        yield c


@pytest.fixture(scope="module")
def stmarys(server: LiveServer) -> Iterator[httpx.Client]:
    """A clinician at St Mary's (purpose of use: treatment)."""
    with _client(server, "clinician", STMARYS) as c:
        yield c


@pytest.fixture(scope="module")
def kids(server: LiveServer) -> Iterator[httpx.Client]:
    """A clinician at the children's hospital."""
    with _client(server, "clinician", KIDS) as c:
        yield c


@pytest.fixture(scope="module")
def studies(admin: httpx.Client) -> dict[str, set[str]]:
    """The child's study UIDs at each facility (as the administrator sees them)."""
    out: dict[str, set[str]] = {}
    for facility, mrn in ((KIDS, CHILD_MRN), (STMARYS, CHILD_ST_MARYS_MRN)):
        r = admin.get(f"/facilities/{facility}/dicom-web/studies", params={"PatientID": mrn})
        assert r.status_code == 200, r.text
        out[facility] = {m["0020000D"]["Value"][0] for m in r.json()}
        assert out[facility]
    return out


@contextlib.contextmanager
def opted_out(kids: httpx.Client, *, scope: str | None = None) -> Iterator[dict[str, Any]]:
    """The child opts out at the children's hospital (recorded there by its clinician); withdrawn
    afterwards so the module's other tests start from the default."""
    body: dict[str, Any] = {"facility": KIDS, "patient_id": CHILD_MRN, "decision": "deny"}
    if scope:
        body["scope"] = scope
    r = kids.post("/api/consent", json=body)
    assert r.status_code == 201, r.text
    try:
        yield r.json()
    finally:
        assert kids.delete(f"/api/consent/{r.json()['id']}").status_code == 204


def _qido(client: httpx.Client, **params: str) -> set[str]:
    r = client.get("/dicom-web/studies", params={"limit": "1000", **params})
    assert r.status_code in (200, 204), r.text
    return {m["0020000D"]["Value"][0] for m in r.json()} if r.status_code == 200 else set()


def _priors(client: httpx.Client, facility: str, mrn: str) -> dict[str, Any]:
    r = client.get("/api/priors", params={"facility": facility, "mrn": mrn, "exam": EXAM})
    assert r.status_code == 200, r.text
    return r.json()


def _person(admin: httpx.Client) -> str:
    r = admin.get("/fhir/Patient", params={"identifier": f"urn:scanonce:issuer:{CHILD_ISSUER}|{CHILD_MRN}"})
    return str(r.json()["entry"][0]["resource"]["id"])


def _fhir_studies(client: httpx.Client, person: str) -> set[str]:
    r = client.get("/fhir/ImagingStudy", params={"patient": f"Patient/{person}"})
    assert r.status_code == 200, r.text
    bundle = Bundle.model_validate(r.json())
    return {
        str(e.resource.identifier[0].value).removeprefix("urn:oid:")  # type: ignore[union-attr]
        for e in bundle.entry or []
    }


def _cds(client: httpx.Client, mrn: str, system: str) -> str:
    body = {
        "hook": "order-select",
        "hookInstance": str(uuid.uuid4()),
        "context": {
            "userId": "Practitioner/example",
            "patientId": "ehr-1",
            "selections": ["ServiceRequest/sr1"],
            "draftOrders": {
                "resourceType": "Bundle",
                "type": "collection",
                "entry": [
                    {
                        "resource": {
                            "resourceType": "ServiceRequest",
                            "id": "sr1",
                            "status": "draft",
                            "intent": "order",
                            "subject": {"reference": "Patient/ehr-1"},
                            "code": {"text": "CT ABD/PEL W CONTRAST"},
                        }
                    }
                ],
            },
        },
        "prefetch": {
            "patient": {
                "resourceType": "Patient",
                "id": "ehr-1",
                "identifier": [{"system": f"urn:scanonce:issuer:{system}", "value": mrn}],
            }
        },
    }
    r = client.post("/cds-services/scanonce-prior-imaging", json=body)
    assert r.status_code == 200, r.text
    return r.text


def _cfind(scp: ScpHandle, out: Path, patient_id: str) -> set[str]:
    out.mkdir(parents=True, exist_ok=True)
    dcmtk(
        "findscu", "-aet", PACS_AE, "-aec", scp.state.settings.ae_title, "-S", "-X", "-od", out,
        "-k", "QueryRetrieveLevel=STUDY", "-k", f"PatientID={patient_id}", "-k", "StudyInstanceUID",
        "127.0.0.1", str(scp.port),
    )  # fmt: skip
    return {str(pydicom.dcmread(p).StudyInstanceUID) for p in out.glob("rsp*.dcm")}


def _cmove(scp: ScpHandle, tmp: Path, study: str) -> set[str]:
    with storescp(tmp, aet="SINKAE") as sink:
        scp.peers.add_destination("SINKAE", "127.0.0.1", sink.port)
        dcmtk(
            "movescu", "-aet", PACS_AE, "-aec", scp.state.settings.ae_title, "-aem", "SINKAE", "-S",
            "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}", "127.0.0.1", str(scp.port),
        )  # fmt: skip
        return {str(pydicom.dcmread(p).StudyInstanceUID) for p in sink.files()}


def _cget(scp: ScpHandle, out: Path, study: str) -> set[str]:
    out.mkdir(parents=True, exist_ok=True)
    dcmtk(
        "getscu", "-aet", PACS_AE, "-aec", scp.state.settings.ae_title, "-S", "-od", out,
        "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}", "127.0.0.1", str(scp.port),
    )  # fmt: skip
    return {str(pydicom.dcmread(p).StudyInstanceUID) for p in out.iterdir() if p.is_file()}


# -- one opt-out, every interface ------------------------------------------------------------------


def test_an_opt_out_at_one_facility_is_honoured_on_every_interface(
    server: LiveServer,
    admin: httpx.Client,
    stmarys: httpx.Client,
    kids: httpx.Client,
    studies: dict[str, set[str]],
    scp: ScpHandle,
    tmp_path: Path,
) -> None:
    theirs, ours = studies[KIDS], studies[STMARYS]
    one_of_theirs = sorted(theirs)[0]
    person = _person(admin)

    # Before: St Mary's sees the children's hospital's study everywhere.
    assert theirs <= _qido(stmarys, PatientID=CHILD_MRN)
    assert stmarys.get(f"/dicom-web/studies/{one_of_theirs}/metadata").status_code == 200
    before = _priors(stmarys, STMARYS, CHILD_ST_MARYS_MRN)
    assert theirs <= {p["study_instance_uid"] for p in before["priors"]}
    assert before["withheld_by_consent"] is False
    assert theirs <= _fhir_studies(stmarys, person)
    assert stmarys.get(f"/fhir/ImagingStudy/{one_of_theirs}").status_code == 200
    assert theirs <= _cfind(scp, tmp_path / "find-before", CHILD_MRN)
    assert _cmove(scp, tmp_path / "move-before", one_of_theirs) == {one_of_theirs}
    assert _cget(scp, tmp_path / "get-before", one_of_theirs) == {one_of_theirs}
    cds_before = _cds(stmarys, CHILD_ST_MARYS_MRN, "ST-MARYS")

    with opted_out(kids):
        # QIDO-RS: not listed (broker-wide, and in the facility's own partition).
        assert not theirs & _qido(stmarys, PatientID=CHILD_MRN)
        assert not theirs & _qido(stmarys)
        r = stmarys.get(f"/facilities/{KIDS}/dicom-web/studies", params={"PatientID": CHILD_MRN})
        assert r.status_code == 204
        assert ours <= _qido(stmarys, PatientID=CHILD_ST_MARYS_MRN)  # its own: still there
        # WADO-RS: 404, as for a study that does not exist.
        for suffix in ("", "/metadata", "/rendered", "/thumbnail"):
            assert stmarys.get(f"/dicom-web/studies/{one_of_theirs}{suffix}").status_code == 404, suffix
        # QIDO-RS within the study: no series, as for a study the index does not hold.
        assert stmarys.get(f"/dicom-web/studies/{one_of_theirs}/series").status_code == 204
        # The lookup: the prior is gone; a neutral note says that some records are withheld.
        after = _priors(stmarys, STMARYS, CHILD_ST_MARYS_MRN)
        uids = {p["study_instance_uid"] for p in after["priors"]}
        assert not theirs & uids and ours <= uids
        assert after["withheld_by_consent"] is True
        assert "Some records are withheld by consent." in after["notes"]
        assert KIDS not in str(after) and one_of_theirs not in str(after)
        # Naming the other facility's record directly: as for a patient the broker does not know.
        named = _priors(stmarys, KIDS, CHILD_MRN)
        unknown = _priors(stmarys, KIDS, "NO-SUCH-MRN")
        assert named == unknown and named["patient_found"] is False
        # The page.
        page = stmarys.get("/", params={"facility": STMARYS, "mrn": CHILD_ST_MARYS_MRN, "exam": EXAM})
        assert page.status_code == 200
        assert "Some records are withheld by consent." in page.text
        assert not any(uid in page.text for uid in theirs)
        record = stmarys.get("/record", params={"facility": STMARYS, "mrn": CHILD_ST_MARYS_MRN, "exam": EXAM})
        assert "Some records are withheld by consent." in record.text
        # FHIR ImagingStudy: not found by search, and a read is 404.
        assert not theirs & _fhir_studies(stmarys, person)
        assert stmarys.get(f"/fhir/ImagingStudy/{one_of_theirs}").status_code == 404
        # CDS Hooks: no card names the study.
        cds_after = _cds(stmarys, CHILD_ST_MARYS_MRN, "ST-MARYS")
        assert "Children's Hospital" not in cds_after and not any(uid in cds_after for uid in theirs)
        assert "Some records are withheld by consent." in cds_after
        # DIMSE: C-FIND lists nothing of theirs, C-MOVE and C-GET send nothing.
        assert not theirs & _cfind(scp, tmp_path / "find-after", CHILD_MRN)
        assert _cmove(scp, tmp_path / "move-after", one_of_theirs) == set()
        assert _cget(scp, tmp_path / "get-after", one_of_theirs) == set()
        # Imports: refused as for a study the broker does not know.
        with _client(server, "radiologist", STMARYS) as rad:
            hidden = rad.post("/api/imports", json={"study_uid": one_of_theirs, "facility": STMARYS})
            absent = rad.post("/api/imports", json={"study_uid": "1.2.3.4.5.6.7", "facility": STMARYS})
        assert hidden.status_code == absent.status_code == 404
        # The opt-out follows the person: the children's hospital no longer sees St Mary's study
        # of the child either, but always sees its own.
        assert not ours & _qido(kids, PatientID=CHILD_ST_MARYS_MRN)
        assert theirs <= _qido(kids, PatientID=CHILD_MRN)
        # Administrators (operators) are not limited by consent.
        assert theirs <= _qido(admin, PatientID=CHILD_MRN)

    # Withdrawn: shared again.
    assert theirs <= _qido(stmarys, PatientID=CHILD_MRN)
    assert "Children's Hospital" in cds_before  # the card named the other facility's prior


def test_a_scoped_opt_out_withholds_only_that_facilitys_records(
    stmarys: httpx.Client, kids: httpx.Client, studies: dict[str, set[str]]
) -> None:
    # The child opts out of sharing St Mary's records only: the children's hospital's study is
    # still shared with St Mary's, St Mary's study is no longer shared with the children's hospital.
    with opted_out(kids, scope=STMARYS):
        assert studies[KIDS] <= _qido(stmarys, PatientID=CHILD_MRN)
        assert not studies[STMARYS] & _qido(kids, PatientID=CHILD_ST_MARYS_MRN)


def test_denials_do_not_leak_existence(
    stmarys: httpx.Client, kids: httpx.Client, studies: dict[str, set[str]]
) -> None:
    hidden = sorted(studies[KIDS])[0]
    missing = "1.2.826.0.1.3680043.8.498.1"
    with opted_out(kids):
        a = stmarys.get(f"/dicom-web/studies/{hidden}/metadata")
        b = stmarys.get(f"/dicom-web/studies/{missing}/metadata")
        assert a.status_code == b.status_code == 404
        assert a.text.replace(hidden, "X") == b.text.replace(missing, "X")
        a = stmarys.get(f"/fhir/ImagingStudy/{hidden}")
        b = stmarys.get(f"/fhir/ImagingStudy/{missing}")
        assert (a.status_code, a.text) == (b.status_code, b.text) == (404, b.text)
    # Consent records of another facility's patient: 404 whether or not the patient exists.
    for mrn in (CHILD_MRN, "NO-SUCH-MRN"):
        r = stmarys.post("/api/consent", json={"facility": KIDS, "patient_id": mrn, "decision": "deny"})
        assert r.status_code == 404
        assert stmarys.get("/api/consent", params={"facility": KIDS, "patient_id": mrn}).status_code == 404


def _pdqm(client: httpx.Client, **params: str) -> dict[str, Any]:
    """A PDQm searchset, without its self link (which repeats the query)."""
    r = client.get("/fhir/Patient", params=params)
    assert r.status_code == 200, r.text
    return {k: v for k, v in r.json().items() if k != "link"}


def _values(resource: dict[str, Any]) -> set[str]:
    return {i["value"] for i in resource.get("identifier", [])}


def _pix(client: httpx.Client, source: str) -> httpx.Response:
    return client.get("/fhir/Patient/$ihe-pix", params={"sourceIdentifier": source})


def test_fhir_patient_and_pixm_do_not_find_an_opted_out_patient_from_other_facilities(
    server: LiveServer, admin: httpx.Client, stmarys: httpx.Client, kids: httpx.Client
) -> None:
    person = _person(admin)
    theirs = f"urn:scanonce:issuer:{CHILD_ISSUER}|{CHILD_MRN}"
    ours = f"urn:scanonce:issuer:ST-MARYS|{CHILD_ST_MARYS_MRN}"
    nobody = f"urn:scanonce:issuer:{CHILD_ISSUER}|NO-SUCH-MRN"
    family = admin.get(f"/fhir/Patient/{person}").json()["name"][0]["family"]
    with _client(server, "clinician", "northgen") as north:
        # Before: a third facility finds the child by either identifier and by name.
        assert _pdqm(north, identifier=theirs)["total"] == 1
        assert CHILD_ST_MARYS_MRN in str(_pix(north, theirs).json())
        assert person in str(_pdqm(north, family=family))
        with opted_out(kids):
            # A third facility: found nowhere, answered as for a patient the broker does not know.
            assert _pdqm(north, identifier=theirs) == _pdqm(north, identifier=nobody)
            assert _pdqm(north, identifier=ours)["total"] == 0  # the opt-out follows the person
            assert person not in {e["resource"]["id"] for e in _pdqm(north, family=family).get("entry", [])}
            hidden, missing = north.get(f"/fhir/Patient/{person}"), north.get("/fhir/Patient/987654321")
            assert hidden.status_code == missing.status_code == 404
            assert hidden.text.replace(person, "X") == missing.text.replace("987654321", "X")
            hidden, missing = _pix(north, theirs), _pix(north, nobody)
            assert (hidden.status_code, hidden.text) == (missing.status_code, missing.text)
            assert hidden.status_code == 404
            # St Mary's: its own record of the child, without the children's hospital's identifier.
            seen = stmarys.get(f"/fhir/Patient/{person}")
            assert seen.status_code == 200 and CHILD_MRN not in _values(seen.json())
            assert CHILD_ST_MARYS_MRN in _values(seen.json())
            assert CHILD_MRN not in _pix(stmarys, ours).text
            assert _pix(stmarys, theirs).status_code == 404
            # The children's hospital (where the child opted out) still finds its patient.
            assert _pdqm(kids, identifier=theirs)["total"] == 1
            assert CHILD_MRN in _values(kids.get(f"/fhir/Patient/{person}").json())
            assert _pix(kids, theirs).status_code == 200
            # The pages' search by name: as PDQm.
            page = north.get("/", params={"family": family})
            assert page.status_code == 200 and CHILD_MRN not in page.text
            # Operators are not limited by consent.
            assert {CHILD_MRN, CHILD_ST_MARYS_MRN} <= _values(admin.get(f"/fhir/Patient/{person}").json())
        # Withdrawn: found again.
        assert _pdqm(north, identifier=theirs)["total"] == 1


# -- purpose of use ------------------------------------------------------------------------------


def test_a_clinician_sees_other_facilities_only_for_treatment(
    server: LiveServer, studies: dict[str, set[str]]
) -> None:
    with _client(server, "clinician", STMARYS, purpose_of_use=None) as no_purpose:
        assert not studies[KIDS] & _qido(no_purpose, PatientID=CHILD_MRN)
        assert studies[STMARYS] <= _qido(no_purpose, PatientID=CHILD_ST_MARYS_MRN)
        assert _priors(no_purpose, STMARYS, CHILD_ST_MARYS_MRN)["withheld_by_consent"] is True
        # Stated by the client in a header when the token carries none.
        no_purpose.headers["X-Purpose-Of-Use"] = "TREAT"
        assert studies[KIDS] <= _qido(no_purpose, PatientID=CHILD_MRN)
    with _client(server, "clinician", STMARYS, purpose_of_use="HRESCH") as research:
        # A token's own purpose is not overridden by a header.
        research.headers["X-Purpose-Of-Use"] = "TREAT"
        assert not studies[KIDS] & _qido(research, PatientID=CHILD_MRN)


# -- opt-in facilities -----------------------------------------------------------------------------


def test_an_opt_in_facility_shares_only_after_the_person_opts_in(
    admin: httpx.Client, stmarys: httpx.Client, kids: httpx.Client, studies: dict[str, set[str]]
) -> None:
    r = admin.patch(f"/api/facilities/{KIDS}", json={"consent_policy": "opt-in"})
    assert r.status_code == 200 and r.json()["consent_policy"] == "opt-in"
    try:
        assert not studies[KIDS] & _qido(stmarys, PatientID=CHILD_MRN)
        assert studies[KIDS] <= _qido(kids, PatientID=CHILD_MRN)  # its own
        r = kids.post("/api/consent", json={"facility": KIDS, "patient_id": CHILD_MRN, "decision": "permit"})
        assert r.status_code == 201, r.text
        try:
            assert studies[KIDS] <= _qido(stmarys, PatientID=CHILD_MRN)
            listed = kids.get("/api/consent", params={"facility": KIDS, "patient_id": CHILD_MRN}).json()
            assert [c["decision"] for c in listed["consents"]] == ["permit"]
        finally:
            kids.delete(f"/api/consent/{r.json()['id']}")
        assert not studies[KIDS] & _qido(stmarys, PatientID=CHILD_MRN)
    finally:
        assert admin.patch(f"/api/facilities/{KIDS}", json={"consent_policy": "opt-out"}).status_code == 200
    assert admin.patch(f"/api/facilities/{KIDS}", json={"consent_policy": "maybe"}).status_code == 400


# -- the consent API and FHIR Consent --------------------------------------------------------------


def test_bad_consent_input_is_refused_and_changes_nothing(kids: httpx.Client) -> None:
    bad = [
        {"facility": KIDS, "patient_id": CHILD_MRN, "decision": "maybe"},
        {"facility": KIDS, "patient_id": "", "decision": "deny"},
        {"facility": "../x", "patient_id": CHILD_MRN, "decision": "deny"},
    ]
    for body in bad:
        assert kids.post("/api/consent", json=body).status_code == 400, body
    r = kids.post(
        "/api/consent",
        json={"facility": KIDS, "patient_id": CHILD_MRN, "decision": "deny", "scope": "nowhere"},
    )
    assert r.status_code == 400 and "scope" in r.json()["detail"]
    assert (
        kids.post(
            "/api/consent", json={"facility": KIDS, "patient_id": "NOPE", "decision": "deny"}
        ).status_code
        == 404
    )
    assert (
        kids.get("/api/consent", params={"facility": KIDS, "patient_id": CHILD_MRN}).json()["consents"] == []
    )
    assert kids.delete("/api/consent/999999").status_code == 404


def test_a_consent_can_only_be_withdrawn_where_it_was_recorded(
    stmarys: httpx.Client, kids: httpx.Client
) -> None:
    with opted_out(kids) as row:
        assert stmarys.delete(f"/api/consent/{row['id']}").status_code == 404
        # St Mary's sees the choice of its own patient (the same person), not who recorded it where.
        seen = stmarys.get("/api/consent", params={"facility": STMARYS, "patient_id": CHILD_ST_MARYS_MRN})
        assert [c["decision"] for c in seen.json()["consents"]] == ["deny"]


def test_fhir_consent_records_and_finds_an_opt_out(
    admin: httpx.Client, stmarys: httpx.Client, kids: httpx.Client, studies: dict[str, set[str]]
) -> None:
    person = _person(admin)
    resource = {
        "resourceType": "Consent",
        "status": "active",
        "scope": {"coding": [{"system": f"{HL7}/consentscope", "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": f"Patient/{person}"},
        "organization": [{"reference": f"Organization/{KIDS}"}],
        "policyRule": {"coding": [{"system": f"{HL7}/v3-ActCode", "code": "OPTOUT"}]},
        "provision": {"type": "deny"},
    }  # fmt: skip
    invalid = {k: v for k, v in resource.items() if k != "category"}
    r = kids.post("/fhir/Consent", json=invalid)
    assert r.status_code == 400 and r.json()["resourceType"] == "OperationOutcome"
    assert kids.get("/fhir/Consent", params={"patient": f"Patient/{person}"}).json()["total"] == 0
    # Recorded at another facility than the caller's: 404, as for a person it does not know.
    assert stmarys.post("/fhir/Consent", json=resource).status_code == 404

    r = kids.post("/fhir/Consent", json=resource)
    assert r.status_code == 201, r.text
    created = FhirConsent.model_validate(r.json())
    assert created.provision.type == "deny"  # type: ignore[union-attr]
    try:
        assert not studies[KIDS] & _qido(stmarys, PatientID=CHILD_MRN)
        found = Bundle.model_validate(
            stmarys.get("/fhir/Consent", params={"patient": f"Patient/{person}"}).json()
        )
        assert [e.resource.id for e in found.entry or []] == [created.id]  # type: ignore[union-attr]
    finally:
        kids.delete(f"/api/consent/{created.id}")
    assert studies[KIDS] <= _qido(stmarys, PatientID=CHILD_MRN)


# -- break-the-glass -----------------------------------------------------------------------------


def test_break_the_glass_overrides_an_opt_out_for_a_limited_time_and_is_listed_for_review(
    server: LiveServer, stmarys: httpx.Client, kids: httpx.Client, studies: dict[str, set[str]]
) -> None:
    events: list[consent_service.ConsentEvent] = []

    def listener(*, session: Session, event: consent_service.ConsentEvent) -> None:
        del session
        events.append(event)

    theirs = studies[KIDS]
    hidden = sorted(theirs)[0]
    base = {"facility": STMARYS, "patient_id": CHILD_ST_MARYS_MRN}
    with opted_out(kids):
        # A reason is mandatory; the length is bounded by the configured maximum.
        assert (
            stmarys.post("/api/break-glass", json={**base, "reason": "  ", "minutes": 10}).status_code == 400
        )
        too_long = stmarys.post(
            "/api/break-glass", json={**base, "reason": "unconscious in ED", "minutes": 61}
        )
        assert too_long.status_code == 400 and "60" in too_long.json()["detail"]
        assert not theirs & _qido(stmarys, PatientID=CHILD_MRN)

        consent_service.add_listener(listener)
        try:
            r = stmarys.post(
                "/api/break-glass",
                json={**base, "reason": "unconscious in ED, prior CT needed", "minutes": 15},
            )
        finally:
            consent_service.remove_listener(listener)
        assert r.status_code == 201, r.text
        grant = r.json()
        assert grant["active"] is True and grant["who"] == f"clinician-{STMARYS}"
        assert [e.action for e in events] == ["break-glass.granted"]
        assert events[0].detail["reason"] == "unconscious in ED, prior CT needed"
        # Written to the audit trail in the grant's own transaction, with its reason and patient.
        rows = audit_service.rows_between(engine=_engine(server), first=1, limit=1_000_000)
        granted = [r for r in rows if r["subtype"] == "break-glass.granted"]
        assert granted and granted[-1]["patient_id"] == CHILD_ST_MARYS_MRN
        assert "unconscious in ED" in granted[-1]["outcome_desc"]
        assert granted[-1]["agent_who"] == f"clinician-{STMARYS}"

        # Granted: the opted-out records are visible to this clinician, and only to them.
        assert theirs <= _qido(stmarys, PatientID=CHILD_MRN)
        assert stmarys.get(f"/dicom-web/studies/{hidden}/metadata").status_code == 200
        with _client(server, "clinician", STMARYS, subject="someone-else") as other:
            assert not theirs & _qido(other, PatientID=CHILD_MRN)

        # Listed for review (reviewers and administrators), not for the clinician.
        with _client(server, "reviewer", "local") as reviewer:
            listed = reviewer.get("/api/break-glass").json()
            mine = next(g for g in listed if g["id"] == grant["id"])
            assert (mine["patient_facility"], mine["patient_id"]) == (STMARYS, CHILD_ST_MARYS_MRN)
            assert mine["reason"] == "unconscious in ED, prior CT needed"
            assert reviewer.post(f"/api/break-glass/{grant['id']}/reviewed").json()["reviewed"] is True
        assert stmarys.get("/api/break-glass").status_code == 403

        # Expired (its end moved into the past, as time would): the opt-out applies again.
        with Session(_engine(server)) as session:
            session.execute(
                update(BreakGlass)
                .where(BreakGlass.id == grant["id"])
                .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
            )
            session.commit()
        assert not theirs & _qido(stmarys, PatientID=CHILD_MRN)
        assert stmarys.get(f"/dicom-web/studies/{hidden}/metadata").status_code == 404
        with _client(server, "admin", "local") as adm:
            expired = next(g for g in adm.get("/api/break-glass").json() if g["id"] == grant["id"])
        assert expired["active"] is False


def test_each_read_under_break_the_glass_is_flagged_in_the_audit_trail(
    server: LiveServer,
    admin: httpx.Client,
    stmarys: httpx.Client,
    kids: httpx.Client,
    studies: dict[str, set[str]],
) -> None:
    hidden = sorted(studies[KIDS])[0]
    r = admin.get("/dicom-web/studies", params={"PatientID": ADULT_MRN, "limit": "1"})
    unrelated = r.json()[0]["0020000D"]["Value"][0]  # another person's study
    with opted_out(kids):
        r = stmarys.post(
            "/api/break-glass",
            json={
                "facility": STMARYS,
                "patient_id": CHILD_ST_MARYS_MRN,
                "reason": "unconscious in ED, prior CT needed",
                "minutes": 15,
            },
        )
        assert r.status_code == 201, r.text
        grant = r.json()
        try:
            assert stmarys.get(f"/dicom-web/studies/{hidden}/metadata").status_code == 200
            assert stmarys.get(f"/dicom-web/studies/{unrelated}/metadata").status_code == 200
            with _client(server, "auditor", "local") as auditor:
                listed = auditor.get("/api/audit", params={"purpose": "BTG", "limit": "1000"}).json()
                mine = [e for e in listed if e["agent_who"] == f"clinician-{STMARYS}"]
                # The read of the granted person's study is flagged, with the stated purpose kept;
                # the read of another person's study in the same hour is not.
                flagged = [e for e in mine if e["study_uid"] == hidden]
                assert flagged and flagged[0]["purpose_of_use"] == "TREAT BTG"
                assert flagged[0]["patient_id"] == CHILD_MRN
                assert not [e for e in mine if e["study_uid"] == unrelated]
                found = auditor.get("/fhir/AuditEvent", params={"purpose": "BTG", "_count": "1000"}).json()
                codes = [
                    [c["coding"][0]["code"] for c in e["resource"].get("purposeOfEvent", [])]
                    for e in found["entry"]
                    if e["resource"]["agent"][0]["who"]["display"] == f"clinician-{STMARYS}"
                ]
                assert codes and all(c == ["TREAT", "BTG"] for c in codes)
                other = auditor.get("/api/audit", params={"study": unrelated, "limit": "10"}).json()
                assert other and all("BTG" not in e["purpose_of_use"] for e in other)
        finally:
            with Session(_engine(server)) as session:
                session.execute(
                    update(BreakGlass)
                    .where(BreakGlass.id == grant["id"])
                    .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
                )
                session.commit()
    # Expired: reads are no longer flagged.
    stmarys.get(f"/dicom-web/studies/{sorted(studies[STMARYS])[0]}/metadata")
    with _client(server, "auditor", "local") as auditor:
        last = auditor.get("/api/audit", params={"agent": f"clinician-{STMARYS}", "limit": "1"}).json()
    assert last[0]["subtype"] == "retrieve" and "BTG" not in last[0]["purpose_of_use"]
