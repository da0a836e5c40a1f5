"""FHIR R4: PIXm, PDQm and the Patient feed through the app, validated with fhir.resources."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from fhir.resources.bundle import Bundle
from fhir.resources.operationoutcome import OperationOutcome
from fhir.resources.parameters import Parameters
from fhir.resources.patient import Patient as FhirPatient
from sqlmodel import Session

from broker.app import create_app
from broker.deps import AppState
from broker.settings import Settings
from storage import open_store
from tests.support import auth_headers

from .conftest import ingest_patient

FHIR = "application/fhir+json"


@pytest.fixture
def client(engine: Any, tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(data_dir=tmp_path)
    state = AppState(settings=settings, engine=engine, store=open_store((tmp_path / "objects").as_uri()))
    with TestClient(create_app(settings=settings, state=state), headers=auth_headers()) as c:
        yield c


def _patient(
    system: str, value: str, family: str, given: list[str], birth: str, **extra: Any
) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": system, "value": value}],
        "name": [{"family": family, "given": given}],
        "birthDate": birth,
        **extra,
    }


def _outcome(r: Any, status: int) -> str:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(FHIR)
    oo = OperationOutcome.model_validate(r.json())
    return str(oo.issue[0].diagnostics)


def test_feed_then_pix_and_pdq(client: TestClient, engine: Any) -> None:
    with Session(engine) as s:
        ingest_patient(s, "fac-a", "A1", "NEUMANN^MICHAELA", "19151111", "F", "8 Stanley Street Miami 4223")
    body = _patient(
        "urn:oid:1.2.826.0.1.99",
        "C-77",
        "Neuman",
        ["Micheala"],
        "1915-11-11",
        gender="female",
        address=[{"line": ["8 Stanley St"], "city": "Miami", "postalCode": "4223"}],
    )
    r = client.post("/fhir/Patient", json=body, headers={"content-type": FHIR})
    assert r.status_code == 201, r.text
    assert r.headers["content-type"].startswith(FHIR)
    created = FhirPatient.model_validate(r.json())
    systems = {(i.system, i.value) for i in created.identifier or []}
    assert systems == {("urn:oid:1.2.826.0.1.99", "C-77"), ("urn:scanonce:issuer:ISSUER-A", "A1")}

    r = client.get("/fhir/Patient/$ihe-pix", params={"sourceIdentifier": "urn:scanonce:issuer:ISSUER-A|A1"})
    assert r.status_code == 200 and r.headers["content-type"].startswith(FHIR)
    params = Parameters.model_validate(r.json())
    targets = [
        (p.valueIdentifier.system, p.valueIdentifier.value)
        for p in params.parameter or []
        if p.name == "targetIdentifier" and p.valueIdentifier is not None
    ]
    assert targets == [("urn:oid:1.2.826.0.1.99", "C-77")]
    assert any(p.name == "targetId" for p in params.parameter or [])
    # targetSystem filters; a system nobody knows is 403 per ITI-83.
    r = client.get(
        "/fhir/Patient/$ihe-pix",
        params={
            "sourceIdentifier": "urn:oid:1.2.826.0.1.99|C-77",
            "targetSystem": "urn:scanonce:issuer:ISSUER-B",
        },
    )
    assert r.status_code == 200
    assert [p.name for p in Parameters.model_validate(r.json()).parameter or []] == ["targetId"]
    _outcome(
        client.get(
            "/fhir/Patient/$ihe-pix",
            params={"sourceIdentifier": "urn:oid:1.2.826.0.1.99|C-77", "targetSystem": "urn:x"},
        ),
        403,
    )

    r = client.get("/fhir/Patient", params={"family": "neu", "birthdate": "1915-11-11"})
    assert r.status_code == 200
    bundle = Bundle.model_validate(r.json())
    assert bundle.type == "searchset" and bundle.total == 1
    person = bundle.entry[0].resource  # type: ignore[index]
    assert len(person.identifier) == 2  # type: ignore[union-attr]
    r = client.get("/fhir/Patient", params={"identifier": "urn:oid:1.2.826.0.1.99|C-77"})
    assert Bundle.model_validate(r.json()).total == 1
    r = client.get("/fhir/Patient", params={"family": "Nobody"})
    assert Bundle.model_validate(r.json()).total == 0

    # Update (conditional, ITI-104 style): same identifier, new address; still one person.
    body["address"] = [{"line": ["9 Other Road"], "postalCode": "4000"}]
    r = client.put("/fhir/Patient", params={"identifier": "urn:oid:1.2.826.0.1.99|C-77"}, json=body)
    assert r.status_code == 200, r.text
    assert FhirPatient.model_validate(r.json()).id == created.id


def test_fhir_errors_are_operation_outcomes(client: TestClient) -> None:
    assert "bare" in _outcome(client.get("/fhir/Patient/$ihe-pix", params={"sourceIdentifier": "12345"}), 400)
    assert "required" in _outcome(client.get("/fhir/Patient/$ihe-pix"), 400)
    _outcome(client.get("/fhir/Patient/$ihe-pix", params={"sourceIdentifier": "urn:nobody|1"}), 400)
    assert "unknown" in _outcome(
        client.get(
            "/fhir/Patient/$ihe-pix", params={"sourceIdentifier": "urn:scanonce:issuer:ISSUER-A|nope"}
        ),
        404,
    )
    assert "at least one" in _outcome(client.get("/fhir/Patient"), 400)
    assert "unsupported" in _outcome(client.get("/fhir/Patient", params={"telecom": "1"}), 400)
    assert "real date" in _outcome(client.get("/fhir/Patient", params={"birthdate": "2023-02-30"}), 400)
    # 0001-01-01 exists (a placeholder some systems write): the refusal names the range checked.
    for outside in ("0001-01-01", "2999-01-01"):
        said = _outcome(client.get("/fhir/Patient", params={"birthdate": outside}), 400)
        assert "from 1850-01-01 to today" in said and "real date" not in said, said
    _outcome(client.get("/fhir/Patient/999999"), 404)

    def post(body: Any) -> Any:
        return client.post(
            "/fhir/Patient",
            content=body if isinstance(body, bytes) else None,
            json=None if isinstance(body, bytes) else body,
        )

    assert "not JSON" in _outcome(post(b"{nope"), 400)
    assert "Patient resource" in _outcome(post({"resourceType": "Observation"}), 400)
    assert "system" in _outcome(post({"resourceType": "Patient", "identifier": [{"value": "1"}]}), 400)
    assert "identifier" in _outcome(post({"resourceType": "Patient", "name": [{"family": "X"}]}), 400)
    assert "birthDate" in _outcome(post(_patient("urn:x", "1", "Smith", ["Ann"], "2023-02-30")), 400)
    assert "future" in _outcome(post(_patient("urn:x", "1", "Smith", ["Ann"], "2999-01-01")), 400)
    assert "gender" in _outcome(
        post({**_patient("urn:x", "1", "Smith", ["Ann"], "1990-01-01"), "gender": 7}), 400
    )


def test_a_body_in_a_format_other_than_json_is_unsupported_media_type(client: TestClient) -> None:
    # FHIR's http page: 415 when the client posts a format the server does not take (XML here).
    xml = (
        b'<Patient xmlns="http://hl7.org/fhir"><identifier><system value="urn:x"/>'
        b'<value value="9"/></identifier></Patient>'
    )
    for kind in ("application/fhir+xml", "application/xml", "text/plain"):
        for method, path in (
            ("POST", "/fhir/Patient"),
            ("PUT", "/fhir/Patient?identifier=urn:x|9"),
            ("POST", "/fhir/Consent"),
        ):
            r = client.request(method, path, content=xml, headers={"content-type": kind})
            assert "JSON" in _outcome(r, 415), (method, path, kind)
    assert (
        client.get("/fhir/Patient", params={"identifier": "urn:x|9"}).json()["total"] == 0
    )  # nothing stored
    # JSON in its spellings is taken.
    body = _patient("urn:x", "9", "Smith", ["Ann"], "1990-01-01")
    for kind in ("application/fhir+json", "application/json", "application/fhir+json; charset=utf-8"):
        r = client.post("/fhir/Patient", json=body, headers={"content-type": kind})
        assert r.status_code in (200, 201), r.text


def test_feed_with_name_only_does_not_link(client: TestClient) -> None:
    a = client.post(
        "/fhir/Patient",
        json={
            "resourceType": "Patient",
            "identifier": [{"system": "urn:a", "value": "1"}],
            "name": [{"family": "Zylbersztejn", "given": ["Eustachy"]}],
        },
    )
    b = client.post(
        "/fhir/Patient",
        json={
            "resourceType": "Patient",
            "identifier": [{"system": "urn:b", "value": "1"}],
            "name": [{"family": "Zylbersztejn", "given": ["Eustachy"]}],
        },
    )
    assert a.status_code == b.status_code == 201
    assert a.json()["id"] != b.json()["id"]
    assert b.headers["X-ScanOnce-Link"] in ("new", "review")


def test_review_api_records_who_and_why(client: TestClient, engine: Any) -> None:
    with Session(engine) as s:
        ingest_patient(s, "fac-a", "A1", "NGUYEN^SONJA", "20150601", "F", "17 Sharwood Crescent 2866")
        ingest_patient(s, "fac-b", "B1", "NGUYEN^PIA", "20150601", "F", "17 Sharwood Crescent 2866")
    queue = client.get("/api/identity/review").json()
    assert len(queue) == 1 and queue[0]["contributions"]["given"]["level"] == "different"
    r = client.post(f"/api/identity/review/{queue[0]['id']}", json={"decision": "link"})
    assert r.status_code == 400  # no reason given
    r = client.post(
        f"/api/identity/review/{queue[0]['id']}", json={"decision": "link", "reason": "same child, nickname"}
    )
    assert r.status_code == 200 and r.json()["decided_by"] == "test" and r.json()["status"] == "linked"
    assert (
        client.post(
            f"/api/identity/review/{queue[0]['id']}", json={"decision": "reject", "reason": "x"}
        ).status_code
        == 409
    )
    rec = client.get("/api/identity/records", params={"issuer": "ISSUER-B", "value": "B1"}).json()
    why = client.get(f"/api/identity/records/{rec['id']}/explain").json()
    assert (
        why["history"][-1]["method"] == "manual-link" and why["history"][-1]["why"] == "same child, nickname"
    )
    r = client.post("/api/identity/unlink", json={"record_id": rec["id"], "reason": "mistake"})
    assert r.status_code == 200 and r.json()["person_id"] != why["person_id"]


def test_update_by_id(client: TestClient) -> None:
    body = _patient("urn:oid:1.2.826.0.1.99", "C-1", "Okafor", ["Chidi"], "1990-03-04")
    created = client.post("/fhir/Patient", json=body).json()
    body["telecom"] = [{"system": "phone", "value": "+44 20 7946 0000"}]
    r = client.put(f"/fhir/Patient/{created['id']}", json=body)
    assert r.status_code == 200, r.text
    updated = FhirPatient.model_validate(r.json())
    assert updated.telecom and updated.telecom[0].value == "442079460000"
    other = _patient("urn:oid:1.2.826.0.1.99", "C-2", "Okafor", ["Chidi"], "1990-03-04")
    assert "does not belong" in _outcome(client.put(f"/fhir/Patient/{created['id']}", json=other), 404)
    r = client.get(f"/fhir/Patient/{created['id']}")
    assert FhirPatient.model_validate(r.json()).birthDate.isoformat() == "1990-03-04"  # type: ignore[union-attr]


def test_an_issuer_with_a_space_is_a_valid_uri_system_both_ways(client: TestClient) -> None:
    """HL7 namespace IDs such as "St Mary Hospital" are issuers too: the system the broker gives
    for them must be a URI (percent-encoded), and the one a client sends back must find them,
    encoded or (as typed) not."""
    system = "urn:scanonce:issuer:St%20Mary%20Hospital"
    r = client.post(
        "/fhir/Patient",
        json=_patient(system, "S1", "Okafor", ["Ada"], "1990-02-03", gender="female"),
        headers={"content-type": FHIR},
    )
    assert r.status_code == 201, r.text
    created = FhirPatient.model_validate(r.json())
    assert (system, "S1") in {(i.system, i.value) for i in created.identifier or []}
    for sent in (system, "urn:scanonce:issuer:St Mary Hospital"):
        found = client.get("/fhir/Patient", params={"identifier": f"{sent}|S1"})
        assert found.status_code == 200, found.text
        bundle = Bundle.model_validate(found.json())
        assert len(bundle.entry or []) == 1, sent
        systems = {i["system"] for e in found.json()["entry"] for i in e["resource"]["identifier"]}
        assert system in systems and not any(" " in s for s in systems)


def test_a_patient_named_in_three_groups_has_a_human_name_for_each(client: TestClient, engine: Any) -> None:
    """chrH31.dcm (ISO 2022 IR 87), Yamada^Tarou=山田^太郎=やまだ^たろう: the MPI's name, then the
    Ideographic and Phonetic groups as the record wrote them, each with its ISO 21090
    representation. chrKoreanMulti.dcm (Hangul in the Alphabetic group alone) has its name."""
    from broker.index.service import ingest_files
    from broker.security.schemas import Principal, Role
    from tests.support import CHARSET_FILES

    store = client.app.state.scanonce.store  # type: ignore[attr-defined]
    for name in ("chrH31.dcm", "chrKoreanMulti.dcm"):
        (outcome,) = ingest_files(
            engine=engine,
            store=store,
            principal=Principal(who="test", role=Role.admin, facility="fac-a"),
            facility_id="fac-a",
            paths=[str(CHARSET_FILES / name)],
        )
        assert outcome.status == "stored", outcome.message
    r = client.get("/fhir/Patient", params={"identifier": "urn:scanonce:issuer:ISSUER-A|H31EXAMPLE"})
    assert r.status_code == 200, r.text
    Bundle.model_validate(r.json())
    (entry,) = r.json()["entry"]
    patient = FhirPatient.model_validate(entry["resource"])
    rep = "http://hl7.org/fhir/StructureDefinition/iso21090-EN-representation"
    assert [
        (n.extension[0].valueCode if n.extension else None, n.family, n.given, n.text)
        for n in patient.name or []
    ] == [
        ("ABC", "YAMADA", ["TAROU"], None),
        ("IDE", "山田", ["太郎"], "山田 太郎"),
        ("SYL", "やまだ", ["たろう"], "やまだ たろう"),
    ]
    assert all(n.extension[0].url == rep for n in patient.name or [] if n.extension)
    read = client.get(f"/fhir/Patient/{patient.id}").json()
    assert read["name"] == r.json()["entry"][0]["resource"]["name"]
    korean = client.get("/fhir/Patient", params={"family": "김희중"}).json()
    assert [e["resource"]["name"] for e in korean["entry"]] == [[{"use": "official", "family": "김희중"}]]


@pytest.mark.parametrize(
    ("params", "found"),
    [
        ({"family": "山田"}, ["H31EXAMPLE"]),  # the Ideographic group
        ({"family": "やまだ", "given": "たろう"}, ["H31EXAMPLE"]),  # the Phonetic group
        ({"given": "太郎"}, ["H31EXAMPLE"]),
        ({"family": "山田", "given": "花子"}, []),
        ({"family": "YAMADA"}, ["H31EXAMPLE"]),  # the MPI's name, as before
        ({"family": "yama"}, ["H31EXAMPLE"]),
        ({"family": "田中"}, []),
    ],
)
def test_pdqm_finds_a_patient_by_any_component_group_of_its_name(
    client: TestClient, engine: Any, params: dict[str, str], found: list[str]
) -> None:
    """GET /fhir/Patient?family=山田 finds Yamada^Tarou=山田^太郎=やまだ^たろう (chrH31.dcm): PDQm's
    family and given match each of a Patient's names, and this Patient has one per group."""
    from broker.index.service import ingest_files
    from broker.security.schemas import Principal, Role
    from tests.support import CHARSET_FILES

    store = client.app.state.scanonce.store  # type: ignore[attr-defined]
    (outcome,) = ingest_files(
        engine=engine,
        store=store,
        principal=Principal(who="test", role=Role.admin, facility="fac-a"),
        facility_id="fac-a",
        paths=[str(CHARSET_FILES / "chrH31.dcm")],
    )
    assert outcome.status == "stored", outcome.message
    r = client.get("/fhir/Patient", params=params)
    assert r.status_code == 200, r.text
    bundle = r.json()
    Bundle.model_validate(bundle)
    assert [i["value"] for e in bundle.get("entry", []) for i in e["resource"]["identifier"]] == found
    for entry in bundle.get("entry", []):
        names = entry["resource"]["name"]
        assert [n.get("family") for n in names] == ["YAMADA", "山田", "やまだ"]


