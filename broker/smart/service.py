"""SMART App Launch, EHR launch (SMART App Launch 2.x): an EHR opens the pages with `iss` (its
FHIR base) and `launch` (an opaque handle on its current context); the broker sends the browser to
the EHR's authorization server (authorization code + PKCE, `aud=iss`, the `launch` handle), and on
the way back reads the `patient` launch context from the token response, reads that Patient from
the EHR's FHIR server with the access token just granted, and maps its identifiers onto the
patients the broker knows, so the lookup page opens on the EHR's current patient.

Only EHRs an administrator registered (`SCANONCE_SMART_EHRS`) are followed: the `iss` of a launch
URL is a string anyone can send, so it only selects among registered ones, and every call to the
EHR goes through the outbound network guard. The half-finished launch travels in a short-lived
cookie signed by the broker's key, as the pages' own OpenID Connect sign-in does.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import httpx
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from sqlmodel import Session

from broker.errors import BadRequest, Unavailable
from broker.facilities import service as facilities
from broker.lookup import service as lookup
from broker.security import network
from broker.security.schemas import Principal, Role
from broker.security.tokens import SIGNING_ALG, TokenInvalid, Verifier
from broker.settings import SmartEhr

STATE_COOKIE = "scanonce_smart"
STATE_PATH = "/launch"
SCOPES = "launch openid fhirUser patient/*.read"
_STATE_AUDIENCE = "scanonce-smart-state"
_STATE_SECONDS = 600
_TIMEOUT_S = 10
# A FHIR logical id (FHIR R4 `id` datatype): nothing else goes into the Patient read's URL.
_FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_START_AGAIN = "the launch expired or was started elsewhere: open the app from the EHR again"


@dataclass(frozen=True)
class Launched:
    """A finished launch: who signed in, and the EHR's patient as the broker knows it (None: a
    patient the broker has no record of)."""

    principal: Principal
    facility: str | None
    mrn: str | None
    identifier: str | None

    @property
    def known(self) -> bool:
        return self.mrn is not None or self.identifier is not None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _registered(ehrs: Mapping[str, SmartEhr], iss: str) -> tuple[str, SmartEhr]:
    wanted = iss.strip().rstrip("/")
    for base, ehr in ehrs.items():
        if base.rstrip("/") == wanted:
            return base.rstrip("/"), ehr
    raise BadRequest(
        "this EHR is not registered for launching ScanOnce (iss is not in SCANONCE_SMART_EHRS; "
        "an administrator registers it)"
    )


def _get_json(url: str, *, what: str, headers: Mapping[str, str] | None = None) -> dict[str, Any]:
    try:
        # Only to the administrator's outbound networks, however the EHR's documents name hosts.
        r = network.guarded_get(url, headers=dict(headers or {}), timeout=_TIMEOUT_S)
    except httpx.HTTPError as exc:
        raise Unavailable(f"the EHR's {what} cannot be reached ({type(exc).__name__})") from None
    if r.status_code != 200:
        raise Unavailable(f"the EHR's {what} answered {r.status_code}")
    try:
        data = r.json()
    except ValueError:
        raise Unavailable(f"the EHR's {what} is not JSON") from None
    if not isinstance(data, dict):
        raise Unavailable(f"the EHR's {what} is not a JSON object")
    return data


def _smart_configuration(base: str) -> dict[str, Any]:
    conf = _get_json(f"{base}/.well-known/smart-configuration", what="SMART configuration")
    for key in ("authorization_endpoint", "token_endpoint"):
        value = conf.get(key)
        if not isinstance(value, str) or not value.startswith(("http://", "https://")):
            raise Unavailable(f"the EHR's SMART configuration has no {key}")
    return conf


def start(*, verifier: Verifier, iss: str, launch: str, redirect_uri: str) -> tuple[str, str]:
    """(the EHR's authorization URL, the signed state cookie's value)."""
    if not launch or len(launch) > 2048:
        raise BadRequest("the EHR sent no launch context (launch)")
    base, ehr = _registered(verifier.settings.smart_ehrs, iss)
    conf = _smart_configuration(base)
    state, nonce, code_verifier = (
        secrets.token_urlsafe(24),
        secrets.token_urlsafe(24),
        secrets.token_urlsafe(48),
    )
    cookie = jwt.encode(
        {"alg": SIGNING_ALG, "kid": verifier.signing_key.kid},
        {
            "iss": verifier.settings.auth_issuer,
            "aud": _STATE_AUDIENCE,
            "sub": "smart-launch",
            "exp": int(time.time()) + _STATE_SECONDS,
            "state": state,
            "nonce": nonce,
            "cv": code_verifier,
            "ehr": base,
        },
        verifier.signing_key,
    )
    query = urlencode(
        {
            "response_type": "code",
            "client_id": ehr.client_id,
            "redirect_uri": redirect_uri,
            "scope": SCOPES,
            "state": state,
            "nonce": nonce,
            "aud": base,
            "launch": launch,
            "code_challenge": _b64(hashlib.sha256(code_verifier.encode()).digest()),
            "code_challenge_method": "S256",
        }
    )
    endpoint = str(conf["authorization_endpoint"])
    return f"{endpoint}{'&' if '?' in endpoint else '?'}{query}", cookie


def _exchange(conf: Mapping[str, Any], ehr: SmartEhr, *, code: str, verifier: str, redirect_uri: str) -> Any:
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": redirect_uri,
        "client_id": ehr.client_id,
        "code_verifier": verifier,
    }
    # A public client (PKCE only) sends no credentials: httpx.Auth() leaves the request as it is.
    auth = httpx.BasicAuth(ehr.client_id, ehr.client_secret) if ehr.client_secret else httpx.Auth()
    try:
        with network.guarded_client(timeout=_TIMEOUT_S) as client:
            r = client.post(str(conf["token_endpoint"]), data=form, auth=auth)
    except httpx.HTTPError as exc:
        name = type(exc).__name__
        raise Unavailable(f"the EHR's authorization server cannot be reached ({name})") from None
    if r.status_code != 200:
        raise BadRequest("the EHR's authorization server refused the launch")
    try:
        return r.json()
    except ValueError:
        raise BadRequest("the EHR's authorization server answered with something other than JSON") from None


def _id_token_claims(conf: Mapping[str, Any], ehr: SmartEhr, id_token: Any, nonce: str) -> dict[str, Any]:
    """The verified claims of the EHR's ID token: signed by its issuer's keys (from the issuer's
    OpenID discovery, outbound-guarded), for this client, unexpired, our nonce."""
    issuer = conf.get("issuer")
    if not isinstance(id_token, str) or not isinstance(issuer, str) or not issuer:
        raise BadRequest("the EHR sent no ID token (scope openid) or names no issuer")
    discovery = _get_json(
        f"{issuer.rstrip('/')}/.well-known/openid-configuration", what="OpenID configuration"
    )
    jwks_uri = discovery.get("jwks_uri")
    if not isinstance(jwks_uri, str):
        raise Unavailable("the EHR's OpenID configuration has no jwks_uri")
    try:
        keys = KeySet.import_key_set(_get_json(jwks_uri, what="signing keys"))  # type: ignore[arg-type]
        decoded = jwt.decode(id_token, keys, algorithms=["ES256", "ES384", "RS256", "RS384", "PS256"])
        jwt.JWTClaimsRegistry(
            leeway=60,
            iss={"essential": True, "value": issuer},
            aud={"essential": True, "value": ehr.client_id},
            exp={"essential": True},
            sub={"essential": True},
            nonce={"essential": True, "value": nonce},
        ).validate(decoded.claims)
    except (JoseError, ValueError) as exc:
        raise BadRequest(f"the EHR's ID token is refused ({type(exc).__name__})") from None
    return decoded.claims


def finish(
    *, verifier: Verifier, session: Session, cookie: str | None, code: str, state: str, redirect_uri: str
) -> Launched:
    """Exchange the code, verify the ID token, read the launch's patient; BadRequest on any
    mismatch (nothing is stored, no session is made)."""
    if not cookie:
        raise BadRequest(_START_AGAIN)
    try:
        pending = verifier.verify(cookie, audience=_STATE_AUDIENCE)
    except TokenInvalid:
        raise BadRequest(_START_AGAIN) from None
    if not secrets.compare_digest(str(pending.get("state", "")), state):
        raise BadRequest("the launch's state does not match: open the app from the EHR again")
    base, ehr = _registered(verifier.settings.smart_ehrs, str(pending.get("ehr", "")))
    conf = _smart_configuration(base)
    tokens = _exchange(conf, ehr, code=code, verifier=str(pending["cv"]), redirect_uri=redirect_uri)
    if not isinstance(tokens, dict) or not isinstance(tokens.get("access_token"), str):
        raise BadRequest("the EHR's authorization server sent no access token")
    claims = _id_token_claims(conf, ehr, tokens.get("id_token"), str(pending["nonce"]))
    patient_id = tokens.get("patient")
    if not isinstance(patient_id, str) or not _FHIR_ID.match(patient_id):
        raise BadRequest("the EHR sent no patient with the launch (launch context `patient`)")
    patient = _get_json(
        f"{base}/Patient/{patient_id}",
        what="FHIR server",
        headers={"accept": "application/fhir+json", "authorization": f"Bearer {tokens['access_token']}"},
    )
    if patient.get("resourceType") != "Patient":
        raise Unavailable("the EHR's FHIR server did not answer with a Patient")
    # The role is the one the administrator gave this EHR, never one the EHR's token asserts.
    principal = Principal(
        who=str(claims["sub"]),
        role=Role(ehr.role),
        facility=ehr.facility or verifier.settings.default_facility,
        via="session",
        issuer=str(claims["iss"]),
    )
    who = lookup.known_fhir_patient(session=session, patient=patient)
    if who is None:
        return Launched(principal=principal, facility=None, mrn=None, identifier=None)
    facility = next((f.id for f in facilities.list_facilities(session=session) if f.issuer == who[0]), None)
    if facility is not None:
        return Launched(principal=principal, facility=facility, mrn=who[1], identifier=None)
    return Launched(principal=principal, facility=None, mrn=None, identifier=f"{who[0]}|{who[1]}")


def lookup_path(launched: Launched) -> str:
    """The lookup page opened on the launched patient."""
    if launched.facility and launched.mrn:
        return "/?" + urlencode({"facility": launched.facility, "mrn": launched.mrn})
    return "/?" + urlencode({"identifier": launched.identifier or ""})
