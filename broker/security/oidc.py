"""Sign-in for the pages: OpenID Connect authorization code flow with PKCE (RFC 7636) against the
configured provider. The browser's half-finished sign-in (state, nonce, PKCE verifier, where to go
back) travels in a short-lived cookie signed by the broker's own key, so no server-side session
table is needed; the finished sign-in becomes the broker's own session token in an HttpOnly cookie.

Every call to the provider (discovery, the token endpoint; its keys through `tokens.Verifier`) goes
through the outbound guard (`network.guarded_client`): only to SCANONCE_OUTBOUND_ALLOW_NETWORKS, on
the address actually connected to, like every other call the broker makes. A provider outside
them is refused with 503 naming the setting (the administrator configured it; the user can do
nothing about it).
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from typing import Any
from urllib.parse import urlencode

import httpx
from joserfc import jwt

from broker.errors import BadRequest, Unavailable
from broker.security import network
from broker.security.schemas import Principal
from broker.security.tokens import SIGNING_ALG, TokenInvalid, Verifier

STATE_COOKIE = "scanonce_oidc"
_STATE_AUDIENCE = "scanonce-oidc-state"
_STATE_SECONDS = 600
_discovery_cache: dict[str, tuple[float, dict[str, Any]]] = {}


def _refused(what: str) -> Unavailable:
    return Unavailable(
        f"the sign-in provider's {what} is at an address the broker may not connect to "
        "(SCANONCE_OUTBOUND_ALLOW_NETWORKS; an administrator adds the provider's network)"
    )


def _discovery(issuer: str) -> dict[str, Any]:
    cached = _discovery_cache.get(issuer)
    if cached is not None and time.monotonic() - cached[0] < 300:
        return cached[1]
    try:
        r = network.guarded_get(f"{issuer.rstrip('/')}/.well-known/openid-configuration", timeout=5)
        r.raise_for_status()
        doc = r.json()
    except network.OutboundRefused:
        raise _refused("discovery document") from None
    except (httpx.HTTPError, ValueError) as exc:
        raise Unavailable("the sign-in provider cannot be reached") from exc
    if not isinstance(doc, dict) or not all(
        isinstance(doc.get(k), str) for k in ("authorization_endpoint", "token_endpoint")
    ):
        raise Unavailable("the sign-in provider's discovery document names no endpoints")
    _discovery_cache[issuer] = (time.monotonic(), doc)
    return doc


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def start(*, verifier: Verifier, redirect_uri: str, next_path: str) -> tuple[str, str]:
    """(the provider's authorization URL, the signed state cookie's value)."""
    settings = verifier.settings
    assert settings.auth_oidc_issuer is not None
    doc = _discovery(settings.auth_oidc_issuer)
    state, nonce, code_verifier = (
        secrets.token_urlsafe(24),
        secrets.token_urlsafe(24),
        secrets.token_urlsafe(48),
    )
    now = int(time.time())
    cookie = jwt.encode(
        {"alg": SIGNING_ALG, "kid": verifier.signing_key.kid},
        {
            "iss": settings.auth_issuer,
            "aud": _STATE_AUDIENCE,
            "sub": "oidc-sign-in",
            "exp": now + _STATE_SECONDS,
            "state": state,
            "nonce": nonce,
            "cv": code_verifier,
            "next": next_path,
        },
        verifier.signing_key,
    )
    query = urlencode(
        {
            "response_type": "code",
            "client_id": settings.auth_oidc_client_id,
            "redirect_uri": redirect_uri,
            "scope": settings.auth_oidc_scopes,
            "state": state,
            "nonce": nonce,
            "code_challenge": _b64(hashlib.sha256(code_verifier.encode()).digest()),
            "code_challenge_method": "S256",
        }
    )
    return f"{doc['authorization_endpoint']}?{query}", cookie


def finish(
    *, verifier: Verifier, cookie: str | None, code: str, state: str, redirect_uri: str
) -> tuple[Principal, str]:
    """Exchange the code, verify the ID token; (the signed-in principal, where to go back)."""
    settings = verifier.settings
    assert settings.auth_oidc_issuer is not None
    if not cookie:
        raise BadRequest("sign-in expired or started elsewhere: start again")
    try:
        pending = verifier.verify(cookie, audience=_STATE_AUDIENCE)
    except TokenInvalid as exc:
        raise BadRequest("sign-in expired or started elsewhere: start again") from exc
    if not secrets.compare_digest(str(pending.get("state", "")), state):
        raise BadRequest("sign-in state does not match: start again")
    doc = _discovery(settings.auth_oidc_issuer)
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": redirect_uri,
        "client_id": settings.auth_oidc_client_id,
        "code_verifier": str(pending["cv"]),
    }
    auth = (
        httpx.BasicAuth(settings.auth_oidc_client_id, settings.auth_oidc_client_secret)
        if settings.auth_oidc_client_secret
        else httpx.Auth()  # a public client: no authentication
    )
    try:
        with network.guarded_client(timeout=10) as client:
            r = client.post(doc["token_endpoint"], data=form, auth=auth)
    except network.OutboundRefused:
        raise _refused("token endpoint") from None
    except httpx.HTTPError as exc:
        raise Unavailable("the sign-in provider cannot be reached") from exc
    if r.status_code != 200:
        raise BadRequest("the sign-in provider refused the sign-in")
    id_token = r.json().get("id_token")
    if not isinstance(id_token, str):
        raise BadRequest("the sign-in provider sent no ID token")
    try:
        claims = verifier.verify(id_token, audience=settings.auth_oidc_client_id)
        if claims.get("iss") != settings.auth_oidc_issuer:
            raise TokenInvalid("ID token from another issuer")
        if not secrets.compare_digest(str(claims.get("nonce", "")), str(pending["nonce"])):
            raise TokenInvalid("ID token nonce does not match")
        principal = verifier.principal_from_claims(claims, via="session")
    except TokenInvalid as exc:
        raise BadRequest(f"sign-in refused: {exc}") from exc
    return principal, str(pending.get("next") or "/")