REP = "http://hl7.org/fhir/StructureDefinition/iso21090-EN-representation"


def _named(code: str | None, family: str, given: str) -> dict[str, Any]:
    """A HumanName, marked with an ISO 21090 representation unless `code` is None."""
    name: dict[str, Any] = {"use": "official", "family": family, "given": [given]}
    if code is not None:
        name["extension"] = [{"url": REP, "valueCode": code}]
    return name


def _feed_japanese(client: TestClient, *names: dict[str, Any]) -> Any:
    body = _patient("urn:oid:1.2.392.99", "JP-7", "", [], "1980-04-01")
    body["name"] = [_named("ABC", "Yamada", "Tarou"), *names]
    r = client.post("/fhir/Patient", json=body, headers={"Content-Type": FHIR})
    assert r.status_code in (200, 201), r.text
    return r


def _pdq(client: TestClient, **params: str) -> list[str]:
    r = client.get("/fhir/Patient", params=params)
    assert r.status_code == 200, r.text
    return [i["value"] for e in r.json().get("entry", []) for i in e["resource"]["identifier"]]


def test_a_fed_ideographic_name_is_found_by_pdqm_and_kept_by_an_update_without_one(
    client: TestClient,
) -> None:
    """A registration system sends 山田 as an IDE HumanName: PDQm family=山田 finds the patient
    (before, only a DICOM header could supply it); a later feed with the Alphabetic name alone
    keeps it, as a feed that never sends such names must not erase them."""
    _feed_japanese(client, _named("IDE", "山田", "太郎"), _named("SYL", "やまだ", "たろう"))
    assert _pdq(client, family="山田") == ["JP-7"]
    assert _pdq(client, family="やまだ", given="たろう") == ["JP-7"]
    assert _pdq(client, family="YAMADA", given="TAROU") == ["JP-7"]  # the record's name, as before
    _feed_japanese(client)
    assert _pdq(client, family="山田") == ["JP-7"]
    assert _pdq(client, family="YAMADA") == ["JP-7"]


