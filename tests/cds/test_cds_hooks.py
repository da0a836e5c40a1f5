"""CDS Hooks 2.0 on the demo data, over HTTP as an EHR calls it: discovery, order-select and
order-sign cards from the prior lookup, the patient read from prefetch or from the EHR's FHIR
server, feedback becoming avoided repeats; malformed calls refused. SQLite and PostgreSQL."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY
from pydicom.uid import generate_uid
from sqlmodel import Session, func, select

from broker.cds.models import Feedback, IssuedCard
from broker.index.service import ingest_files
from tests.dicomweb.conftest import LiveServer
from tests.live_demo import BACKENDS, CHILD_ISSUER, CHILD_MRN, demo_server
from tests.support import ADMIN, auth_headers, make_ds, mint_token, write

SELECT = "/cds-services/scanonce-prior-imaging"
SIGN = "/cds-services/scanonce-prior-imaging-sign"
CPT = "http://www.ama-assn.org/go/cpt"
CHILD_SYSTEM = f"urn:scanonce:issuer:{CHILD_ISSUER}"
# A patient of the children's hospital with a CT abdomen/pelvis nine days ago (added by the test).
RECENT_MRN = "K-CDS-0001"


@pytest.fixture(scope="module", params=BACKENDS)
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    tmp = tmp_path_factory.mktemp("cds")
    with demo_server(request, tmp) as s:
        st = s.app.state.scanonce  # type: ignore[attr-defined]
        nine_days_ago = (datetime.now(UTC).date() - timedelta(days=9)).strftime("%Y%m%d")
        ds = make_ds(
            sop=generate_uid(),
            study=generate_uid(),
            series=generate_uid(),
            name="QUILLFEATHER^ROSALIND",
            pid=RECENT_MRN,
            date=nine_days_ago,
            description="CT ABD/PEL W CONTRAST",
            accession="CDS1",
        )
        ds.PatientBirthDate = "20180301"
        out = ingest_files(
            engine=st.engine,
            store=st.store,
            principal=ADMIN,
            facility_id="kids",
            paths=[write(tmp, "ct.dcm", ds)],
        )
        assert out[0].ok
        yield s


@pytest.fixture(scope="module")
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.origin, timeout=30, trust_env=False, headers=auth_headers()) as c:
        yield c


def _engine(server: LiveServer) -> Any:
    return server.app.state.scanonce.engine  # type: ignore[attr-defined]


def _order(order_id: str, *, text: str, code: str | None = None, system: str = CPT) -> dict[str, Any]:
    concept: dict[str, Any] = {"text": text}
    if code:
        concept["coding"] = [{"system": system, "code": code}]
    return {
        "resourceType": "ServiceRequest",
        "id": order_id,
        "status": "draft",
        "intent": "order",
        "subject": {"reference": "Patient/ehr-1"},
        "code": concept,
    }


def _patient(system: str, value: str) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": "ehr-1",
        "identifier": [
            {"system": "urn:oid:2.16.840.1.113883.19.5", "value": "EHR-ONLY-42"},  # an issuer nobody knows
            {"system": system, "value": value},
        ],
    }


def _hook(
    hook: str = "order-select",
    *,
    orders: list[dict[str, Any]] | None = None,
    selections: list[str] | None = None,
    patient: dict[str, Any] | None = None,
    encounter_class: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    orders = orders if orders is not None else [_order("sr1", text="CT ABD/PEL W CONTRAST", code="74177")]
    context: dict[str, Any] = {
        "userId": "Practitioner/example",
        "patientId": "ehr-1",
        "draftOrders": {
            "resourceType": "Bundle",
            "type": "collection",
            "entry": [{"resource": o} for o in orders],
        },
    }
    if hook == "order-select":
        context["selections"] = (
            selections if selections is not None else [f"ServiceRequest/{orders[0]['id']}"]
        )
    body: dict[str, Any] = {"hook": hook, "hookInstance": str(uuid.uuid4()), "context": context}
    prefetch: dict[str, Any] = {}
    if patient is not None:
        prefetch["patient"] = patient
    if encounter_class:
        prefetch["encounter"] = {
            "resourceType": "Encounter",
            "status": "in-progress",
            "class": {"code": encounter_class},
        }
    if prefetch:
        body["prefetch"] = prefetch
    body.update(extra)
    return body


def _cards(http: httpx.Client, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    r = http.post(path, json=body)
    assert r.status_code == 200, r.text
    cards = r.json()["cards"]
    for card in cards:
        _check_card(card)
    return cards


def _check_card(card: dict[str, Any]) -> None:
    """The card attributes CDS Hooks 2.0 requires of a service (Card, Suggestion, Action, Link)."""
    assert isinstance(card["summary"], str) and 0 < len(card["summary"]) < 140
    assert card["indicator"] in ("info", "warning", "critical")
    assert card["source"]["label"]
    uuid.UUID(card["uuid"])  # feedback names the card by it
    if card.get("suggestions"):
        assert card["selectionBehavior"] in ("at-most-one", "any")
        for s in card["suggestions"]:
            assert s["label"]
            uuid.UUID(s["uuid"])
            for a in s.get("actions", []):
                assert a["type"] in ("create", "update", "delete") and a["description"]
                if a["type"] == "delete":
                    assert a["resourceId"].startswith("ServiceRequest/")
    for reason in card.get("overrideReasons", []):
        assert reason["code"] and reason["display"]  # the spec: display is required
    for link in card.get("links", []):
        assert link["label"] and link["type"] in ("absolute", "smart") and link["url"].startswith("http")


def test_discovery_lists_both_hooks_with_prefetch(http: httpx.Client) -> None:
    r = http.get("/cds-services")
    assert r.status_code == 200
    services = {s["id"]: s for s in r.json()["services"]}
    assert services["scanonce-prior-imaging"]["hook"] == "order-select"
    assert services["scanonce-prior-imaging-sign"]["hook"] == "order-sign"
    for s in services.values():
        assert s["description"] and s["title"]
        assert s["prefetch"]["patient"] == "Patient/{{context.patientId}}"


def test_the_childs_prior_ct_elsewhere_with_dose_and_links(http: httpx.Client, server: LiveServer) -> None:
    cards = _cards(http, SELECT, _hook(patient=_patient(CHILD_SYSTEM, CHILD_MRN)))
    assert len(cards) == 1
    card = cards[0]
    # The newest relevant prior: the CT abdomen/pelvis at St Mary's, months ago (out of the window).
    assert "St Mary's" in card["summary"] and "ABDOMEN" in card["summary"].upper()
    assert card["indicator"] == "info"
    assert "mSv" in card["detail"] and "Why it is relevant" in card["detail"] and "ABDOMEN" in card["detail"]
    assert "A repeat would cost" in card["detail"]
    action = card["suggestions"][0]["actions"][0]
    assert action == {**action, "type": "delete", "resourceId": "ServiceRequest/sr1"}
    viewer = next(link["url"] for link in card["links"] if "viewer" in link["url"])
    uid = viewer.split("StudyInstanceUIDs=")[1]
    # The linked study is the child's, served by the broker's own DICOMweb.
    r = http.get("/dicom-web/studies", params={"StudyInstanceUID": uid})
    assert r.status_code == 200 and r.json()[0]["00081030"]["Value"][0].upper().startswith("CT ABD")
    page = next(link["url"] for link in card["links"] if link["url"].startswith(f"{server.origin}/?"))
    assert page.startswith(f"{server.origin}/?facility=kids&mrn={CHILD_MRN}")
    # The lookup page opens on this patient and exam, the prior among its answers.
    r = http.get(page)
    assert r.status_code == 200 and uid in r.text


def test_a_coded_order_without_text_links_the_page_by_code(http: httpx.Client, server: LiveServer) -> None:
    order = _order("sr1", text="", code="74177")
    del order["code"]["text"]
    cards = _cards(http, SELECT, _hook(patient=_patient(CHILD_SYSTEM, CHILD_MRN), orders=[order]))
    assert len(cards) == 1
    page = next(link["url"] for link in cards[0]["links"] if link["url"].startswith(f"{server.origin}/?"))
    assert "code=74177" in page and "system=CPT" in page and "exam=" not in page
    viewer = next(link["url"] for link in cards[0]["links"] if "viewer" in link["url"])
    uid = viewer.split("StudyInstanceUIDs=")[1]
    # The page reads the code, as the card did: the same prior, no complaint about the exam.
    r = http.get(page)
    assert r.status_code == 200 and uid in r.text


def test_a_prior_nine_days_ago_is_a_warning_in_the_ed(http: httpx.Client) -> None:
    cards = _cards(http, SELECT, _hook(patient=_patient(CHILD_SYSTEM, RECENT_MRN), encounter_class="EMER"))
    assert [c["indicator"] for c in cards] == ["warning"]
    assert "9 days ago" in cards[0]["summary"] and "Children's Hospital" in cards[0]["summary"]
    assert "inside the ed look-back window of 30 days" in cards[0]["detail"]
    assert cards[0]["suggestions"][0]["isRecommended"] is True
    # The setting as a request extension: trauma looks back one day only.
    cards = _cards(
        http,
        SELECT,
        _hook(patient=_patient(CHILD_SYSTEM, RECENT_MRN), extension={"org.scanonce.setting": "trauma"}),
    )
    assert [c["indicator"] for c in cards] == ["info"]


def test_order_sign_a_card_per_imaging_order_with_a_relevant_prior(http: httpx.Client) -> None:
    orders = [
        _order("ct", text="CT ABDOMEN PELVIS WITH CONTRAST"),
        _order("lab", text="Complete blood count", code="58410-2", system="http://loinc.org"),
        _order("hand", text="XR HAND LEFT 3 VIEWS"),
        {"resourceType": "MedicationRequest", "id": "med", "status": "draft", "intent": "order"},
    ]
    cards = _cards(http, SIGN, _hook("order-sign", orders=orders, patient=_patient(CHILD_SYSTEM, CHILD_MRN)))
    assert [c["suggestions"][0]["actions"][0]["resourceId"] for c in cards] == ["ServiceRequest/ct"]
    # order-select judges only the selected order.
    cards = _cards(
        http,
        SELECT,
        _hook(orders=orders, selections=["ServiceRequest/hand"], patient=_patient(CHILD_SYSTEM, CHILD_MRN)),
    )
    assert cards == []


def test_the_patient_read_from_the_ehrs_fhir_server(http: httpx.Client, server: LiveServer) -> None:
    # The broker's own FHIR interface plays the EHR's FHIR server: Patient/{id} over HTTP.
    person = http.get("/fhir/Patient", params={"identifier": f"{CHILD_SYSTEM}|{CHILD_MRN}"}).json()
    person_id = person["entry"][0]["resource"]["id"]
    body = _hook(
        fhirServer=f"{server.origin}/fhir",
        fhirAuthorization={
            # The broker, playing the EHR's FHIR server, accepts only its own tokens: the card
            # can only come back if the service used this one to call it.
            "access_token": mint_token("clinician"),
            "token_type": "Bearer",
            "expires_in": 300,
            "scope": "patient/Patient.read",
            "subject": "scanonce",
        },
    )
    body["context"]["patientId"] = person_id
    cards = _cards(http, SELECT, body)
    assert len(cards) == 1 and "St Mary's" in cards[0]["summary"]
    # The server does not have the patient, or cannot be reached, and nothing was prefetched: 412.
    body["context"]["patientId"] = "999999"
    assert http.post(SELECT, json=body).status_code == 412
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    body = _hook(fhirServer=f"http://127.0.0.1:{closed}/fhir")
    r = http.post(SELECT, json=body)
    assert r.status_code == 412 and "could not be reached" in r.text
    assert http.post(SELECT, json=_hook()).status_code == 412  # no prefetch and no fhirServer
    # A fhirServer outside the administrator's outbound networks (loopback by default) is never
    # called: a request cannot make the broker fetch an address of its choosing.
    r = http.post(SELECT, json=_hook(fhirServer="http://10.255.0.1/fhir"))
    assert r.status_code == 403 and "SCANONCE_OUTBOUND_ALLOW_NETWORKS" in r.text


def test_an_unknown_patient_gets_no_card(http: httpx.Client) -> None:
    assert _cards(http, SELECT, _hook(patient=_patient(CHILD_SYSTEM, "NO-SUCH-MRN"))) == []
    assert _cards(http, SELECT, _hook(patient={"resourceType": "Patient", "id": "x"})) == []


def _bad(**changes: Any) -> dict[str, Any]:
    body = _hook(patient=_patient(CHILD_SYSTEM, CHILD_MRN))
    for key, value in changes.items():
        target = body["context"] if key.startswith("ctx_") else body
        name = key.removeprefix("ctx_")
        if value is None:
            target.pop(name, None)
        else:
            target[name] = value
    return body


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (_bad(hook=None), "hook is required"),
        (_bad(hook="patient-view"), "order-select hook"),
        (_bad(hookInstance=None), "hookInstance"),
        (_bad(hookInstance="not-a-uuid"), "hookInstance"),
        (_bad(context=None), "context is required"),
        (_bad(ctx_patientId=None), "context.patientId"),
        (_bad(ctx_userId=None), "context.userId"),
        (_bad(ctx_draftOrders=None), "draftOrders"),
        (_bad(ctx_draftOrders={"resourceType": "Patient"}), "draftOrders"),
        (_bad(ctx_selections=None), "selections"),
        (_bad(ctx_selections=["ServiceRequest/nope"]), "ServiceRequest/nope"),
        (_bad(fhirAuthorization={"access_token": "x", "token_type": "Bearer"}), "fhirServer"),
        (_bad(fhirServer="ftp://ehr/fhir"), "fhirServer"),
        (_bad(fhirServer="http://ehr.example:fhir/"), "fhirServer"),
        (_bad(fhirServer="https://"), "fhirServer"),
        (_bad(fhirServer="http://ehr.example:99999/fhir"), "fhirServer"),
        (_bad(fhirServer="http://ehr\x00.example/fhir"), "fhirServer"),
        (_bad(fhirServer="http://" + "a" * 300 + ".example/fhir"), "fhirServer"),
        (_bad(ctx_patientId="ehr-1/../../Practitioner/1"), "patientId"),
        (_bad(ctx_patientId="ehr\x001"), "patientId"),
        (_bad(ctx_encounterId="enc 1"), "encounterId"),
        (_bad(extension={"org.scanonce.setting": "icu"}), "setting"),
    ],
)
def test_malformed_hook_calls_are_400_with_a_reason(
    http: httpx.Client, body: dict[str, Any], says: str
) -> None:
    r = http.post(SELECT, json=body)
    assert r.status_code == 400, r.text
    assert says in r.json()["detail"]


def _malformed_order(**fields: Any) -> dict[str, Any]:
    order = _order("sr1", text="CT ABD/PEL W CONTRAST", code="74177")
    order.update(fields)
    return order


@pytest.mark.parametrize(
    ("path", "body", "says"),
    [
        (SELECT, _hook(orders=[_malformed_order(code={"coding": 5})]), "coding"),
        (SELECT, _hook(orders=[_malformed_order(code={"coding": [{"system": [], "code": "1"}]})]), "system"),
        (SELECT, _hook(orders=[_malformed_order(code=["CT"])]), "code"),
        (SELECT, _hook(orders=[_malformed_order(bodySite=[{"coding": 7}])]), "bodySite"),
        (SELECT, _hook(orders=[_malformed_order(bodySite={"text": "ABDOMEN"})]), "bodySite"),
        (SELECT, _hook(orders=[_malformed_order(bodySite=[{"coding": [{"code": []}]}])]), "bodySite"),
        (SELECT, _hook(patient={"resourceType": "Patient", "identifier": 5}), "identifier"),
        (SELECT, _hook(patient={"resourceType": "Patient", "identifier": [{"system": 1}]}), "identifier"),
    ],
)
def test_malformed_resources_in_a_hook_call_are_400_not_500(
    http: httpx.Client, path: str, body: dict[str, Any], says: str
) -> None:
    if "patient" not in body.get("prefetch", {}):
        body["prefetch"] = {"patient": _patient(CHILD_SYSTEM, CHILD_MRN)}
    r = http.post(path, json=body)
    assert r.status_code == 400, r.text
    assert says in r.json()["detail"]


def test_a_nul_character_in_the_patients_identifier_is_no_fault(http: httpx.Client) -> None:
    r = http.post(SELECT, json=_hook(patient=_patient(CHILD_SYSTEM, f"{CHILD_MRN}\x00")))
    assert r.status_code in (200, 400), r.text
    assert r.json().get("cards") == [] if r.status_code == 200 else "NUL" in r.json()["detail"]


def test_order_sign_selections_when_sent_are_ids(http: httpx.Client) -> None:
    for selections in (5, [[1]], [{"id": "sr1"}]):
        body = _hook("order-sign", patient=_patient(CHILD_SYSTEM, CHILD_MRN))
        body["context"]["selections"] = selections
        r = http.post(SIGN, json=body)
        assert r.status_code == 400 and "selections" in r.json()["detail"], r.text


def test_an_unknown_setting_is_400_whoever_the_patient(http: httpx.Client) -> None:
    # Refused as the documented 400 even when no card would be made (the patient unknown, no
    # imaging order): a client's mistake shows on its first call, not on some patient's.
    bad = {"org.scanonce.setting": "icu"}
    for body in (
        _hook(patient=_patient(CHILD_SYSTEM, "NO-SUCH-MRN"), extension=bad),
        _hook(
            orders=[_order("lab", text="Complete blood count")],
            patient=_patient(CHILD_SYSTEM, CHILD_MRN),
            extension=bad,
        ),
    ):
        r = http.post(SELECT, json=body)
        assert r.status_code == 400 and "setting" in r.json()["detail"], r.text


def test_a_fhir_server_url_that_is_no_url_is_400_when_it_is_needed(http: httpx.Client) -> None:
    # Nothing prefetched: the service would read the patient from it.
    r = http.post(SELECT, json=_hook(fhirServer="http://ehr.example:fhir/"))
    assert r.status_code == 400 and "fhirServer" in r.json()["detail"], r.text


def test_not_json_and_unknown_service(http: httpx.Client) -> None:
    r = http.post(SELECT, content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not JSON" in r.json()["detail"]
    assert http.post("/cds-services/no-such-service", json=_hook()).status_code == 404
    assert http.post("/cds-services/no-such-service/feedback", json={"feedback": []}).status_code == 404


def _count(server: LiveServer, model: Any) -> int:
    with Session(_engine(server)) as s:
        return int(s.exec(select(func.count()).select_from(model)).one())


def _avoided(http: httpx.Client, facility: str) -> int:
    return sum(
        m["repeats_avoided"] for m in http.get("/api/metrics/avoided").json() if m["facility"] == facility
    )


def _accepted(card: dict[str, Any]) -> dict[str, Any]:
    """The feedback an EHR sends when the clinician takes the card's suggestion."""
    return {
        "feedback": [
            {
                "card": card["uuid"],
                "outcome": "accepted",
                "acceptedSuggestions": [{"id": card["suggestions"][0]["uuid"]}],
                "outcomeTimestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            }
        ]
    }


def test_feedback_accepted_is_an_avoided_repeat_once(http: httpx.Client, server: LiveServer) -> None:
    card = _cards(http, SELECT, _hook(patient=_patient(CHILD_SYSTEM, RECENT_MRN), encounter_class="EMER"))[0]
    before = _avoided(http, "kids")
    counter = REGISTRY.get_sample_value("scanonce_repeats_avoided_total", {"facility": "kids"}) or 0.0
    accepted = _accepted(card)
    r = http.post(f"{SELECT}/feedback", json=accepted)
    assert r.status_code == 200 and r.json() == {"recorded": 1, "repeats_avoided": 1}
    assert _avoided(http, "kids") == before + 1
    assert REGISTRY.get_sample_value("scanonce_repeats_avoided_total", {"facility": "kids"}) == counter + 1
    # The client sends the same feedback again: stored, not counted twice.
    r = http.post(f"{SELECT}/feedback", json=accepted)
    assert r.json() == {"recorded": 1, "repeats_avoided": 0}
    assert _avoided(http, "kids") == before + 1
    with Session(_engine(server)) as s:
        row = s.get(IssuedCard, card["uuid"])
        assert row is not None and row.avoided_id and row.planned_exam == "CT ABD/PEL W CONTRAST"


def test_feedback_accepted_for_a_coded_order_without_text_is_an_avoided_repeat(http: httpx.Client) -> None:
    # An EHR's order often carries only its code: the accepted card counts as one with words do.
    order = _order("sr-coded", text="", code="74177")
    del order["code"]["text"]
    body = _hook(patient=_patient(CHILD_SYSTEM, RECENT_MRN), orders=[order], encounter_class="EMER")
    card = _cards(http, SELECT, body)[0]
    before = _avoided(http, "kids")
    accepted = _accepted(card)
    r = http.post(f"{SELECT}/feedback", json=accepted)
    assert r.status_code == 200 and r.json() == {"recorded": 1, "repeats_avoided": 1}, r.text
    assert _avoided(http, "kids") == before + 1


def test_feedback_overridden_keeps_the_reason_and_avoids_nothing(
    http: httpx.Client, server: LiveServer
) -> None:
    card = _cards(http, SELECT, _hook(patient=_patient(CHILD_SYSTEM, CHILD_MRN)))[0]
    reason = card["overrideReasons"][1]
    before = _avoided(http, "kids")
    body = {
        "feedback": [
            {
                "card": card["uuid"],
                "outcome": "overridden",
                "overrideReason": {"reason": reason, "userComment": "new pain, different question"},
                "outcomeTimestamp": "2026-12-05T10:00:00Z",
            }
        ]
    }
    r = http.post(f"{SELECT}/feedback", json=body)
    assert r.status_code == 200 and r.json() == {"recorded": 1, "repeats_avoided": 0}
    assert _avoided(http, "kids") == before
    with Session(_engine(server)) as s:
        row = s.exec(select(Feedback).where(Feedback.card_uuid == card["uuid"])).one()
    assert (row.outcome, row.override_code, row.user_comment) == (
        "overridden",
        reason["code"],
        "new pain, different question",
    )


def test_bad_feedback_stores_nothing(http: httpx.Client, server: LiveServer) -> None:
    card = _cards(http, SELECT, _hook(patient=_patient(CHILD_SYSTEM, CHILD_MRN)))[0]
    good = {"card": card["uuid"], "outcome": "overridden", "outcomeTimestamp": "2026-12-05T10:00:00Z"}
    stored = _count(server, Feedback)
    for body, status in [
        ({"feedback": [good, {**good, "card": str(uuid.uuid4())}]}, 404),  # a card nobody issued
        ({"feedback": [good, {**good, "outcome": "ignored"}]}, 400),
        ({"feedback": [good, {**good, "outcome": "accepted"}]}, 400),  # no acceptedSuggestions
        ({"feedback": [{k: v for k, v in good.items() if k != "outcomeTimestamp"}]}, 400),
        ({"feedback": [{**good, "outcomeTimestamp": "yesterday"}]}, 400),
        ({"feedback": []}, 400),
        ({"cards": []}, 400),
    ]:
        r = http.post(f"{SELECT}/feedback", json=body)
        assert r.status_code == status, (body, r.text)
    # A card of the order-select service is not the order-sign service's.
    assert http.post(f"{SIGN}/feedback", json={"feedback": [good]}).status_code == 404
    assert _count(server, Feedback) == stored


def test_cards_are_recorded_per_hook_instance(http: httpx.Client, server: LiveServer, tmp_path: Path) -> None:
    body = _hook(patient=_patient(CHILD_SYSTEM, CHILD_MRN))
    cards = _cards(http, SELECT, body)
    with Session(_engine(server)) as s:
        rows = list(s.exec(select(IssuedCard).where(IssuedCard.hook_instance == body["hookInstance"])))
    assert [r.uuid for r in rows] == [c["uuid"] for c in cards]
    assert rows[0].facility_id == "kids" and rows[0].order_ref == "ServiceRequest/sr1"
