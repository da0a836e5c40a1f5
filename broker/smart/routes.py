"""HTTP for SMART App Launch: `/launch` (the EHR opens it with `iss` and `launch`) and its
callback. Thin: `smart.service` does the work. Public like the sign-in routes (the launch is how
a session is made); a refused launch is a short HTML page, since a person in a browser sees it."""

from __future__ import annotations

import html
import secrets

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from broker.deps import SessionDep
from broker.errors import Forbidden, ScanOnceError
from broker.security.routes import SESSION_SECONDS, set_session_cookie
from broker.security.tokens import Verifier, mint
from broker.smart import service

router = APIRouter(include_in_schema=False)


def _verifier(request: Request) -> Verifier:
    verifier: Verifier | None = request.app.state.auth
    if verifier is None:
        raise Forbidden("authentication is switched off on this broker")
    return verifier


def _page(title: str, message: str, status: int, link: str = "") -> HTMLResponse:
    body = (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>{html.escape(title)} · ScanOnce</title></head><body><main>"
        f"<h1>{html.escape(title)}</h1><p id=message>{html.escape(message)}</p>{link}</main></body></html>"
    )
    return HTMLResponse(body, status_code=status, headers={"Cache-Control": "no-store"})


def _refused(exc: ScanOnceError) -> HTMLResponse:
    return _page("Launch refused", exc.message, exc.status_code)


@router.get("/launch")
def launch(request: Request, iss: str = "", launch: str = "") -> Response:
    """EHR launch: on to the EHR's authorization server, with the launch handle and PKCE."""
    try:
        url, cookie = service.start(
            verifier=_verifier(request),
            iss=iss,
            launch=launch,
            redirect_uri=str(request.url_for("smart_callback")),
        )
    except ScanOnceError as exc:
        return _refused(exc)
    response = RedirectResponse(url, status_code=303)
    response.set_cookie(
        service.STATE_COOKIE,
        cookie,
        max_age=600,
        path=service.STATE_PATH,
        httponly=True,
        samesite="lax",  # sent on the authorization server's top-level redirect back
        secure=request.url.scheme == "https",
    )
    return response


@router.get("/launch/callback", name="smart_callback")
def smart_callback(request: Request, session: SessionDep, code: str = "", state: str = "") -> Response:
    """Back from the EHR's authorization server: a session, then the lookup on the EHR's patient."""
    if not code or not state:
        return _page("Launch refused", "the EHR returned no code (launch cancelled?)", 400)
    try:
        verifier = _verifier(request)
        launched = service.finish(
            verifier=verifier,
            session=session,
            cookie=request.cookies.get(service.STATE_COOKIE),
            code=code,
            state=state,
            redirect_uri=str(request.url_for("smart_callback")),
        )
    except ScanOnceError as exc:
        return _refused(exc)
    principal = launched.principal
    token = mint(
        key=verifier.signing_key,
        settings=verifier.settings,
        subject=principal.who,
        role=principal.role,
        facility=principal.facility,
        expires_in=SESSION_SECONDS,
        extra={"csrf": secrets.token_urlsafe(16), "idp": principal.issuer},
    )
    if launched.known:
        response: Response = RedirectResponse(service.lookup_path(launched), status_code=303)
    else:
        # Signed in all the same: the clinician can still search by name from the lookup page.
        response = _page(
            "Patient not known to ScanOnce",
            "The EHR's current patient has no imaging indexed by ScanOnce at any facility "
            "(none of the patient's identifiers matches a record here).",
            404,
            '<p><a id=lookup href="/">Search by name and birth date</a></p>',
        )
    response.delete_cookie(service.STATE_COOKIE, path=service.STATE_PATH)
    set_session_cookie(response, token, secure=request.url.scheme == "https")
    return response