def test_a_fed_ideographic_name_replaces_the_stored_one(client: TestClient) -> None:
    _feed_japanese(client, _named("IDE", "山田", "太郎"))
    _feed_japanese(client, _named("IDE", "山本", "太郎"))
    assert _pdq(client, family="山田") == []
    assert _pdq(client, family="山本") == ["JP-7"]


def test_a_feed_keeps_the_record_name_from_the_name_without_a_representation(client: TestClient) -> None:
    """The IDE name listed first is not the record's name: the unmarked one is."""
    body = _patient("urn:oid:1.2.392.99", "JP-8", "", [], "1980-04-01")
    body["name"] = [_named("IDE", "山田", "花子"), _named(None, "Yamada", "Hanako")]
    r = client.post("/fhir/Patient", json=body, headers={"Content-Type": FHIR})
    assert r.status_code == 201, r.text
    assert r.json()["name"][0]["family"] == "YAMADA"
    assert _pdq(client, family="山田", given="花子") == ["JP-8"]


@pytest.mark.parametrize(
    "name",
    [
        _named("XYZ", "山田", "太郎"),  # a representation the broker does not know
        {"use": "official", "text": "山田 太郎", "extension": [{"url": REP, "valueCode": "IDE"}]},
    ],
)
def test_an_unknown_representation_or_an_empty_ide_name_is_ignored(
    client: TestClient, name: dict[str, Any]
) -> None:
    _feed_japanese(client, name)
    assert _pdq(client, family="山田") == []
    assert _pdq(client, family="YAMADA") == ["JP-7"]


