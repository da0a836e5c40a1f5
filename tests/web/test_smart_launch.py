"""SMART App Launch (EHR launch) in a real browser: an EHR opens the broker's `/launch` with its
`iss` and a `launch` handle; npm's oidc-provider, started on loopback, is the EHR's authorization
server (it puts the launch's patient into its token response) and a tiny FHIR server beside it
serves the SMART configuration and the Patient, read only with the access token it issued. The
lookup page must open on that patient (facility + MRN mapped from the Patient's identifiers).
Refused: an unregistered `iss`, a tampered `state`, a callback with no launch behind it; a patient
the broker does not know gets a clear page."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit, urlunsplit

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, Route, expect
from pydicom.uid import generate_uid
from sqlalchemy.engine import Engine
from sqlmodel import Session

from broker.app import create_app
from broker.demo.service import load_demo
from broker.identity import service as identity
from broker.identity.matching import Demographics
from broker.index.service import ingest_files
from broker.settings import Settings, SmartEhr
from storage import ObjectStore
from tests.live_demo import CHILD_MRN
from tests.support import ADMIN, make_ds, write
from tests.web.conftest import node_peer, serving

OUTSIDE = "http://192.0.2.10/fhir"  # TEST-NET-1: never reached


@dataclass(frozen=True)
class Ehr:
    origin: str  # the broker
    issuer: str  # the EHR's authorization server
    fhir: str  # the EHR's FHIR base: the launch's `iss`


@pytest.fixture(scope="module")
def ehr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ehr]:
    """The broker (demo data, the EHR registered in SCANONCE_SMART_EHRS) and the EHR."""
    with node_peer("smart_ehr.mjs", "/launch/callback") as ehr_node:
        urls = ehr_node.urls
        tmp = tmp_path_factory.mktemp("smart")
        settings = Settings(
            data_dir=tmp / "data",
            database_url=f"sqlite:///{tmp / 'index.sqlite3'}",
            storage_url=(tmp / "objects").as_uri(),
            mllp_port=0,
            base_url=ehr_node.origin,
            smart_ehrs={
                urls["fhir"]: SmartEhr(client_id="scanonce", facility="kids"),
                # Registered, but outside the outbound networks (loopback only here).
                OUTSIDE: SmartEhr(client_id="scanonce"),
            },
        )
        app = create_app(settings)
        st = app.state.scanonce
        load_demo(engine=st.engine, store=st.store)
        _add_a_patient_known_by_a_national_id(st.engine, st.store, tmp)
        try:
            with serving(app, ehr_node.sock):
                yield Ehr(origin=ehr_node.origin, issuer=urls["issuer"], fhir=urls["fhir"])
        finally:
            st.engine.dispose()


def _add_a_patient_known_by_a_national_id(engine: Engine, store: ObjectStore, tmp: Path) -> None:
    """A child of the children's hospital whom the national register (a trusted issuer no
    facility has) also names, as a registration feed records it."""
    ds = make_ds(sop=generate_uid(), study=generate_uid(), series=generate_uid(), pid="K-SMART-1")
    out = ingest_files(
        engine=engine, store=store, principal=ADMIN, facility_id="kids", paths=[write(tmp, "n.dcm", ds)]
    )
    assert out[0].ok
    with Session(engine) as session:
        identity.set_trusted_issuer(session=session, principal=ADMIN, issuer="NATIONAL")
        identity.upsert_record(
            session=session,
            identifier=identity.Identifier(issuer="NATIONAL", value="NAT-42"),
            demographics=Demographics(family="DOE", given="JOHN"),
            identifiers=[identity.Identifier(issuer="CHILDRENS", value="K-SMART-1")],
            source="fhir",
            principal=ADMIN,
        )
        session.commit()


def _launch(browser: Browser, ehr: Ehr, launch: str, *, tamper: bool = False) -> tuple[BrowserContext, Page]:
    """Open the broker as the EHR does, then the EHR's sign-in and consent (oidc-provider's
    development forms). `tamper`: the state on the way back is altered in flight."""
    context = browser.new_context()
    page = context.new_page()
    if tamper:
        # The redirect back is the EHR's answer to the consent form; a browser does not let a
        # redirect be intercepted, so the form's POST is, and its redirects followed here.
        def altered(route: Route) -> None:
            response = route.fetch(max_redirects=0)
            location = urljoin(route.request.url, response.headers.get("location", ""))
            while location.startswith(f"{ehr.issuer}/auth/"):
                response = context.request.get(location, max_redirects=0)
                location = urljoin(location, response.headers.get("location", ""))
            if not location.startswith(f"{ehr.origin}/launch/callback"):
                route.fulfill(response=response)
                return
            parts = urlsplit(location)
            query = dict(parse_qsl(parts.query)) | {"state": "forged-state"}
            forged = urlunsplit(parts._replace(query=urlencode(query)))
            route.fulfill(status=303, headers={"location": forged})

        page.route(lambda url: url.startswith(f"{ehr.issuer}/interaction/"), altered)
    page.goto(f"{ehr.origin}/launch?" + urlencode({"iss": ehr.fhir, "launch": launch}))
    page.fill("input[name=login]", "dr-house")
    page.fill("input[name=password]", "any")
    page.click("button[type=submit]")
    page.click("button[type=submit]")
    page.wait_for_url(f"{ehr.origin}/**")
    page.wait_for_load_state()
    return context, page


def _session_claims(context: BrowserContext) -> dict[str, object] | None:
    session = next((c for c in context.cookies() if c["name"] == "scanonce_session"), None)
    if session is None:
        return None
    part = str(session["value"]).split(".")[1]
    claims: dict[str, object] = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    return claims


def test_an_ehr_launch_opens_the_lookup_on_the_ehrs_patient(browser: Browser, ehr: Ehr) -> None:
    context, page = _launch(browser, ehr, "launch-known")
    try:
        # The EHR's own identifier is skipped; the Children's Hospital MRN is the broker's.
        assert page.url == f"{ehr.origin}/?" + urlencode({"facility": "kids", "mrn": CHILD_MRN})
        expect(page.locator("input[name=mrn]")).to_have_value(CHILD_MRN)
        expect(page.locator("select[name=facility]")).to_have_value("kids")
        claims = _session_claims(context)
        assert claims is not None
        # Signed in as the EHR's user, with the role and facility the administrator gave this EHR.
        assert claims["sub"] == "dr-house" and claims["role"] == "clinician"
        assert claims["facility"] == "kids" and claims["idp"] == ehr.issuer
        # The session works on the pages: the launched child's prior CT at St Mary's (demo data).
        page.goto(page.url + "&" + urlencode({"exam": "CT abdomen pelvis", "now": "2026-06-25"}))
        expect(page.locator("ol.relevant > li").first).to_contain_text("St Mary")
        assert "/auth/sign-in" not in page.url
    finally:
        context.close()


def test_a_patient_known_only_by_a_national_id_is_looked_up_by_it(browser: Browser, ehr: Ehr) -> None:
    # No facility has the NATIONAL issuer: the lookup starts from the identifier itself.
    context, page = _launch(browser, ehr, "launch-national")
    try:
        assert page.url == f"{ehr.origin}/?" + urlencode({"identifier": "NATIONAL|NAT-42"})
        expect(page.locator("#lookup")).to_contain_text("Looked up by identifier NATIONAL|NAT-42")
    finally:
        context.close()


def test_a_patient_the_broker_does_not_know_gets_a_clear_page(browser: Browser, ehr: Ehr) -> None:
    context, page = _launch(browser, ehr, "launch-unknown")
    try:
        assert page.url.startswith(f"{ehr.origin}/launch/callback?")
        expect(page.locator("h1")).to_have_text("Patient not known to ScanOnce")
        expect(page.locator("#message")).to_contain_text("no imaging indexed by ScanOnce")
        # Signed in all the same: the lookup page is one click away.
        page.click("#lookup")
        page.wait_for_url(f"{ehr.origin}/")
        expect(page.locator("input[name=mrn]")).to_have_value("")
    finally:
        context.close()


def test_a_tampered_state_is_refused(browser: Browser, ehr: Ehr) -> None:
    context, page = _launch(browser, ehr, "launch-known", tamper=True)
    try:
        expect(page.locator("h1")).to_have_text("Launch refused")
        expect(page.locator("#message")).to_contain_text("state does not match")
        assert _session_claims(context) is None
    finally:
        context.close()


def test_an_unregistered_iss_is_refused(ehr: Ehr) -> None:
    # Even an EHR of the same shape on an allowed network: only the registered FHIR base counts.
    for iss in (ehr.fhir + "-other", "http://127.0.0.1:1/fhir", ""):
        r = httpx.get(f"{ehr.origin}/launch", params={"iss": iss, "launch": "launch-known"}, trust_env=False)
        assert r.status_code == 400, iss
        assert r.headers["content-type"].startswith("text/html")
        assert "not registered" in r.text and "SCANONCE_SMART_EHRS" in r.text
        assert "set-cookie" not in r.headers


def test_a_registered_ehr_outside_the_outbound_networks_is_not_called(ehr: Ehr) -> None:
    r = httpx.get(f"{ehr.origin}/launch", params={"iss": OUTSIDE, "launch": "x"}, trust_env=False)
    assert r.status_code == 403 and "SCANONCE_OUTBOUND_ALLOW_NETWORKS" in r.text
    assert "set-cookie" not in r.headers


def test_a_launch_without_its_handle_is_refused(ehr: Ehr) -> None:
    r = httpx.get(f"{ehr.origin}/launch", params={"iss": ehr.fhir}, trust_env=False)
    assert r.status_code == 400 and "no launch context" in r.text


def test_a_callback_with_no_launch_behind_it_is_refused(ehr: Ehr) -> None:
    r = httpx.get(f"{ehr.origin}/launch/callback", params={"code": "x", "state": "y"}, trust_env=False)
    assert r.status_code == 400 and "open the app from the EHR again" in r.text
    assert "scanonce_session" not in r.headers.get("set-cookie", "")


def test_a_launch_the_user_cancelled_at_the_ehr_is_refused(ehr: Ehr) -> None:
    r = httpx.get(
        f"{ehr.origin}/launch/callback", params={"error": "access_denied", "state": "y"}, trust_env=False
    )
    assert r.status_code == 400 and "launch cancelled" in r.text
    assert "scanonce_session" not in r.headers.get("set-cookie", "")


def test_the_launch_asks_for_the_smart_scopes_audience_and_pkce(ehr: Ehr) -> None:
    r = httpx.get(
        f"{ehr.origin}/launch",
        params={"iss": ehr.fhir, "launch": "launch-known"},
        trust_env=False,
    )
    assert r.status_code == 303
    target = urlsplit(r.headers["location"])
    assert f"{target.scheme}://{target.netloc}{target.path}" == f"{ehr.issuer}/auth"
    query = dict(parse_qsl(target.query))
    assert query["aud"] == ehr.fhir and query["launch"] == "launch-known"
    assert query["scope"] == "launch openid fhirUser patient/*.read"
    assert query["code_challenge_method"] == "S256" and len(query["code_challenge"]) == 43
    assert query["redirect_uri"] == f"{ehr.origin}/launch/callback"
    cookie = r.headers["set-cookie"]
    assert "scanonce_smart=" in cookie and "HttpOnly" in cookie and "Path=/launch" in cookie
