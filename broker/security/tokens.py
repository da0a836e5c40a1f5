"""Bearer tokens: the embedded issuer (the broker signs its own ES256 tokens with a key kept in the
data dir) and verification of every token against its issuer's keys (the broker's own, or an
external OpenID Connect provider's JWKS found through discovery and cached).

A token is accepted only with an issuer the settings name, the configured audience, a signature by
one of that issuer's keys with an allowed algorithm (never `none`, never HMAC: an HMAC allow-listed
beside a public key is the classic key-confusion forgery), and `exp`/`nbf` in range.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, KeySet
from joserfc.jws import extract_compact
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from broker.errors import InvalidSetting
from broker.security import network
from broker.security import service as security
from broker.security.schemas import Principal, Role
from broker.settings import Settings

SIGNING_ALG = "ES256"
_SYMMETRIC = {"HS256", "HS384", "HS512", "none"}
# A token is a few hundred bytes; anything near this is not one (and is not parsed).
MAX_TOKEN_BYTES = 8192
_JWKS_TTL_SECONDS = 300.0
_JWKS_MIN_REFRESH_SECONDS = 30.0
_CLOCK_LEEWAY_SECONDS = 30
_VERIFIED_CACHE_SIZE = 4096
# How often a node deletes expired one-time token ids from the database (each node does; the
# DELETE uses the expiry index, so its cost is the rows it removes).
_PURGE_EVERY_SECONDS = 60.0
log = logging.getLogger("scanonce.security")
# The claim that states the caller's purpose of use (HL7 v3 PurposeOfUse code, e.g. TREAT).
PURPOSE_OF_USE_CLAIM = "purpose_of_use"


class TokenInvalid(Exception):
    """A token that must not be accepted; the message is safe to return (no claims echoed)."""


_SIGNING_CURVE = "P-256"  # what ES256 signs with
_OTHER_TYPES = {"RSA": "an RSA key", "oct": "a symmetric (oct) key", "OKP": "an OKP (EdDSA) key"}


class _Unusable(ValueError):
    """A key file that parses, but holds a key the broker cannot sign its tokens with."""


def load_or_create_signing_key(path: Path) -> ECKey:
    """The embedded issuer's private key; created (mode 0600) by the first process that needs it.
    One that cannot be read, parsed or created, or cannot sign ES256 (a public key alone, another
    type or curve), is `InvalidSetting` naming the setting (never its content), at start rather
    than at the first token. The operator's file is left as it is, since replacing it would void
    every token."""
    try:
        return _load_or_create(path)
    except OSError as exc:
        raise InvalidSetting(
            f"SCANONCE_AUTH_SIGNING_KEY_FILE {path}: cannot read or create it ({exc.strerror})"
        ) from None
    except _Unusable as exc:
        raise InvalidSetting(
            f"SCANONCE_AUTH_SIGNING_KEY_FILE {path}: {exc}, and the broker signs its tokens (ES256) "
            f"with a private EC {_SIGNING_CURVE} key; restore the private key, or move the file away "
            "to have a new one made (tokens signed with the old one are then refused)"
        ) from None
    except (ValueError, JoseError) as exc:
        raise InvalidSetting(
            f"SCANONCE_AUTH_SIGNING_KEY_FILE {path}: not a private EC key in JWK JSON "
            f"({type(exc).__name__}); restore it, or move it away to have a new one made (tokens "
            "signed with the old one are then refused)"
        ) from None


def _read_key(path: Path) -> ECKey:
    """The key in the file, if it can sign: joserfc imports a public JWK, or one on any curve, as
    readily as the private P-256 key, and each of them would fail only at the first signing."""
    data = json.loads(path.read_text())
    kty = data.get("kty") if isinstance(data, dict) else None
    if isinstance(kty, str) and kty != "EC":
        # Named by its type, never by anything else of the file's text.
        raise _Unusable(f"it holds {_OTHER_TYPES.get(kty, 'a key that is not EC')}")
    key = ECKey.import_key(data)
    if key.curve_name != _SIGNING_CURVE:
        raise _Unusable(f"it holds an EC key on curve {key.curve_name}")
    if not key.is_private:
        raise _Unusable("it holds only a public key")
    return key


def _load_or_create(path: Path) -> ECKey:
    try:
        return _read_key(path)
    except FileNotFoundError:
        pass
    key = ECKey.generate_key("P-256", auto_kid=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written whole under a private name, then linked into place: link() fails if the name exists,
    # so of several nodes starting together one wins, and no other ever reads a half-written key
    # (an O_EXCL create exposes the empty file until its writer is done).
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(key.as_dict(private=True), f)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return _read_key(path)
    finally:
        os.unlink(tmp)
    return key


def public_jwks(key: ECKey) -> dict[str, Any]:
    public = key.as_dict(private=False)
    public.update({"use": "sig", "alg": SIGNING_ALG})
    return {"keys": [public]}


def mint(
    *,
    key: ECKey,
    settings: Settings,
    subject: str,
    role: Role | str,
    facility: str | None,
    expires_in: int = 3600,
    extra: dict[str, Any] | None = None,
) -> str:
    """A bearer token from the embedded issuer."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": settings.auth_issuer,
        "aud": settings.auth_audience,
        "sub": subject,
        "iat": now,
        "nbf": now,
        "exp": now + expires_in,
        "jti": secrets.token_urlsafe(12),
        settings.auth_role_claim: str(Role(role)),
    }
    if facility:
        claims[settings.auth_facility_claim] = facility
    if Role(role) in (Role.clinician, Role.radiologist):
        # The embedded issuer's clinical users look up and view priors to treat the patient in
        # front of them (HL7 v3 PurposeOfUse TREAT); `extra={"purpose_of_use": None}` omits it.
        claims[PURPOSE_OF_USE_CLAIM] = "TREAT"
    claims.update(extra or {})
    claims = {k: v for k, v in claims.items() if v is not None}
    return jwt.encode({"alg": SIGNING_ALG, "kid": key.kid}, claims, key)