def _shown(code: str, family: str, given: str) -> dict[str, Any]:
    """A HumanName as a Patient shows one of a person's other names."""
    return {
        "extension": [{"url": REP, "valueCode": code}],
        "use": "official",
        "family": family,
        "given": [given],
        "text": f"{family} {given}",
    }


def test_a_read_gives_back_the_ideographic_and_phonetic_names_a_feed_sent(client: TestClient) -> None:
    """A registration system sends 山田 and やまだ as IDE and SYL HumanNames and no study names
    the patient: the read and PDQm show them, marked as the feed marked them (before, they were
    searched by but never given back: the Patient had the Alphabetic name alone), and the read
    sent back as an update keeps them."""
    created = _feed_japanese(client, _named("IDE", "山田", "太郎"), _named("SYL", "やまだ", "たろう")).json()
    expected = [
        {"extension": [{"url": REP, "valueCode": "ABC"}], "use": "official", "family": "YAMADA",
         "given": ["TAROU"]},
        _shown("IDE", "山田", "太郎"),
        _shown("SYL", "やまだ", "たろう"),
    ]  # fmt: skip
    read = client.get(f"/fhir/Patient/{created['id']}")
    assert read.status_code == 200, read.text
    assert FhirPatient.model_validate(read.json()).name is not None
    assert read.json()["name"] == expected
    for params in ({"family": "山田"}, {"family": "やまだ", "given": "たろう"}, {"family": "YAMADA"}):
        bundle = client.get("/fhir/Patient", params=params).json()
        assert [e["resource"]["name"] for e in bundle["entry"]] == [expected], params
    r = client.put(f"/fhir/Patient/{created['id']}", json=read.json(), headers={"Content-Type": FHIR})
    assert r.status_code == 200, r.text
    assert client.get(f"/fhir/Patient/{created['id']}").json()["name"] == expected
    assert _pdq(client, family="山田") == ["JP-7"]


