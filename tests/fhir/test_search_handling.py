"""FHIR search's handling of what a search does not support, and the http page's formats, on the
Consent and AuditEvent searches as on ImagingStudy and Patient: an unknown parameter is a 400
naming it unless `Prefer: handling=lenient`, which ignores it, says so and leaves it out of the
Bundle's self link; a format other than JSON is a 406. Answers validated with fhir.resources' R4B
models; SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest
from fastapi.testclient import TestClient
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.operationoutcome import OperationOutcome

from broker.app import create_app
from broker.settings import Settings
from tests.support import auth_headers

FHIR = "application/fhir+json"
LENIENT = {"prefer": "handling=lenient"}


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as c:
        yield c


def _outcome(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(FHIR)
    return str(OperationOutcome.model_validate(r.json()).issue[0].diagnostics)


def _bundle(r: httpx.Response) -> Bundle:
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith(FHIR)
    return Bundle.model_validate(r.json())


def _self(bundle: Bundle) -> list[tuple[str, str]]:
    """The parameters of the Bundle's self link: the search as the server processed it."""
    links = {link.relation: str(link.url) for link in bundle.link or []}
    return parse_qsl(urlsplit(links["self"]).query)


def _ignored(bundle: Bundle) -> str:
    return " ".join(
        str(issue.diagnostics)
        for e in bundle.entry or []
        if e.search is not None and e.search.mode == "outcome"
        for issue in e.resource.issue
    )


# (path, a search it answers, who may search it)
SEARCHES = [
    ("/fhir/Consent", {"patient": "Patient/1"}, "clinician"),
    ("/fhir/AuditEvent", {"patient": "NO-SUCH-PATIENT"}, "auditor"),
]


@pytest.mark.parametrize(("path", "search", "role"), SEARCHES)
def test_an_unknown_search_parameter_is_refused_naming_it(
    client: TestClient, path: str, search: dict[str, str], role: str
) -> None:
    # A misspelt or unsupported criterion ("status" is a Consent search parameter of R4 the
    # broker does not take) would otherwise widen the answer without the client knowing.
    headers = auth_headers(role)
    for extra in ({"status": "active"}, {"patinet": "Patient/2"}):
        said = _outcome(client.get(path, params={**search, **extra}, headers=headers), 400)
        assert next(iter(extra)) in said and "handling=lenient" in said
    # Strict handling, asked for by name, is the same refusal.
    strict = headers | {"prefer": "handling=strict"}
    assert "status" in _outcome(client.get(path, params={**search, "status": "x"}, headers=strict), 400)


@pytest.mark.parametrize(("path", "search", "role"), SEARCHES)
def test_lenient_handling_ignores_it_says_so_and_leaves_it_out_of_the_self_link(
    client: TestClient, path: str, search: dict[str, str], role: str
) -> None:
    headers = auth_headers(role)
    for prefer in ("handling=lenient", "respond-async, Handling = Lenient"):
        r = client.get(path, params={**search, "_elements": "id"}, headers=headers | {"prefer": prefer})
        bundle = _bundle(r)
        assert bundle.type == "searchset"
        assert "_elements" in _ignored(bundle)
        applied = _self(bundle)
        assert ("_elements", "id") not in applied and set(search.items()) <= set(applied)
        # The self link is a search the server takes as it stands (without the preference).
        again = client.get(str(bundle.link[0].url), headers=headers)
        assert not _ignored(_bundle(again))


@pytest.mark.parametrize(("path", "search", "role"), SEARCHES)
def test_format_and_pretty_are_taken_and_other_formats_are_not_acceptable(
    client: TestClient, path: str, search: dict[str, str], role: str
) -> None:
    headers = auth_headers(role)
    # FHIR's parameters of every interaction are no unknown search parameters.
    for extra in ({"_format": "json"}, {"_format": "application/fhir+json"}, {"_pretty": "true"}):
        _bundle(client.get(path, params={**search, **extra}, headers=headers))
    # FHIR's http page: 406 when only a format the server does not serve is acceptable.
    for extra, accept in (
        ({"_format": "xml"}, None),
        ({"_format": "application/fhir+xml"}, None),
        ({}, "application/fhir+xml"),
        ({}, "application/fhir+json;q=0, application/fhir+xml"),
    ):
        with_accept = headers | ({"accept": accept} if accept else {})
        assert "JSON" in _outcome(client.get(path, params={**search, **extra}, headers=with_accept), 406)
    for accept in ("application/fhir+json", "application/json", "*/*", "application/fhir+xml, */*;q=0.1"):
        _bundle(client.get(path, params=search, headers=headers | {"accept": accept}))


def test_an_audit_event_search_takes_no_body(client: TestClient) -> None:
    # Searching by POST (FHIR's _search form) is not offered: 405, as an OperationOutcome.
    r = client.post(
        "/fhir/AuditEvent",
        content=b"<AuditEvent/>",
        headers=auth_headers("admin") | {"content-type": "application/fhir+xml"},
    )
    _outcome(r, 405)


def test_an_audit_event_search_keeps_its_paging_in_the_self_link(client: TestClient) -> None:
    headers = auth_headers("auditor")
    params = {"agent": "nobody", "date": "ge2026-01-01", "_count": "5", "_offset": "0", "_pretty": "true"}
    bundle = _bundle(client.get("/fhir/AuditEvent", params=params | {"x": "1"}, headers=headers | LENIENT))
    assert sorted(_self(bundle)) == sorted(params.items())
    # Its errors stay OperationOutcomes, now answered by the app's one error mapping.
    assert "_count" in _outcome(client.get("/fhir/AuditEvent", params={"_count": "x"}, headers=headers), 400)
    _outcome(client.get("/fhir/AuditEvent", params={"date": "yesterday"}, headers=headers), 400)


def test_a_consent_search_names_its_patient_once(client: TestClient) -> None:
    headers = auth_headers("clinician")
    said = _outcome(client.get("/fhir/Consent", params=[("patient", "Patient/1")] * 2, headers=headers), 400)
    assert "once" in said
    assert "patient" in _outcome(client.get("/fhir/Consent", headers=headers), 400)


@pytest.mark.parametrize("name", ["patient", "agent", "action", "entity-id", "_count"])
def test_an_audit_event_criterion_given_twice_is_refused_not_half_applied(
    client: TestClient, name: str
) -> None:
    """FHIR reads a repeated parameter as AND: answering with one of the values would list one
    patient's (or agent's) accesses where the question matches none."""
    headers = auth_headers("auditor")
    said = _outcome(client.get("/fhir/AuditEvent", params=[(name, "1"), (name, "2")], headers=headers), 400)
    assert name in said and "once" in said
    # A date range is two `date` parameters, as before.
    dated = [("date", "ge2026-01-01"), ("date", "le2026-12-31")]
    assert client.get("/fhir/AuditEvent", params=dated, headers=headers).status_code == 200


@pytest.mark.parametrize(
    ("prefer", "lenient"),
    [
        ("handling=lenient", True),
        ("return=minimal, Handling = Lenient", True),
        ('handling="lenient"; foo=bar', True),
        ("xhandling=lenient", False),
        ("handling=lenient-ish", False),
        ("handling=strict", False),
    ],
)
def test_only_a_lenient_handling_preference_is_lenient(
    client: TestClient, prefer: str, lenient: bool
) -> None:
    r = client.get(
        "/fhir/AuditEvent", params={"x": "1"}, headers=auth_headers("auditor") | {"Prefer": prefer}
    )
    assert r.status_code == (200 if lenient else 400), r.text
