"""The one HTTP guard: an ASGI middleware that authenticates every request (bearer token, or the
pages' session cookie), asks the policy table (broker.security.policy) whether the caller may do
what the request asks, and hands the verified `Principal` to the app on `request.state.principal`.

It sits inside any audit or observability middleware (those are added after it), so that refused
requests (401, 403) are still seen and recorded by them.
"""

from __future__ import annotations

import hmac
import re
from dataclasses import replace
from typing import Any
from urllib.parse import quote

import anyio
import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker.errors import Unavailable
from broker.security import policy
from broker.security.schemas import Principal, Role
from broker.security.tokens import TokenInvalid, Verifier
from broker.settings import Settings

SESSION_COOKIE = "scanonce_session"
CSRF_HEADER = "x-csrf-token"
_SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
_MAX_AUTH_HEADER = 8192
PURPOSE_HEADER = b"x-purpose-of-use"


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


def _cookie(scope: Scope, name: str) -> str | None:
    raw = _header(scope, b"cookie")
    if not raw or len(raw) > 16384:
        return None
    for part in raw.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return None


# A service's feedback endpoint, and the service's own path in it.
_FEEDBACK_PATH = re.compile(r"(/cds-services/[^/]+)/feedback")


def _own_origin(scope: Scope) -> str:
    host = _header(scope, b"host") or ""
    return f"{scope.get('scheme', 'http')}://{host}"