def test_a_name_a_feed_and_a_header_both_give_is_shown_once(client: TestClient, engine: Any) -> None:
    """Yamada^Tarou=山田^太郎=やまだ^たろう in a study's header (chrH31.dcm), then a feed for the
    same identifier with 山田 太郎 (the header's) and ヤマダ タロウ (its own): the header's groups
    as written, as before, and the feed's name no header has after them."""
    from broker.index.service import ingest_files
    from broker.security.schemas import Principal, Role
    from tests.support import CHARSET_FILES

    store = client.app.state.scanonce.store  # type: ignore[attr-defined]
    (outcome,) = ingest_files(
        engine=engine,
        store=store,
        principal=Principal(who="test", role=Role.admin, facility="fac-a"),
        facility_id="fac-a",
        paths=[str(CHARSET_FILES / "chrH31.dcm")],
    )
    assert outcome.status == "stored", outcome.message
    body = _patient("urn:scanonce:issuer:ISSUER-A", "H31EXAMPLE", "", [], "1980-04-01")
    body["name"] = [
        _named("ABC", "Yamada", "Tarou"),
        _named("IDE", "山田", "太郎"),
        _named("SYL", "ヤマダ", "タロウ"),
    ]
    r = client.post("/fhir/Patient", json=body, headers={"Content-Type": FHIR})
    assert r.status_code == 200, r.text
    read = client.get(f"/fhir/Patient/{r.json()['id']}").json()
    assert [(n["extension"][0]["valueCode"], n.get("family"), n.get("given")) for n in read["name"]] == [
        ("ABC", "YAMADA", ["TAROU"]),
        ("IDE", "山田", ["太郎"]),
        ("SYL", "やまだ", ["たろう"]),
        ("SYL", "ヤマダ", ["タロウ"]),
    ]
    assert _pdq(client, family="ヤマダ") == _pdq(client, family="山田") == ["H31EXAMPLE"]


