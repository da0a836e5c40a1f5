"""Tokens the guard must refuse (401 with a Bearer challenge), tokens it must accept, an external
OpenID Connect issuer found through discovery, the CLI that mints tokens, and the refusal to
serve beyond loopback with authentication off."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from joserfc import jwt
from joserfc.jwk import ECKey, OctKey, RSAKey
from typer.testing import CliRunner

from broker.app import create_app
from broker.cli import app as cli
from broker.settings import Settings
from tests.support import auth_headers, mint_token

QIDO = "/dicom-web/studies"


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def _claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {"iss": "scanonce", "aud": "scanonce", "sub": "x", "role": "admin", "iat": now, "exp": now + 600}
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> FastAPI:
    return create_app(Settings(data_dir=tmp_path_factory.mktemp("tokens")))


@pytest.fixture(scope="module")
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as c:
        yield c


def _own_key(app: FastAPI) -> ECKey:
    return app.state.auth.signing_key


def _sign(key: Any, claims: dict[str, Any], alg: str = "ES256") -> str:
    return jwt.encode({"alg": alg, "kid": getattr(key, "kid", None) or "k"}, claims, key, algorithms=[alg])


def _status(client: TestClient, token: str) -> tuple[int, str]:
    r = client.get(QIDO, headers={"Authorization": f"Bearer {token}"})
    return r.status_code, r.headers.get("www-authenticate", "")


def test_a_valid_token_is_accepted(client: TestClient) -> None:
    assert client.get(QIDO, headers=auth_headers("clinician")).status_code == 204  # none stored yet


@pytest.mark.parametrize(
    "claims",
    [
        pytest.param(_claims(exp=int(time.time()) - 3600), id="expired"),
        pytest.param(_claims(nbf=int(time.time()) + 3600), id="not-yet-valid"),
        pytest.param(_claims(aud="another-service"), id="other-audience"),
        pytest.param(_claims(aud=None), id="no-audience"),
        pytest.param(_claims(exp=None), id="no-expiry"),
        pytest.param(_claims(role="superuser"), id="unknown-role"),
    ],
)
def test_bad_claims_are_refused(app: FastAPI, client: TestClient, claims: dict[str, Any]) -> None:
    status, challenge = _status(client, _sign(_own_key(app), claims))
    assert status == 401
    assert challenge.startswith('Bearer realm="scanonce", error="invalid_token"')


def test_an_untrusted_issuer_is_refused(app: FastAPI, client: TestClient) -> None:
    assert _status(client, _sign(_own_key(app), _claims(iss="https://evil.example")))[0] == 401


def test_signed_by_another_key_is_refused(client: TestClient) -> None:
    stranger = ECKey.generate_key("P-256", auto_kid=True)
    assert _status(client, _sign(stranger, _claims()))[0] == 401


def test_alg_none_is_refused(client: TestClient) -> None:
    token = f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(_claims())}."
    assert _status(client, token)[0] == 401


def test_hs256_key_confusion_is_refused(app: FastAPI, client: TestClient) -> None:
    # The classic forgery: HMAC keyed with the issuer's *public* key, which anyone can fetch.
    public = json.dumps(_own_key(app).as_dict(private=False)).encode()
    forged = _sign(OctKey.import_key(public), _claims(), alg="HS256")
    assert _status(client, forged)[0] == 401


def test_a_tampered_token_is_refused(client: TestClient) -> None:
    header, payload, signature = mint_token("clinician").split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["role"] = "admin"
    assert _status(client, f"{header}.{_b64(claims)}.{signature}")[0] == 401


@pytest.mark.parametrize(
    "value", ["Basic dXNlcjpwYXNz", "Bearer", "Bearer not.a.jwt", "Bearer " + "a" * 20000]
)
def test_malformed_authorization_is_refused(client: TestClient, value: str) -> None:
    r = client.get(QIDO, headers={"Authorization": value})
    assert r.status_code == 401
    assert r.headers["www-authenticate"].startswith("Bearer")


def test_a_refusal_leaks_no_claims(app: FastAPI, client: TestClient) -> None:
    r = client.get(
        QIDO,
        headers={"Authorization": "Bearer " + _sign(_own_key(app), _claims(aud="x", sub="DOE^JANE-MRN-123"))},
    )
    assert r.status_code == 401 and "DOE" not in r.text and "DOE" not in r.headers["www-authenticate"]


# -- an external OpenID Connect issuer ------------------------------------------------------


@pytest.fixture(scope="module")
def provider() -> Iterator[tuple[str, RSAKey]]:
    """A minimal OIDC issuer on loopback: discovery document and JWKS (what the broker fetches)."""
    key = RSAKey.generate_key(2048, auto_kid=True)
    fetches: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            fetches.append(self.path)
            base = f"http://127.0.0.1:{self.server.server_address[1]}"  # type: ignore[index]
            if self.path == "/.well-known/openid-configuration":
                body: dict[str, Any] = {"issuer": base, "jwks_uri": base + "/jwks"}
            elif self.path == "/jwks":
                body = {"keys": [key.as_dict(private=False)]}
            else:
                self.send_response(404)
                self.end_headers()
                return
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", key
    finally:
        server.shutdown()


def test_an_external_issuers_token_is_verified_with_its_jwks(
    provider: tuple[str, RSAKey], tmp_path: Path
) -> None:
    issuer, key = provider
    settings = Settings(data_dir=tmp_path, auth_trusted_issuers=[issuer])
    with TestClient(create_app(settings)) as client:
        good = _sign(key, _claims(iss=issuer, role="radiologist"), alg="RS256")
        assert _status(client, good)[0] == 204
        assert _status(client, _sign(key, _claims(iss=issuer, aud="other"), alg="RS256"))[0] == 401
        # The provider's key, but an issuer the broker was not told to trust.
        assert _status(client, _sign(key, _claims(iss="http://127.0.0.1:1"), alg="RS256"))[0] == 401
    with TestClient(create_app(Settings(data_dir=tmp_path))) as client:
        assert _status(client, good)[0] == 401  # not configured: not trusted


# -- the command line ------------------------------------------------------------------------


def test_token_create_prints_a_token_the_broker_accepts(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli,
        [
            "token",
            "create",
            "--role",
            "radiologist",
            "--subject",
            "dr-x",
            "--expires",
            "5m",
            "--data-dir",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    token = result.output.strip()
    with TestClient(create_app(Settings(data_dir=tmp_path))) as client:
        assert _status(client, token)[0] == 204
        assert (
            client.delete("/api/facilities/local", headers={"Authorization": f"Bearer {token}"}).status_code
            == 403
        )


def test_token_create_refuses_a_bad_lifetime(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli,
        [
            "token",
            "create",
            "--role",
            "admin",
            "--subject",
            "x",
            "--expires",
            "soon",
            "--data-dir",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 2 and "not a duration" in result.output


def test_serve_beyond_loopback_with_auth_off_refuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCANONCE_AUTH_ENABLED", "false")
    result = CliRunner().invoke(cli, ["serve", "--host", "0.0.0.0", "--data-dir", str(tmp_path)])
    assert result.exit_code == 1
    said = " ".join(result.output.split())
    assert said.startswith("Refusing to serve: authentication is off"), said
    assert "HTTP would listen on 0.0.0.0" in said, said
    assert not (tmp_path / "index.sqlite3").exists()  # refused before anything was created


def test_a_cached_token_still_expires(app: FastAPI, monkeypatch: pytest.MonkeyPatch) -> None:
    """Verified tokens are remembered (no second signature check), never past their `exp`."""
    from broker.security import tokens

    verifier = app.state.auth
    token = mint_token("clinician", expires_in=60)
    assert verifier.verify(token)["role"] == "clinician"
    assert verifier.verify(token)["role"] == "clinician"  # from the cache
    later = time.time() + 3600
    monkeypatch.setattr(tokens.time, "time", lambda: later)
    with pytest.raises(tokens.TokenInvalid):
        verifier.verify(token)


def test_the_demo_prints_a_working_token_per_role(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["demo", "--patients", "1", "--data-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    tokens = {
        lines[i].split()[0]: lines[i + 1].strip()
        for i in range(len(lines) - 1)
        if lines[i].startswith("  ") and lines[i + 1].startswith("    eyJ")
    }
    assert set(tokens) == {"admin", "clinician", "radiologist", "facility", "reviewer", "auditor"}
    with TestClient(create_app(Settings(data_dir=tmp_path))) as client:
        assert _status(client, tokens["clinician"])[0] == 200  # the demo's studies
        assert _status(client, tokens["auditor"])[0] == 403


def test_nodes_starting_together_all_get_the_one_signing_key(tmp_path: Path) -> None:
    """Several broker processes started at once on a shared data dir (tests/cluster starts three)
    each create the key if it is missing: none may read a half-written file, and all end up with
    the one key that won."""
    from concurrent.futures import ThreadPoolExecutor

    from broker.security.tokens import load_or_create_signing_key

    for round_ in range(20):
        path = tmp_path / f"round{round_}" / "signing-key.json"
        barrier = threading.Barrier(8)

        def load(_: int, path: Path = path, barrier: threading.Barrier = barrier) -> str:
            barrier.wait()
            return json.dumps(load_or_create_signing_key(path).as_dict(private=True), sort_keys=True)

        with ThreadPoolExecutor(8) as pool:
            keys = set(pool.map(load, range(8)))
        assert len(keys) == 1
        assert json.dumps(json.loads(path.read_text()), sort_keys=True) in keys
        assert [p.name for p in path.parent.iterdir()] == ["signing-key.json"]  # no temporary left
