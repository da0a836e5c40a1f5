"""FHIR R4 ImagingStudy search on the demo data, through a real FHIR client (fhirpy) over HTTP,
every answer validated with fhir.resources' R4B models; SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.operationoutcome import OperationOutcome
from fhirpy import SyncFHIRClient
from fhirpy.base.exceptions import OperationOutcome as ClientOperationOutcome
from fhirpy.base.searchset import Raw

from tests.dicomweb.conftest import LiveServer
from tests.live_demo import (
    ADULT_ISSUER,
    ADULT_MRN,
    BACKENDS,
    CHILD_ISSUER,
    CHILD_MRN,
    CHILD_ST_MARYS_MRN,
    demo_server,
)
from tests.support import auth_headers

FHIR = "application/fhir+json"
CHILD = f"urn:scanonce:issuer:{CHILD_ISSUER}|{CHILD_MRN}"
ABDOMEN_SCT = "818981001"


@pytest.fixture(scope="module", params=BACKENDS)
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with demo_server(request, tmp_path_factory.mktemp("fhir")) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: LiveServer) -> SyncFHIRClient:
    return SyncFHIRClient(f"{server.origin}/fhir", authorization=auth_headers()["Authorization"])


@pytest.fixture(scope="module")
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.origin, timeout=30, trust_env=False, headers=auth_headers()) as c:
        yield c


def _bundle(http: httpx.Client, params: Any) -> Bundle:
    r = http.get("/fhir/ImagingStudy", params=params)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith(FHIR)
    return Bundle.model_validate(r.json())


def _bundle_of(r: httpx.Response) -> Bundle:
    assert r.status_code == 200, r.text
    return Bundle.model_validate(r.json())


def _studies(bundle: Bundle) -> list[ImagingStudy]:
    return [
        ImagingStudy.model_validate(e.resource.model_dump(mode="json"))
        for e in bundle.entry or []
        if e.resource is not None and e.resource.get_resource_type() == "ImagingStudy"
    ]


def _outcome(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(FHIR)
    return str(OperationOutcome.model_validate(r.json()).issue[0].diagnostics)


def _child_person(http: httpx.Client) -> str:
    found = http.get("/fhir/Patient", params={"identifier": CHILD}).json()
    return str(found["entry"][0]["resource"]["id"])


def test_the_childs_studies_at_every_facility_newest_first(
    client: SyncFHIRClient, http: httpx.Client
) -> None:
    found = client.resources("ImagingStudy").search(subject__Patient__identifier=CHILD).fetch_all()
    assert found, "the demo child has studies"
    studies = [ImagingStudy.model_validate(r.serialize()) for r in found]
    facilities = {i.assigner.display for s in studies for i in s.identifier or [] if i.assigner is not None}
    # Linked to the same person: the children's hospital and St Mary's, under two MRNs.
    assert {"Children's Hospital", "St Mary's Hospital"} <= facilities
    subjects = {(s.subject.identifier.system, s.subject.identifier.value) for s in studies}
    assert ("urn:scanonce:issuer:ST-MARYS", CHILD_ST_MARYS_MRN) in subjects
    assert len({s.subject.reference for s in studies}) == 1  # one Patient: the person
    started = [str(s.started) for s in studies]
    assert started == sorted(started, reverse=True)
    ct = next(s for s in studies if str(s.started) == "2026-06-16")
    assert ct.description and "ABDOMEN" in ct.description
    assert {c.code for c in ct.modality or []} >= {"CT"}
    assert ct.numberOfSeries == len(ct.series or []) and ct.numberOfInstances
    assert any(
        se.bodySite and se.bodySite.code == ABDOMEN_SCT and se.modality.code == "CT" for se in ct.series or []
    )
    # The same person through the other spellings of the parameter, and by Patient reference.
    via_patient_id = _bundle(http, {"patient.identifier": CHILD, "_count": 100})
    via_reference = _bundle(http, {"patient": f"Patient/{_child_person(http)}", "_count": 100})
    ids = {s.id for s in studies}
    assert {s.id for s in _studies(via_patient_id)} == ids == {s.id for s in _studies(via_reference)}
    assert via_patient_id.total == len(ids)


def test_the_endpoint_serves_the_study_over_dicomweb(http: httpx.Client) -> None:
    study = _studies(_bundle(http, {"patient.identifier": CHILD, "_count": 1}))[0]
    contained: dict[str | None, Any] = {c.id: c for c in study.contained or []}
    ref = study.endpoint[0].reference
    assert ref.startswith("#")
    endpoint = contained[ref[1:]]
    assert endpoint.get_resource_type() == "Endpoint"
    assert endpoint.connectionType.code == "dicom-wado-rs"
    r = httpx.get(
        f"{endpoint.address}/studies/{study.id}/series",
        headers={"accept": "application/dicom+json", **auth_headers()},
        timeout=30,
    )
    assert r.status_code == 200
    assert {s["0020000E"]["Value"][0] for s in r.json()} == {se.uid for se in study.series or []}
    uid_ident = next(i for i in study.identifier or [] if i.system == "urn:dicom:uid")
    assert uid_ident.value == f"urn:oid:{study.id}"


def test_paging_through_a_real_client(client: SyncFHIRClient, http: httpx.Client) -> None:
    search = client.resources("ImagingStudy").search(Raw(**{"patient.identifier": CHILD}))
    everything = search.limit(100).fetch()
    paged = search.limit(2).fetch_all()  # follows the Bundle's next links
    assert [r.id for r in paged] == [r.id for r in everything]
    assert search.count() == len(everything) > 2
    first = _bundle(http, {"patient.identifier": CHILD, "_count": 2})
    relations = {link.relation: link.url for link in first.link or []}
    assert "next" in relations and "previous" not in relations
    second = Bundle.model_validate(
        httpx.get(str(relations["next"]), timeout=30, headers=auth_headers()).json()
    )
    assert {link.relation for link in second.link or []} >= {"previous"}
    assert not {s.id for s in _studies(first)} & {s.id for s in _studies(second)}
    # _count=0 (and _summary=count): the total alone.
    only_total = _bundle(http, {"patient.identifier": CHILD, "_count": 0})
    assert only_total.total == len(everything) and not only_total.entry


def test_started_modality_bodysite_and_sort(client: SyncFHIRClient, http: httpx.Client) -> None:
    base = client.resources("ImagingStudy").search(Raw(**{"patient.identifier": CHILD})).limit(100)
    june = base.search(started__ge="2026-06-01", started__le="2026-06-30").fetch()
    assert [r["started"] for r in june] == ["2026-06-16"]
    assert [r["started"] for r in base.search(started="2026-06").fetch()] == ["2026-06-16"]
    assert [r["started"] for r in base.search(started="eq2026-06-16").fetch()] == ["2026-06-16"]
    assert "2026-06-16" not in [r["started"] for r in base.search(started__gt="2026-06-16").fetch()]
    assert "2026-06-16" in [r["started"] for r in base.search(started__lt="2026-06-17").fetch()]
    assert base.search(started__gt="2026-06-16", started__lt="2026-06-17").fetch() == []
    everything = base.fetch()
    cts = base.search(modality="http://dicom.nema.org/resources/ontology/DCM|CT").fetch()
    assert cts and all(any(m["code"] == "CT" for m in r["modality"]) for r in cts)
    assert len(cts) < len(everything)
    assert base.search(modality="http://loinc.org|CT").fetch() == []
    abdomen = base.search(bodysite=f"http://snomed.info/sct|{ABDOMEN_SCT}").fetch()
    assert abdomen and all(
        any(se.get("bodySite", {}).get("code") == ABDOMEN_SCT for se in r["series"]) for r in abdomen
    )
    assert [r.id for r in base.search(bodysite="ABDOMEN").fetch()] == [r.id for r in abdomen]
    oldest_first = base.sort("started").fetch()
    assert [r["started"] for r in oldest_first] == sorted(r["started"] for r in everything)
    assert {r.id for r in oldest_first} == {r.id for r in everything}
    assert [r["started"] for r in everything] == sorted((r["started"] for r in everything), reverse=True)


def test_started_at_the_ends_of_the_calendar(http: httpx.Client) -> None:
    child: dict[str, str] = {"patient.identifier": CHILD, "_count": "100"}
    everything = _bundle(http, child).total
    assert everything
    # Nothing lies before year 1 or after 9999; everything after year 999.
    assert _bundle(http, {**child, "started": "lt0001-01-01"}).total == 0
    assert _bundle(http, {**child, "started": "gt9999-12-31"}).total == 0
    assert _bundle(http, {**child, "started": "sa9999"}).total == 0
    assert _bundle(http, {**child, "started": "ge0999-01-01"}).total == everything
    assert _bundle(http, {**child, "started": "le0999-12-31"}).total == 0
    # A date-time's time must be a time.
    assert "not a FHIR date" in _outcome(
        http.get("/fhir/ImagingStudy", params={**child, "started": "ge2026-06-16T25:99"}), 400
    )


def test_identifier_and_read(http: httpx.Client) -> None:
    study = _studies(_bundle(http, {"patient.identifier": CHILD, "_count": 1}))[0]
    by_uid = _studies(_bundle(http, {"identifier": f"urn:dicom:uid|urn:oid:{study.id}"}))
    assert [s.id for s in by_uid] == [study.id]
    accession = next(i.value for i in study.identifier or [] if i.type is not None)
    assert [s.id for s in _studies(_bundle(http, {"identifier": accession}))] == [study.id]
    r = http.get(f"/fhir/ImagingStudy/{study.id}")
    assert r.status_code == 200 and ImagingStudy.model_validate(r.json()).id == study.id
    assert "ImagingStudy" in _outcome(http.get("/fhir/ImagingStudy/1.2.3.999"), 404)


@pytest.mark.parametrize("value", ["*", "?*", "|*", "urn:dicom:uid|urn:oid:*", "urn:dicom:uid|*"])
def test_an_identifier_search_is_exact_never_a_network_wide_listing(http: httpx.Client, value: str) -> None:
    # A FHIR token matches exactly; passed on as a DICOM match value, `*` would be universal
    # matching: every study of the network, which a search without its patient must not give.
    r = http.get("/fhir/ImagingStudy", params={"identifier": value})
    if r.status_code == 200:
        assert Bundle.model_validate(r.json()).total == 0
    else:
        assert "identifier" in _outcome(r, 400)


def test_an_adult_is_not_the_child(http: httpx.Client) -> None:
    adult = _studies(
        _bundle(
            http, {"patient.identifier": f"urn:scanonce:issuer:{ADULT_ISSUER}|{ADULT_MRN}", "_count": 100}
        )
    )
    child = _studies(_bundle(http, {"patient.identifier": CHILD, "_count": 100}))
    assert adult and not {s.id for s in adult} & {s.id for s in child}
    # Both patients at once (commas OR); both parameters at once (AND): nobody is both.
    both = _bundle(
        http,
        {"patient.identifier": f"{CHILD},urn:scanonce:issuer:{ADULT_ISSUER}|{ADULT_MRN}", "_count": 100},
    )
    assert both.total == len(adult) + len(child)
    r = http.get(
        "/fhir/ImagingStudy",
        params=[
            ("patient.identifier", CHILD),
            ("patient.identifier", f"urn:scanonce:issuer:{ADULT_ISSUER}|{ADULT_MRN}"),
        ],
    )
    assert Bundle.model_validate(r.json()).total == 0


def test_unknown_patient_is_an_empty_bundle_not_an_error(http: httpx.Client) -> None:
    bundle = _bundle(http, {"patient.identifier": f"urn:scanonce:issuer:{CHILD_ISSUER}|NO-SUCH"})
    assert bundle.total == 0
    outcome = [e for e in bundle.entry or [] if e.search and e.search.mode == "outcome"]
    assert outcome and "no patient" in str(outcome[0].resource.issue[0].diagnostics)
    # An unknown Patient reference is answered the same way, with the information entry.
    for ref in ("Patient/999999", "Patient/not-one-of-ours"):
        bundle = _bundle(http, {"patient": ref})
        assert bundle.total == 0
        outcome = [e for e in bundle.entry or [] if e.search and e.search.mode == "outcome"]
        assert outcome and "no patient" in str(outcome[0].resource.issue[0].diagnostics)


@pytest.mark.parametrize("person", ["99999999999999999999999", "\u00b2", "\u0661"])
def test_a_patient_id_that_is_no_id_of_ours_names_no_one(http: httpx.Client, person: str) -> None:
    # Too large for the database's integer, or digits Python reads but the ids are not made of.
    assert _bundle(http, {"patient": f"Patient/{person}"}).total == 0
    assert "Patient" in _outcome(http.get(f"/fhir/Patient/{person}"), 404)
    r = http.get("/fhir/Consent", params={"patient": f"Patient/{person}"})
    assert r.status_code == 200 and Bundle.model_validate(r.json()).total == 0


@pytest.mark.parametrize(
    ("params", "says"),
    [
        ({"patient.identifier": CHILD_MRN}, "system|value"),
        ({"started": "ge2026-01-01"}, "needs its patient"),
        ({"patient.identifier": CHILD, "started": "ne2026-01-01"}, "'ne'"),
        ({"patient.identifier": CHILD, "started": "2026-13-01"}, "not a valid date"),
        ({"patient.identifier": CHILD, "started": "yesterday"}, "not a FHIR date"),
        ({"patient.identifier": CHILD, "_count": "many"}, "_count"),
        ({"patient.identifier": CHILD, "_count": "100000"}, "_count"),
        ({"patient.identifier": CHILD, "_sort": "-_lastUpdated"}, "_sort"),
        ({"patient.identifier": CHILD, "modality": "C T;"}, "modality"),
        ({"patient.identifier": CHILD, "name": "DOE"}, "unsupported search parameter"),
        ({"patient": "Observation/1"}, "Patient"),
    ],
)
def test_bad_search_parameters_are_operation_outcomes(
    http: httpx.Client, params: dict[str, str], says: str
) -> None:
    assert says in _outcome(http.get("/fhir/ImagingStudy", params=params), 400)


def test_every_fhir_error_is_an_operation_outcome(http: httpx.Client) -> None:
    # Refused before the route runs (parameter validation, no such route, method): still FHIR.
    assert "_count" in _outcome(http.get("/fhir/Patient", params={"family": "DOE", "_count": "many"}), 400)
    _outcome(http.get("/fhir/Observation", params={"patient": "Patient/1"}), 404)
    _outcome(http.delete("/fhir/ImagingStudy/1.2.3"), 405)
    # Refused by the guard in front of every route (no token, a bad one): FHIR too.
    search = f"{str(http.base_url).rstrip('/')}/fhir/ImagingStudy"
    r = httpx.get(search, params={"patient.identifier": CHILD}, timeout=30)
    assert "token" in _outcome(r, 401) and r.headers["www-authenticate"].startswith("Bearer")
    r = httpx.get(
        search, params={"patient.identifier": CHILD}, headers={"authorization": "Bearer x"}, timeout=30
    )
    _outcome(r, 401)


def test_pretty_is_taken_as_fhir_defines_it_for_every_interaction(http: httpx.Client) -> None:
    # _format and _pretty are FHIR's parameters of every interaction, not search criteria: a client
    # sending _pretty=true is not refused as naming an unsupported search parameter.
    assert _bundle(http, {"patient.identifier": CHILD, "_pretty": "true"}).total
    r = http.get("/fhir/Patient", params={"identifier": CHILD, "_pretty": "true"})
    assert r.status_code == 200 and Bundle.model_validate(r.json()).total == 1


@pytest.mark.parametrize(
    ("params", "accept"),
    [
        ({"_format": "xml"}, None),
        ({"_format": "application/fhir+xml"}, None),
        ({}, "application/fhir+xml"),
        ({}, "application/xml, text/turtle;q=0.5"),
        ({}, "application/fhir+json;q=0, application/fhir+xml"),
    ],
)
def test_a_format_other_than_json_is_not_acceptable(
    http: httpx.Client, params: dict[str, str], accept: str | None
) -> None:
    # FHIR's http page: 406 when the Accept header (or _format, which stands in for it) asks for
    # a format the server does not serve; an XML client must not be handed JSON as if it were.
    headers = {"accept": accept} if accept else {}
    for path, query in (
        ("/fhir/ImagingStudy", {"patient.identifier": CHILD}),
        ("/fhir/metadata", {}),
        ("/fhir/Patient", {"identifier": CHILD}),
    ):
        assert "JSON" in _outcome(http.get(path, params={**query, **params}, headers=headers), 406)
    # JSON in any of its spellings, or anything, is served.
    for fmt in ("json", "application/json", "application/fhir+json"):
        _bundle(http, {"patient.identifier": CHILD, "_format": fmt})
    for accept_ok in ("application/fhir+json", "application/json", "*/*", "application/fhir+xml, */*;q=0.1"):
        r = http.get("/fhir/metadata", headers={"accept": accept_ok})
        assert r.status_code == 200, accept_ok


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/fhir/ImagingStudy", {"patient.identifier": f"{CHILD}\x00"}),
        ("/fhir/Patient", {"identifier": f"{CHILD}\x00"}),
        ("/fhir/Patient/$ihe-pix", {"sourceIdentifier": f"{CHILD}\x00"}),
    ],
)
def test_a_nul_character_names_no_one_and_is_no_fault(
    http: httpx.Client, path: str, params: dict[str, str]
) -> None:
    # PostgreSQL cannot hold a NUL in text, so no record carries one: found nowhere (SQLite) or
    # refused as the client's mistake (PostgreSQL), never the broker's 500.
    r = http.get(path, params=params)
    assert r.status_code in (200, 400, 404), r.text
    if r.status_code == 400:
        assert "NUL" in _outcome(r, 400)


def test_lenient_handling_ignores_unknown_parameters_and_says_so(
    http: httpx.Client, client: SyncFHIRClient
) -> None:
    r = http.get(
        "/fhir/ImagingStudy",
        params={"patient.identifier": CHILD, "_elements": "id"},
        headers={"prefer": "handling=lenient"},
    )
    bundle = Bundle.model_validate(r.json())
    assert bundle.total and any(
        e.search.mode == "outcome" and "_elements" in str(e.resource.issue[0].diagnostics)
        for e in bundle.entry or []
        if e.search
    )
    # The self link says what the search was processed with (FHIR search: the client checks it
    # to learn which criteria were not applied): not the ignored parameter, the same page.
    links = {link.relation: str(link.url) for link in bundle.link or []}
    assert "_elements" not in links["self"] and "patient.identifier" in links["self"]
    again = http.get(links["self"], headers={"prefer": "handling=strict"})
    assert _studies(_bundle_of(again)) == _studies(bundle)
    with pytest.raises(ClientOperationOutcome):
        client.resources("ImagingStudy").search(started__ne="2026-01-01").fetch()
    # The Patient search (PDQm) takes the same preference.
    params = {"identifier": CHILD, "_elements": "id"}
    assert "_elements" in _outcome(http.get("/fhir/Patient", params=params), 400)
    found = _bundle_of(http.get("/fhir/Patient", params=params, headers={"prefer": "handling=lenient"}))
    assert found.total == 1 and "_elements" not in str(found.link[0].url if found.link else "")


def test_capability_statement_names_the_imaging_study_search(http: httpx.Client) -> None:
    r = http.get("/fhir/metadata")
    assert r.status_code == 200 and r.headers["content-type"].startswith(FHIR)
    cs = CapabilityStatement.model_validate(r.json())
    resources = {res.type: res for res in cs.rest[0].resource or []}
    names = {str(p.name) for p in resources["ImagingStudy"].searchParam or []}
    assert {"patient", "identifier", "started", "modality", "bodysite"} <= names
    # Every parameter it announces is one the search takes (an unknown one would be a 400).
    for name in names - {"patient", "subject"}:
        r = http.get("/fhir/ImagingStudy", params={"patient.identifier": CHILD, name: "x"})
        assert "unsupported search parameter" not in r.text