def _read_after(client: TestClient, written: Any) -> dict[str, Any]:
    """The read of the Patient a create or update answered: its Location names it."""
    assert written.headers["Location"] == f"/fhir/Patient/{written.json()['id']}"
    read = client.get(written.headers["Location"])
    assert read.status_code == 200, read.text
    return dict(read.json())


def _japanese(
    value: str, *names: dict[str, Any], abc: tuple[str, str] = ("Yamada", "Tarou")
) -> dict[str, Any]:
    body = _patient("urn:oid:1.2.392.99", value, "", [], "1980-04-01" if abc[0] == "Yamada" else "1975-09-30")
    body["name"] = [_named("ABC", *abc), *names]
    return body


def test_a_create_or_update_answers_the_patient_a_read_then_gives(client: TestClient) -> None:
    """A registration system posts 山田 and やまだ as IDE and SYL HumanNames, then updates the
    patient by id and conditionally: each answer's body is the Patient the next read gives, its
    other names included (before, an answer had the Alphabetic name alone, so a client reading
    the resource back from the answer saw less than a read shows). 201 for a create, 200 for an
    update, 201 for a conditional update that created."""
    body = _japanese("JP-20", _named("IDE", "山田", "太郎"), _named("SYL", "やまだ", "たろう"))
    created = client.post("/fhir/Patient", json=body, headers={"Content-Type": FHIR})
    assert created.status_code == 201, created.text
    read = _read_after(client, created)
    assert [n.get("family") for n in read["name"]] == ["YAMADA", "山田", "やまだ"]
    assert created.json() == read
    body["telecom"] = [{"system": "phone", "value": "+81 3 1234 5678"}]
    updated = client.put(f"/fhir/Patient/{read['id']}", json=body, headers={"Content-Type": FHIR})
    assert updated.status_code == 200, updated.text
    assert updated.json() == _read_after(client, updated)
    assert updated.json()["telecom"] == [{"system": "phone", "value": "81312345678"}]
    hanako = ("Yamamoto", "Hanako")  # another patient: no link to JP-20
    conditional = client.put(
        "/fhir/Patient",
        params={"identifier": "urn:oid:1.2.392.99|JP-21"},
        json=_japanese("JP-21", _named("IDE", "山本", "花子"), abc=hanako),
        headers={"Content-Type": FHIR},
    )
    assert conditional.status_code == 201, conditional.text
    assert conditional.json() == _read_after(client, conditional)
    assert [n.get("family") for n in conditional.json()["name"]] == ["YAMAMOTO", "山本"]
    again = client.put(
        "/fhir/Patient",
        params={"identifier": "urn:oid:1.2.392.99|JP-21"},
        json=_japanese("JP-21", _named("SYL", "やまもと", "はなこ"), abc=hanako),
        headers={"Content-Type": FHIR},
    )
    assert again.status_code == 200, again.text
    assert again.json() == _read_after(client, again)
    assert [n.get("family") for n in again.json()["name"]] == ["YAMAMOTO", "やまもと"]


