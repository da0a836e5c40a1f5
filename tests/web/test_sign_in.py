"""Signing in to the pages in a real browser: OpenID Connect (authorization code + PKCE) against
npm's oidc-provider started on loopback, the loopback development sign-in, the session cookie's
attributes, CSRF refusal, and the OHIF viewer working on the session cookie alone."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import httpx
import pytest
from playwright.sync_api import Browser, Cookie, Page, expect

from broker.app import create_app
from broker.settings import Settings

from .conftest import Broker, Visit, node_peer, serving
from .test_viewer import _rendered


@pytest.fixture(scope="module")
def signed_in_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(broker origin, provider issuer): the provider knows the broker's callback, the broker
    trusts the provider for sign-in."""
    with node_peer("provider.mjs", "/auth/oidc/callback") as provider:
        issuer = provider.urls["issuer"]
        settings = Settings(data_dir=tmp_path_factory.mktemp("sign-in"), auth_oidc_issuer=issuer)
        with serving(create_app(settings), provider.sock):
            yield provider.origin, issuer


def _sign_in_with_provider(browser: Browser, origin: str, user: str) -> tuple[Page, list[Cookie]]:
    context = browser.new_context()
    page = context.new_page()
    page.goto(f"{origin}/?family=Doe")
    expect(page).to_have_url(f"{origin}/auth/sign-in?next=%2F%3Ffamily%3DDoe")
    page.click("#oidc")
    # oidc-provider's development login form, then its consent prompt.
    page.fill("input[name=login]", user)
    page.fill("input[name=password]", "any")
    page.click("button[type=submit]")
    page.click("button[type=submit]")
    page.wait_for_url(f"{origin}/**")
    return page, context.cookies()


def test_sign_in_with_openid_connect_and_pkce(browser: Browser, signed_in_broker: tuple[str, str]) -> None:
    origin, _issuer = signed_in_broker
    page, cookies = _sign_in_with_provider(browser, origin, "dr-rad")
    assert page.url == f"{origin}/?family=Doe"  # back where the person was going
    expect(page.locator("form#lookup, form").first).to_be_visible()
    session = next(c for c in cookies if c["name"] == "scanonce_session")
    assert session["httpOnly"] is True and session["sameSite"] == "Lax"
    assert session["secure"] is False  # plain HTTP on loopback; Secure under TLS
    # The session is the broker's own token, for the provider's user and the role it asserted.
    claims = json.loads(_b64decode(str(session["value"]).split(".")[1]))
    assert claims["sub"] == "dr-rad" and claims["role"] == "radiologist" and claims["idp"] == _issuer


def test_a_role_without_the_pages_is_refused_after_sign_in(
    browser: Browser, signed_in_broker: tuple[str, str]
) -> None:
    origin, _ = signed_in_broker
    page, _cookies = _sign_in_with_provider(browser, origin, "auditor-1")
    assert "not permitted" in page.content()


def test_a_forged_callback_is_refused(signed_in_broker: tuple[str, str]) -> None:
    origin, _ = signed_in_broker
    r = httpx.get(f"{origin}/auth/oidc/callback", params={"code": "x", "state": "y"}, trust_env=False)
    assert r.status_code == 400 and "start again" in r.text
    assert "scanonce_session" not in r.headers.get("set-cookie", "")


def _b64decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


# -- the loopback development sign-in, the viewer on a session cookie, CSRF ------------------


def test_dev_sign_in_then_the_viewer_works_on_the_cookie(browser: Browser, broker: Broker) -> None:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    context.add_init_script(
        "localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']));"
        "sessionStorage.setItem('investigationalUseDialog', 'hidden');"
    )
    try:
        page = context.new_page()
        page.goto(f"{broker.url}/viewer/viewer?StudyInstanceUIDs={broker.studies.ct}")
        assert "/auth/sign-in" in page.url
        page.select_option("select[name=role]", "radiologist")
        page.click("button[type=submit]")
        page.wait_for_url(f"{broker.url}/viewer/viewer?StudyInstanceUIDs={broker.studies.ct}")
        _rendered(Visit(page=page, requests=[]))
    finally:
        context.close()


def test_session_posts_need_our_own_origin(broker: Broker) -> None:
    with httpx.Client(base_url=broker.url, trust_env=False) as http:
        r = http.post("/auth/dev-sign-in", data={"role": "clinician", "next": "/"})
        assert r.status_code == 303 and "scanonce_session" in http.cookies
        body = {"facility": "local", "study": "1.2.3", "exam": "x"}
        cross_site = http.post("/api/priors/avoided", json=body, headers={"Origin": "https://evil.example"})
        assert cross_site.status_code == 403 and "CSRF" in cross_site.text
        no_origin = http.post("/api/priors/avoided", json=body)
        assert no_origin.status_code == 403
        same_site = http.post("/api/priors/avoided", json=body, headers={"Origin": broker.url})
        assert same_site.status_code not in (401, 403)
