"""The broker's own issuer, seen from outside: its JWKS and discovery document (so that other
services can verify the tokens it mints), and the pages' sign-in and sign-out.

Sign-in here is the loopback-only development sign-in the demo uses (pick a role, get a session);
it is refused unless both the broker and the browser are on loopback.
"""

from __future__ import annotations

import html
import ipaddress
import secrets
from typing import Any
from urllib.parse import parse_qs, urlencode

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from broker.errors import BadRequest, Forbidden
from broker.security import oidc
from broker.security.http import SESSION_COOKIE
from broker.security.schemas import Role
from broker.security.tokens import Verifier, mint, public_jwks
from broker.settings import Settings

router = APIRouter(include_in_schema=False)

JWKS_PATH = "/.well-known/jwks.json"
SESSION_SECONDS = 8 * 3600


def _verifier(request: Request) -> Verifier:
    verifier: Verifier | None = request.app.state.auth
    if verifier is None:
        raise Forbidden("authentication is switched off on this broker")
    return verifier


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost" or host == "testclient":  # starlette's TestClient peer
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _dev_sign_in_allowed(request: Request, settings: Settings) -> bool:
    client = request.client.host if request.client else None
    return _is_loopback(settings.host) and _is_loopback(client)


def _safe_next(value: str | None) -> str:
    # Only a path on this site: never an open redirect to another origin.
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    return value


@router.get(JWKS_PATH)
def jwks(request: Request) -> JSONResponse:
    return JSONResponse(public_jwks(_verifier(request).signing_key))


@router.get("/.well-known/openid-configuration")
def discovery(request: Request) -> dict[str, Any]:
    base = str(request.base_url).rstrip("/")
    settings: Settings = request.app.state.scanonce.settings
    return {
        "issuer": settings.auth_issuer,
        "jwks_uri": base + JWKS_PATH,
        "id_token_signing_alg_values_supported": ["ES256"],
    }


@router.get("/auth/sign-in", response_class=HTMLResponse)
def sign_in_page(request: Request, next: str = "/") -> str:
    settings: Settings = request.app.state.scanonce.settings
    target = html.escape(_safe_next(next))
    facility = html.escape(settings.default_facility)
    body = ""
    if settings.auth_oidc_issuer:
        link = "/auth/oidc/start?" + urlencode({"next": _safe_next(next)})
        body += f'<p><a id="oidc" href="{html.escape(link)}">Sign in with your organisation</a></p>'
    if not _dev_sign_in_allowed(request, settings):
        body += "<p>Programs: send a bearer token (<code>scanonce token create</code>).</p>"
    else:
        options = "".join(f'<option value="{r}">{r}</option>' for r in Role)
        body += (
            '<form method="post" action="/auth/dev-sign-in">'
            f'<input type="hidden" name="next" value="{target}">'
            f'<label>Role <select name="role">{options}</select></label> '
            f'<label>Facility <input name="facility" value="{facility}"></label> '
            '<label>Name <input name="subject" value="demo"></label> '
            '<button type="submit">Sign in (development, loopback only)</button></form>'
        )
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>Sign in · ScanOnce</title>"
        f"</head><body><main><h1>Sign in</h1>{body}</main></body></html>"
    )


def _callback_url(request: Request) -> str:
    return str(request.url_for("oidc_callback"))


@router.get("/auth/oidc/start")
def oidc_start(request: Request, next: str = "/") -> Response:
    verifier = _verifier(request)
    if not verifier.settings.auth_oidc_issuer:
        raise BadRequest("no sign-in provider is configured (SCANONCE_AUTH_OIDC_ISSUER)")
    url, cookie = oidc.start(
        verifier=verifier, redirect_uri=_callback_url(request), next_path=_safe_next(next)
    )
    response = RedirectResponse(url, status_code=303)
    response.set_cookie(
        oidc.STATE_COOKIE,
        cookie,
        max_age=600,
        path="/auth/oidc",
        httponly=True,
        samesite="lax",  # sent on the provider's top-level redirect back
        secure=request.url.scheme == "https",
    )
    return response


@router.get("/auth/oidc/callback", name="oidc_callback")
def oidc_callback(request: Request, code: str = "", state: str = "") -> Response:
    verifier = _verifier(request)
    if not verifier.settings.auth_oidc_issuer:
        raise BadRequest("no sign-in provider is configured (SCANONCE_AUTH_OIDC_ISSUER)")
    if not code or not state:
        raise BadRequest("the sign-in provider returned no code (sign-in cancelled?)")
    principal, next_path = oidc.finish(
        verifier=verifier,
        cookie=request.cookies.get(oidc.STATE_COOKIE),
        code=code,
        state=state,
        redirect_uri=_callback_url(request),
    )
    token = mint(
        key=verifier.signing_key,
        settings=verifier.settings,
        subject=principal.who,
        role=principal.role,
        facility=principal.facility,
        expires_in=SESSION_SECONDS,
        extra={"csrf": secrets.token_urlsafe(16), "idp": principal.issuer},
    )
    response = RedirectResponse(_safe_next(next_path), status_code=303)
    response.delete_cookie(oidc.STATE_COOKIE, path="/auth/oidc")
    set_session_cookie(response, token, secure=request.url.scheme == "https")
    return response


@router.post("/auth/dev-sign-in")
async def dev_sign_in(request: Request) -> Response:
    settings: Settings = request.app.state.scanonce.settings
    verifier = _verifier(request)
    if not _dev_sign_in_allowed(request, settings):
        raise Forbidden("development sign-in is for loopback only")
    body = await request.body()
    if len(body) > 4096:
        raise BadRequest("form too large")
    form = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace"), max_num_fields=8).items()}
    try:
        role = Role(form.get("role", ""))
    except ValueError as exc:
        raise BadRequest("unknown role") from exc
    subject = form.get("subject", "demo")[:64] or "demo"
    facility = form.get("facility", "")[:64] or settings.default_facility
    token = mint(
        key=verifier.signing_key,
        settings=settings,
        subject=subject,
        role=role,
        facility=facility,
        expires_in=SESSION_SECONDS,
        extra={"csrf": secrets.token_urlsafe(16)},
    )
    response = RedirectResponse(_safe_next(form.get("next")), status_code=303)
    set_session_cookie(response, token, secure=request.url.scheme == "https")
    return response


@router.post("/auth/sign-out")
def sign_out() -> Response:
    response = RedirectResponse("/auth/sign-in", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


def set_session_cookie(response: Response, token: str, *, secure: bool) -> None:
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=SESSION_SECONDS,
        path="/",
        httponly=True,
        samesite="lax",
        secure=secure,
    )