def test_a_feed_for_a_study_s_patient_answers_the_header_s_names_as_a_read_does(
    client: TestClient, engine: Any
) -> None:
    """Yamada^Tarou=山田^太郎=やまだ^たろう in a study's header (chrH31.dcm), then a feed for its
    identifier that sends ヤマダ タロウ: the answer shows the header's groups as written and the
    fed name, as the read does."""
    from broker.index.service import ingest_files
    from broker.security.schemas import Principal, Role
    from tests.support import CHARSET_FILES

    store = client.app.state.scanonce.store  # type: ignore[attr-defined]
    (outcome,) = ingest_files(
        engine=engine,
        store=store,
        principal=Principal(who="test", role=Role.admin, facility="fac-a"),
        facility_id="fac-a",
        paths=[str(CHARSET_FILES / "chrH31.dcm")],
    )
    assert outcome.status == "stored", outcome.message
    body = _patient("urn:scanonce:issuer:ISSUER-A", "H31EXAMPLE", "", [], "1980-04-01")
    body["name"] = [_named("ABC", "Yamada", "Tarou"), _named("SYL", "ヤマダ", "タロウ")]
    r = client.post("/fhir/Patient", json=body, headers={"Content-Type": FHIR})
    assert r.status_code == 200, r.text
    assert r.json() == _read_after(client, r)
    assert [n.get("family") for n in r.json()["name"]] == ["YAMADA", "山田", "やまだ", "ヤマダ"]


