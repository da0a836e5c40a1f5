"""Every route the app serves × every role: the exact allow or deny, asserted over HTTP.

The expectation is written out here, route by route, independently of broker.security.policy
(so that a wrong entry in the policy table fails here), and every route of the app must appear
in it: a new route fails this test until someone decides who may call it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from broker.app import create_app
from broker.security.schemas import Role
from broker.settings import Settings
from tests.support import auth_headers

A, C, R, F, V, U = "admin", "clinician", "radiologist", "facility", "reviewer", "auditor"
ALL = {A, C, R, F, V, U}
PUBLIC = "public"
IMAGES_READ = {A, C, R, F}
CLINICAL = {A, C, R}

# (method, route path) -> the roles allowed (PUBLIC: no token needed).
EXPECTED: dict[tuple[str, str], set[str] | str] = {
    ("GET", "/healthz"): PUBLIC,
    ("GET", "/readyz"): PUBLIC,
    ("GET", "/cds-services"): PUBLIC,
    ("GET", "/fhir/metadata"): PUBLIC,
    ("GET", "/.well-known/jwks.json"): PUBLIC,
    ("GET", "/.well-known/openid-configuration"): PUBLIC,
    ("GET", "/auth/sign-in"): PUBLIC,
    ("POST", "/auth/dev-sign-in"): PUBLIC,
    ("POST", "/auth/sign-out"): PUBLIC,
    ("GET", "/auth/oidc/start"): PUBLIC,
    ("GET", "/auth/oidc/callback"): PUBLIC,
    ("GET", "/launch"): PUBLIC,
    ("GET", "/launch/callback"): PUBLIC,
    ("GET", "/static/{name}"): PUBLIC,
    ("GET", "/openapi.json"): ALL,
    ("GET", "/api"): ALL,
    ("GET", "/docs"): ALL,
    ("GET", "/docs/assets/{name}"): ALL,
    # Facilities: read by most, changed by admins only.
    ("GET", "/api/facilities"): {A, C, R, V, U},
    ("GET", "/api/facilities/{facility_id}"): {A, C, R, V, U},
    ("POST", "/api/facilities"): {A},
    ("PATCH", "/api/facilities/{facility_id}"): {A},
    ("DELETE", "/api/facilities/{facility_id}"): {A},
    ("POST", "/api/facilities/{facility_id}/sync"): {A},
    ("GET", "/api/jobs"): {A, V},
    ("GET", "/api/jobs/{job_id}"): {A, V},
    ("GET", "/metrics"): {A, U},
    ("POST", "/api/verify"): {A},
    # Identity: the review queue is the reviewers'; configuring the matcher is admin.
    ("GET", "/api/identity/review"): {A, V},
    ("POST", "/api/identity/review/{review_id}"): {A, V},
    ("POST", "/api/identity/link"): {A, V},
    ("POST", "/api/identity/unlink"): {A, V},
    ("GET", "/api/identity/records/{record_id}/explain"): {A, V},
    ("GET", "/api/identity/records"): {A, V},
    ("POST", "/api/identity/trusted-issuers"): {A},
    ("POST", "/api/identity/train"): {A},
    # Consent: recorded by clinicians and facility feeds at their facility; break-the-glass is
    # asked for by clinicians and reviewed by reviewers.
    ("GET", "/api/consent"): {A, C, F},
    ("POST", "/api/consent"): {A, C, F},
    ("DELETE", "/api/consent/{consent_id}"): {A, C, F},
    ("GET", "/fhir/Consent"): {A, C, F},
    ("POST", "/fhir/Consent"): {A, C, F},
    ("POST", "/api/break-glass"): CLINICAL,
    ("GET", "/api/break-glass"): {A, V},
    ("POST", "/api/break-glass/{grant_id}/reviewed"): {A, V},
    # The lookup.
    ("GET", "/api/priors"): CLINICAL,
    ("GET", "/api/priors/exams"): CLINICAL,
    ("POST", "/api/priors/avoided"): CLINICAL,
    ("GET", "/api/metrics/avoided"): CLINICAL,
    # FHIR.
    ("GET", "/fhir/Patient/$ihe-pix"): {A, C, R, V},
    ("GET", "/fhir/Patient"): {A, C, R, V},
    ("GET", "/fhir/Patient/{person_id}"): {A, C, R, V},
    ("POST", "/fhir/Patient"): {A, F},
    ("PUT", "/fhir/Patient"): {A, F},
    ("PUT", "/fhir/Patient/{person_id}"): {A, F},
    ("GET", "/fhir/ImagingStudy"): IMAGES_READ,
    ("GET", "/fhir/ImagingStudy/{study_id}"): IMAGES_READ,
    # CDS Hooks service calls come from the EHR on a clinician's behalf.
    ("POST", "/cds-services/{service_id}"): CLINICAL,
    ("POST", "/cds-services/{service_id}/feedback"): CLINICAL,
    # The audit trail: auditors' and admins'.
    ("GET", "/fhir/AuditEvent"): {A, U},
    ("GET", "/api/audit"): {A, U},
    ("GET", "/api/audit/verify"): {A, U},
    # Imports of outside studies into the local PACS: the radiologist's.
    ("GET", "/api/imports"): {A, R},
    ("POST", "/api/imports"): {A, R},
    ("GET", "/api/imports/{import_id}"): {A, R},
    ("POST", "/api/imports/{import_id}/cancel"): {A, R},
    ("GET", "/api/imports/destinations/{facility}"): {A, R},
    ("PUT", "/api/imports/destinations/{facility}"): {A},
    ("GET", "/compare"): CLINICAL,
    ("GET", "/imports"): {A, R},
    ("POST", "/imports"): {A, R},
    # The pages.
    ("GET", "/"): CLINICAL,
    ("GET", "/record"): CLINICAL,
    ("POST", "/avoided"): CLINICAL,
    ("GET", "/viewer"): IMAGES_READ,
    ("GET", "/viewer/app-config.js"): IMAGES_READ,
    ("GET", "/viewer/{path:path}"): IMAGES_READ,
    ("GET", "/admin/facilities"): {A, C, R, V, U},
    ("GET", "/admin/jobs"): {A, V},
    ("GET", "/admin/review"): {A, V},
    ("POST", "/admin/review/{review_id}"): {A, V},
}


def _dicomweb(prefix: str) -> None:
    for suffix in (
        "/studies",
        "/series",
        "/instances",
        "/studies/{study}/series",
        "/studies/{study}/instances",
        "/studies/{study}/series/{series}/instances",
        "/studies/{study}",
        "/studies/{study}/metadata",
        "/studies/{study}/rendered",
        "/studies/{study}/thumbnail",
        "/studies/{study}/series/{series}",
        "/studies/{study}/series/{series}/metadata",
        "/studies/{study}/series/{series}/rendered",
        "/studies/{study}/series/{series}/thumbnail",
        "/studies/{study}/series/{series}/instances/{instance}",
        "/studies/{study}/series/{series}/instances/{instance}/metadata",
        "/studies/{study}/series/{series}/instances/{instance}/rendered",
        "/studies/{study}/series/{series}/instances/{instance}/thumbnail",
        "/studies/{study}/series/{series}/instances/{instance}/frames/{frames}",
        "/studies/{study}/series/{series}/instances/{instance}/frames/{frames}/rendered",
        "/studies/{study}/series/{series}/instances/{instance}/bulk/{tag:path}",
    ):
        EXPECTED.setdefault(("GET", prefix + suffix), IMAGES_READ)
    for suffix in ("/studies", "/studies/{study}"):
        # Storing: admins and facility nodes (a node only into its own partition, see below).
        EXPECTED[("POST", prefix + suffix)] = {A, F}


_dicomweb("/dicom-web")
_dicomweb("/facilities/{facility}/dicom-web")


def _routes(app: FastAPI) -> list[tuple[str, str]]:
    found: set[tuple[str, str]] = set()
    for route in app.routes:
        contexts = route.effective_route_contexts() if hasattr(route, "effective_route_contexts") else [route]
        for ctx in contexts:
            for method in getattr(ctx, "methods", None) or ():
                if method != "HEAD":
                    found.add((method, getattr(ctx, "path")))  # noqa: B009 - Route and Mount alike
    return sorted(found)


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> FastAPI:
    return create_app(Settings(data_dir=tmp_path_factory.mktemp("matrix")))


@pytest.fixture(scope="module")
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app, follow_redirects=False) as c:
        yield c


def _concrete(path: str, facility: str) -> str:
    path = path.replace("{facility}", facility).replace("{path:path}", "index.html")
    path = path.replace("{name}", "nothing.css").replace("{frames}", "1")
    return re.sub(r"\{[^}]+\}", "1.2.3", path.replace("{tag:path}", "7FE00010"))


def _call(client: TestClient, method: str, path: str, headers: dict[str, str]) -> Any:
    kwargs: dict[str, Any] = {"headers": headers}
    if method in {"POST", "PUT", "PATCH"}:
        # Not a valid body for any of them: an allowed caller gets 4xx from the route itself and
        # nothing changes; a denied one never reaches it.
        kwargs["content"] = b"\x00"
        headers["Content-Type"] = "application/octet-stream"
    return client.request(method, path, **kwargs)


def test_every_route_is_classified(app: FastAPI) -> None:
    served = set(_routes(app))
    assert served - EXPECTED.keys() == set(), "routes with no expectation: add them here and to the policy"
    assert EXPECTED.keys() - served == set(), "expectations for routes that no longer exist"


def _cases() -> list[tuple[str, str, str]]:
    return [(m, p, role) for (m, p) in EXPECTED for role in sorted(ALL)]


@pytest.mark.parametrize(("method", "path", "role"), _cases())
def test_role_matrix(client: TestClient, method: str, path: str, role: str) -> None:
    allowed = EXPECTED[(method, path)]
    r = _call(client, method, _concrete(path, "local"), auth_headers(role, facility="local"))
    if allowed == PUBLIC or role in allowed:
        assert r.status_code not in (401, 403), (r.status_code, r.text[:200])
    else:
        assert r.status_code == 403, (r.status_code, r.text[:200])
        assert "1.2.3" not in r.text  # a refusal says nothing about what was asked for


@pytest.mark.parametrize(("method", "path"), sorted(EXPECTED))
def test_anonymous_gets_401_except_on_the_open_list(client: TestClient, method: str, path: str) -> None:
    r = _call(client, method, _concrete(path, "local"), {})
    if EXPECTED[(method, path)] == PUBLIC:
        assert r.status_code not in (401, 403)
    else:
        assert r.status_code == 401, r.status_code
        assert r.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize("path", [p for (m, p) in EXPECTED if m == "POST" and p.startswith("/facilities/")])
def test_a_facility_node_stores_only_into_its_own_partition(client: TestClient, path: str) -> None:
    own = _call(client, "POST", _concrete(path, "north"), auth_headers(F, facility="north"))
    other = _call(client, "POST", _concrete(path, "south"), auth_headers(F, facility="north"))
    assert own.status_code not in (401, 403)
    assert other.status_code == 403
    # The broker-wide STOW-RS stores into the default facility ("local"): not north's to write.
    assert _call(client, "POST", "/dicom-web/studies", auth_headers(F, facility="north")).status_code == 403


def test_a_facility_node_reads_only_its_own_partition(client: TestClient) -> None:
    headers = auth_headers(F, facility="local")
    assert client.get("/facilities/local/dicom-web/studies", headers=headers).status_code == 204
    assert client.get("/facilities/south/dicom-web/studies", headers=headers).status_code == 403


def test_the_matrix_covers_every_role() -> None:
    assert {str(r) for r in Role} == ALL
    assert len(_cases()) >= 6 * 100


def test_dot_segments_do_not_slip_past_the_table(client: TestClient) -> None:
    # /static is open; /static/../api/facilities must not be read as open.
    r = client.get("/static/%2e%2e/api/facilities")
    assert r.status_code in (401, 404)


def test_html_callers_are_sent_to_sign_in(client: TestClient, tmp_path: Path) -> None:
    del tmp_path
    r = client.get("/record?mrn=1", headers={"Accept": "text/html"})
    assert r.status_code == 303
    assert r.headers["location"] == "/auth/sign-in?next=%2Frecord%3Fmrn%3D1"