class AuthGuard:
    """Authenticate, authorize, and pass the principal on; refuse with 401/403 otherwise."""

    def __init__(self, app: ASGIApp, *, settings: Settings, verifier: Verifier | None) -> None:
        self.app = app
        self.settings = settings
        self.verifier = verifier
        self.open_principal = Principal(
            who="anonymous", role=Role.admin, facility=settings.default_facility, via="anonymous"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        if not self.settings.auth_enabled or self.verifier is None:
            # Authentication switched off (loopback development, benchmarks): the embedded
            # default's caller is an administrator of the default facility.
            state["principal"] = self.open_principal
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        if method == "OPTIONS" or policy.is_public(method, path):
            await self.app(scope, receive, send)
            return
        try:
            principal, claims = await self._authenticate(scope)
        except TokenInvalid as exc:
            await self._refuse_401(scope, send, str(exc))
            return
        except Unavailable as exc:
            # A one-time token could not be checked for replay (the database is away): refused
            # for now, never accepted unchecked; the client may send a new one shortly.
            await _json(scope, send, 503, exc.title, exc.message, [(b"retry-after", b"5")])
            return
        if principal is None:
            await self._refuse_401(scope, send, None)
            return
        if principal.purpose_of_use is None:
            # A purpose of use stated by the client when its token carries none (a token's claim,
            # set by its issuer, is never overridden by a header).
            stated = _header(scope, PURPOSE_HEADER)
            if stated and len(stated) <= 32:
                principal = replace(principal, purpose_of_use=stated.strip().upper())
        state["principal"] = principal
        if principal.via == "session" and method not in _SAFE_METHODS and not _csrf_ok(scope, claims):
            await _json(scope, send, 403, "Forbidden", "cross-site request refused (CSRF check failed)")
            return
        decision = policy.decide(principal, method, path, default_facility=self.settings.default_facility)
        if not decision.allowed:
            await _json(scope, send, 403, "Forbidden", "not permitted for this caller")
            return
        await self.app(scope, receive, send)

    async def _authenticate(self, scope: Scope) -> tuple[Principal | None, dict[str, Any]]:
        assert self.verifier is not None
        auth = _header(scope, b"authorization")
        via = "bearer"
        token: str | None = None
        if auth is not None:
            if len(auth) > _MAX_AUTH_HEADER:
                raise TokenInvalid("authorization header too large")
            scheme, _, value = auth.partition(" ")
            if scheme.lower() != "bearer" or not value.strip():
                raise TokenInvalid("expected a Bearer token")
            token = value.strip()
        else:
            token = _cookie(scope, SESSION_COOKIE)
            via = "session"
        if not token:
            return None, {}
        verifier = self.verifier
        issuer = verifier.unverified_issuer(token)
        if via == "bearer" and verifier.is_cds_client(issuer):
            return await self._cds_client(scope, token, issuer), {}
        if verifier.needs_fetch(issuer):
            claims = await anyio.to_thread.run_sync(verifier.verify, token)
        else:
            claims = verifier.verify(token)
        return verifier.principal_from_claims(claims, via=via), claims

    async def _cds_client(self, scope: Scope, token: str, issuer: str) -> Principal:
        """An EHR calling a CDS service with its own signed JWT: accepted on the CDS services only,
        as a clinician of the default facility (the EHR acts for the clinician at its screen)."""
        verifier = self.verifier
        assert verifier is not None
        path = scope["path"]
        if scope["method"] != "POST" or not path.startswith("/cds-services/"):
            raise TokenInvalid("a CDS client token is for the CDS services only")
        # `aud` is "the URL of the CDS Service endpoint being invoked" (CDS Hooks 2.0). For
        # feedback, EHRs read that either way: the feedback URL they call, or the service's URL
        # (what clients sent before that wording); both name this service, nothing else does.
        origin = _own_origin(scope)
        feedback = _FEEDBACK_PATH.fullmatch(path)
        audiences = (origin + feedback[1], origin + path) if feedback else (origin + path,)
        await anyio.to_thread.run_sync(lambda: verifier.verify_cds_client(token, audiences=audiences))
        return Principal(
            who=f"cds-client:{issuer}",
            role=Role.clinician,
            facility=self.settings.default_facility,
            via="cds-client",
            issuer=issuer,
            # CDS Hooks calls come from an ordering workflow: treatment.
            purpose_of_use="TREAT",
        )

    async def _refuse_401(self, scope: Scope, send: Send, error: str | None) -> None:
        accept = _header(scope, b"accept") or ""
        if scope["method"] == "GET" and "text/html" in accept and _header(scope, b"authorization") is None:
            # A person at a browser: to the sign-in page, and back here afterwards.
            target = scope["path"] + (
                f"?{scope['query_string'].decode('latin-1')}" if scope.get("query_string") else ""
            )
            await send(
                {
                    "type": "http.response.start",
                    "status": 303,
                    "headers": [(b"location", f"/auth/sign-in?next={quote(target, safe='')}".encode())],
                }
            )
            await send({"type": "http.response.body", "body": b""})
            return
        challenge = 'Bearer realm="scanonce"'
        if error:
            challenge += f', error="invalid_token", error_description="{error}"'
        await _json(
            scope,
            send,
            401,
            "Unauthorized",
            error or "authentication required: send a bearer token (scanonce token create)",
            headers=[(b"www-authenticate", challenge.encode())],
        )


def _csrf_ok(scope: Scope, claims: dict[str, Any]) -> bool:
    """A state-changing request under a session cookie must prove it comes from our own pages:
    the session's CSRF token in a header (scripts), or our own Origin (forms; browsers send it on
    every POST). SameSite=Lax already keeps the cookie off most cross-site requests."""
    sent = _header(scope, CSRF_HEADER.encode())
    expected = claims.get("csrf")
    if sent and isinstance(expected, str) and hmac.compare_digest(sent, expected):
        return True
    origin = _header(scope, b"origin")
    if origin is None:
        referer = _header(scope, b"referer")
        if referer:
            origin = "/".join(referer.split("/")[:3])
    return origin is not None and origin == _own_origin(scope)


# OperationOutcome issue types of the guard's refusals (FHIR R4 IssueType).
_FHIR_ISSUE = {401: "login", 403: "forbidden", 503: "transient"}


async def _json(
    scope: Scope,
    send: Send,
    status: int,
    error: str,
    detail: str,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    path = scope.get("path", "")
    if path == "/fhir" or path.startswith("/fhir/"):
        # A FHIR client reads every error as an OperationOutcome (docs/fhir.md), the guard's too.
        # Written out here: the security layer sits below broker.fhir and does not import it.
        issue = {"severity": "error", "code": _FHIR_ISSUE.get(status, "exception"), "diagnostics": detail}
        body = orjson.dumps({"resourceType": "OperationOutcome", "issue": [issue]})
        kind = b"application/fhir+json"
    else:
        body = orjson.dumps({"error": error, "detail": detail})
        kind = b"application/json"
    start: Message = {
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", kind), (b"content-length", str(len(body)).encode())] + (headers or []),
    }
    await send(start)
    await send({"type": "http.response.body", "body": body})