def test_the_answer_of_a_write_put_back_keeps_the_names_and_answers_the_same(client: TestClient) -> None:
    """A client that PUTs back the Patient a create answered, then the one that update answered,
    keeps the other names and gets the same Patient back each time (the read's)."""
    body = _japanese("JP-22", _named("IDE", "山田", "太郎"), _named("SYL", "やまだ", "たろう"))
    answer = client.post("/fhir/Patient", json=body, headers={"Content-Type": FHIR}).json()
    first = client.get(f"/fhir/Patient/{answer['id']}").json()
    for _ in range(2):
        r = client.put(f"/fhir/Patient/{answer['id']}", json=answer, headers={"Content-Type": FHIR})
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer == first == client.get(f"/fhir/Patient/{answer['id']}").json()
    assert _pdq(client, family="やまだ") == ["JP-22"]


def test_a_feeder_that_may_not_see_the_patient_back_is_answered_what_it_sent(
    client: TestClient, engine: Any
) -> None:
    """Facility B feeds a patient of facility A who opted out of sharing there: consent does not
    let it see the Patient, so the answer is what it sent, its IDE name included (before, the
    Alphabetic name alone), and nothing of A's record (the header's sex)."""
    from tests.support import auth_headers

    with Session(engine) as s:
        person = ingest_patient(s, "fac-a", "A9", "YAMADA^TAROU", "19800401", "M").person_id
    consent = {
        "resourceType": "Consent",
        "status": "active",
        "scope": {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}
            ]
        },
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": f"Patient/{person}"},
        "organization": [{"reference": "Organization/fac-a"}],
        "provision": {"type": "deny"},
    }
    assert client.post("/fhir/Consent", json=consent, headers={"Content-Type": FHIR}).status_code == 201
    body = _patient("urn:scanonce:issuer:ISSUER-A", "A9", "", [], "1980-04-01")
    body["name"] = [_named("ABC", "Yamada", "Tarou"), _named("IDE", "山田", "太郎")]
    r = client.post(
        "/fhir/Patient",
        json=body,
        headers={**auth_headers("facility", facility="fac-b"), "Content-Type": FHIR},
    )
    assert r.status_code == 200, r.text
    FhirPatient.model_validate(r.json())
    assert r.json() == {
        "resourceType": "Patient",
        "id": str(person),
        "identifier": [{"system": "urn:scanonce:issuer:ISSUER-A", "value": "A9"}],
        "active": True,
        "name": [
            {
                "extension": [{"url": REP, "valueCode": "ABC"}],
                "use": "official",
                "family": "YAMADA",
                "given": ["TAROU"],
            },
            _shown("IDE", "山田", "太郎"),
        ],
        "birthDate": "1980-04-01",
    }


def test_an_update_whose_body_names_another_patient_is_refused(client: TestClient) -> None:
    """FHIR update: a body whose id is not the URL's is a 400, and nothing is stored (before, the
    id was not looked at and the update was applied to the URL's Patient)."""
    body = _patient("urn:oid:1.2.826.0.1.99", "C-31", "Okafor", ["Chidi"], "1990-03-04")
    created = client.post("/fhir/Patient", json=body).json()
    other = client.post(
        "/fhir/Patient", json=_patient("urn:oid:1.2.826.0.1.99", "C-32", "Adeyemi", ["Bola"], "1971-06-07")
    ).json()
    sent = {**created, "id": other["id"], "telecom": [{"system": "phone", "value": "+44 20 7946 0000"}]}
    assert "not the id in the URL" in _outcome(client.put(f"/fhir/Patient/{created['id']}", json=sent), 400)
    assert client.get(f"/fhir/Patient/{created['id']}").json() == created
    # The id the URL names, or none, is an update as before.
    for same in ({**sent, "id": created["id"]}, {k: v for k, v in sent.items() if k != "id"}):
        r = client.put(f"/fhir/Patient/{created['id']}", json=same)
        assert r.status_code == 200, r.text