@dataclass
class _CachedKeys:
    keys: KeySet
    fetched: float


@dataclass
class Verifier:
    """Verifies tokens of the embedded issuer and of the configured external issuers.

    `engine`: where one-time token ids are recorded for the whole fleet (without it, a replay is
    caught only by this process)."""

    settings: Settings
    signing_key: ECKey
    engine: Engine | None = None
    _remote: dict[str, _CachedKeys] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _seen: dict[str, float] = field(default_factory=dict)
    _verified: dict[tuple[str, str | None], tuple[float, dict[str, Any]]] = field(default_factory=dict)
    _fetch_lock: threading.Lock = field(default_factory=threading.Lock)
    _next_purge: float = 0.0

    def __post_init__(self) -> None:
        self._own = KeySet([ECKey.import_key(self.signing_key.as_dict(private=False))])
        self._algorithms = [a for a in self.settings.auth_algorithms if a not in _SYMMETRIC]

    def unverified_issuer(self, token: str) -> str:
        if len(token) > MAX_TOKEN_BYTES:
            raise TokenInvalid("token too large")
        try:
            claims = json.loads(extract_compact(token.encode("ascii")).payload)
        except (JoseError, ValueError, UnicodeError) as exc:
            raise TokenInvalid("malformed token") from exc
        iss = claims.get("iss") if isinstance(claims, dict) else None
        if not isinstance(iss, str):
            raise TokenInvalid("token has no issuer")
        return iss

    def needs_fetch(self, issuer: str) -> bool:
        """True when verifying a token of `issuer` would fetch its keys (callers on an event loop
        then verify in a worker thread)."""
        if issuer in self.settings.cds_clients:
            cached = self._remote.get("cds:" + issuer)
        elif issuer == self.settings.auth_issuer or issuer not in (
            *self.settings.auth_trusted_issuers,
            self.settings.auth_oidc_issuer,
        ):
            return False
        else:
            cached = self._remote.get(issuer)
        return cached is None or time.monotonic() - cached.fetched > _JWKS_TTL_SECONDS

    def is_cds_client(self, issuer: str) -> bool:
        return issuer in self.settings.cds_clients

    def verify_cds_client(self, token: str, *, audiences: Sequence[str]) -> dict[str, Any]:
        """A CDS Hooks client's JWT (CDS Hooks 2.0, "Trusting CDS Clients"): signed by a key from
        the JWKS registered for its `iss`, `aud` one of `audiences` (the URLs of the endpoint
        invoked), unexpired, `jti` never seen."""
        issuer = self.unverified_issuer(token)
        jwks_url = self.settings.cds_clients.get(issuer)
        if jwks_url is None:
            raise TokenInvalid("CDS client not registered")
        keys = self._fetch_keys("cds:" + issuer, jwks_url=jwks_url)
        try:
            decoded = jwt.decode(token, keys, algorithms=self._algorithms)
            jwt.JWTClaimsRegistry(
                leeway=_CLOCK_LEEWAY_SECONDS,
                iss={"essential": True, "value": issuer},
                aud={"essential": True, "values": list(audiences)},
                exp={"essential": True},
                jti={"essential": True},
            ).validate(decoded.claims)
        except JoseError as exc:
            raise TokenInvalid(f"CDS client token rejected ({exc})") from exc
        self._once(f"{issuer} {decoded.claims['jti']}", int(decoded.claims["exp"]))
        return decoded.claims

    def _once(self, jti: str, exp: int) -> None:
        """Refuse a `jti` already used, on any node (kept until its token expires). This process's
        own record answers a replay to the same process without asking the database; a first
        use is recorded in the database (`seen_token_id`), whose primary key decides between
        nodes, and only then accepted."""
        now = time.time()
        expires_at = exp + _CLOCK_LEEWAY_SECONDS
        with self._lock:
            if len(self._seen) > 10_000:
                self._seen = {k: v for k, v in self._seen.items() if v > now}
            seen = self._seen.get(jti)
            if seen is not None and seen > now:
                raise TokenInvalid("token replayed (jti already used)")
            if self.engine is None:
                self._seen[jti] = expires_at
                return
        key = hashlib.sha256(jti.encode()).hexdigest()
        first = security.claim_token_id(engine=self.engine, key=key, expires_at=expires_at, now=now)
        with self._lock:
            self._seen[jti] = expires_at
        if not first:
            raise TokenInvalid("token replayed (jti already used)")
        if now >= self._next_purge:
            self._next_purge = now + _PURGE_EVERY_SECONDS
            try:
                security.purge_token_ids(engine=self.engine, now=now)
            except SQLAlchemyError as exc:  # kept for the next purge; the check itself succeeded
                log.warning("purging expired token ids failed: %s", type(exc).__name__)

    def verify(self, token: str, *, audience: str | None = None) -> dict[str, Any]:
        """The verified claims of `token`, or TokenInvalid. A token verified before is not
        verified again until it expires (a signature check is ~0.1 ms; a client sends the same
        token on every request): the cache is keyed by the whole token, so any change misses."""
        cache_key = (token, audience)
        hit = self._verified.get(cache_key)
        if hit is not None:
            if hit[0] > time.time() - _CLOCK_LEEWAY_SECONDS:
                return hit[1]
            self._verified.pop(cache_key, None)
        claims = self._verify(token, audience=audience)
        if len(self._verified) >= _VERIFIED_CACHE_SIZE:
            self._verified.clear()  # crude but bounded; refilled by the next requests
        self._verified[cache_key] = (float(claims["exp"]), claims)
        return claims

    def _verify(self, token: str, *, audience: str | None) -> dict[str, Any]:
        issuer = self.unverified_issuer(token)
        if issuer == self.settings.auth_issuer:
            keys = self._own
        elif issuer in self.settings.auth_trusted_issuers or issuer == self.settings.auth_oidc_issuer:
            keys = self._remote_keys(issuer)
        else:
            raise TokenInvalid("issuer not trusted")
        try:
            decoded = jwt.decode(token, keys, algorithms=self._algorithms)
        except JoseError as exc:
            if issuer != self.settings.auth_issuer and not self._refreshed_recently(issuer):
                # The provider may have rotated its keys since they were cached: fetch once more.
                self._remote.pop(issuer, None)
                try:
                    decoded = jwt.decode(token, self._remote_keys(issuer), algorithms=self._algorithms)
                except JoseError as again:
                    raise TokenInvalid("invalid signature or algorithm") from again
            else:
                raise TokenInvalid("invalid signature or algorithm") from exc
        registry = jwt.JWTClaimsRegistry(
            leeway=_CLOCK_LEEWAY_SECONDS,
            iss={"essential": True, "value": issuer},
            aud={"essential": True, "value": audience or self.settings.auth_audience},
            exp={"essential": True},
            sub={"essential": True},
        )
        try:
            registry.validate(decoded.claims)
        except JoseError as exc:
            raise TokenInvalid(f"token rejected ({exc})") from exc
        return decoded.claims

    def principal(self, token: str, *, via: str = "bearer") -> Principal:
        return self.principal_from_claims(self.verify(token), via=via)

    def principal_from_claims(self, claims: dict[str, Any], *, via: str) -> Principal:
        try:
            role = Role(str(claims.get(self.settings.auth_role_claim, "")))
        except ValueError as exc:
            raise TokenInvalid("token carries no ScanOnce role") from exc
        facility = claims.get(self.settings.auth_facility_claim) or self.settings.default_facility
        pou = claims.get(PURPOSE_OF_USE_CLAIM)
        return Principal(
            who=str(claims["sub"]),
            role=role,
            facility=str(facility),
            via=via,
            issuer=str(claims["iss"]),
            purpose_of_use=str(pou) if pou else None,
        )

    def _refreshed_recently(self, issuer: str) -> bool:
        cached = self._remote.get(issuer)
        return cached is not None and time.monotonic() - cached.fetched < _JWKS_MIN_REFRESH_SECONDS

    def _remote_keys(self, issuer: str) -> KeySet:
        return self._fetch_keys(issuer, jwks_url=None)

    def _fetch_keys(self, cache_key: str, *, jwks_url: str | None) -> KeySet:
        """The keys of an issuer (through its discovery document) or at a registered JWKS URL.
        Only issuers and URLs an administrator configured are fetched, never one from a request."""
        cached = self._remote.get(cache_key)
        if cached is not None and time.monotonic() - cached.fetched <= _JWKS_TTL_SECONDS:
            return cached.keys
        with self._fetch_lock:
            try:
                if jwks_url is None:
                    # Discovery and keys only from the administrator's outbound networks.
                    discovery = network.guarded_get(
                        f"{cache_key.rstrip('/')}/.well-known/openid-configuration", timeout=5
                    )
                    discovery.raise_for_status()
                    jwks_url = str(discovery.json()["jwks_uri"])
                jwks = network.guarded_get(jwks_url, timeout=5)
                jwks.raise_for_status()
                keys = KeySet.import_key_set(jwks.json())
            except network.OutboundRefused as exc:
                raise TokenInvalid("issuer keys are at an address the broker may not call") from exc
            except (httpx.HTTPError, ValueError, KeyError, JoseError) as exc:
                if cached is not None:  # the provider is down: keep trusting the keys we had
                    return cached.keys
                raise TokenInvalid("issuer keys unavailable") from exc
            self._remote[cache_key] = _CachedKeys(keys=keys, fetched=time.monotonic())
            return keys
