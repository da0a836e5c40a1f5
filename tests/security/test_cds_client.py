"""CDS Hooks client authentication as the spec prescribes: the EHR signs a JWT with a key from its
registered JWKS URL, `aud` is the service's URL, and a `jti` is accepted once."""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from joserfc import jwt
from joserfc.jwk import ECKey

from broker.app import create_app
from broker.db import make_engine, migrate
from broker.security.service import claim_token_id, purge_token_ids
from broker.settings import Settings
from tests.conftest import Backend, CuttablePg

EHR = "https://ehr.example"


@pytest.fixture(scope="module")
def ehr_jwks() -> Iterator[tuple[str, ECKey]]:
    """The EHR's JWKS on a loopback port (where the broker fetches its keys)."""
    key = ECKey.generate_key("P-384", auto_kid=True)
    body = json.dumps({"keys": [key.as_dict(private=False)]}).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/jwks", key
    finally:
        server.shutdown()


@pytest.fixture
def client(ehr_jwks: tuple[str, ECKey], tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(data_dir=tmp_path, cds_clients={EHR: ehr_jwks[0]})
    with TestClient(create_app(settings)) as c:
        yield c


def _service(client: TestClient) -> str:
    return str(client.get("/cds-services").json()["services"][0]["id"])


def _jwt(
    key: ECKey, *, aud: str | list[str], iss: str = EHR, jti: str | None = None, exp: int | None = None
) -> str:
    now = int(time.time())
    claims = {"iss": iss, "aud": aud, "iat": now, "exp": exp or now + 300, "jti": jti or secrets.token_hex(8)}
    header = {"alg": "ES384", "kid": key.kid, "jku": "https://attacker.example/jwks"}
    return jwt.encode(header, claims, key, algorithms=["ES384"])


def _call(client: TestClient, path: str, token: str) -> int:
    # Not a valid hook request: an authenticated call is refused by the service itself (400).
    r = client.post(path, json={"hook": "nothing"}, headers={"Authorization": f"Bearer {token}"})
    return r.status_code


def test_the_ehrs_signed_jwt_is_accepted_once(client: TestClient, ehr_jwks: tuple[str, ECKey]) -> None:
    path = f"/cds-services/{_service(client)}"
    token = _jwt(ehr_jwks[1], aud=f"http://testserver{path}")
    assert _call(client, path, token) == 400  # past the guard: the service answers
    assert _call(client, path, token) == 401  # the same jti again: a replay


def test_feedback_is_authenticated_for_its_service(client: TestClient, ehr_jwks: tuple[str, ECKey]) -> None:
    path = f"/cds-services/{_service(client)}"
    assert _call(client, path + "/feedback", _jwt(ehr_jwks[1], aud=f"http://testserver{path}")) == 400


def test_feedback_takes_its_own_url_as_aud(client: TestClient, ehr_jwks: tuple[str, ECKey]) -> None:
    # CDS Hooks 2.0: `aud` is "the URL of the CDS Service endpoint being invoked"; for feedback
    # some EHRs read that as the feedback URL they call. Both are this service's feedback.
    path = f"/cds-services/{_service(client)}/feedback"
    assert _call(client, path, _jwt(ehr_jwks[1], aud=f"http://testserver{path}")) == 400
    listed = _jwt(ehr_jwks[1], aud=["https://other.example/cds", f"http://testserver{path}"])
    assert _call(client, path, listed) == 400


@pytest.mark.parametrize("case", ["other-service", "other-host", "service-call", "bare-feedback"])
def test_feedback_auds_of_other_endpoints_are_refused(
    client: TestClient, ehr_jwks: tuple[str, ECKey], case: str
) -> None:
    service = f"/cds-services/{_service(client)}"
    key = ehr_jwks[1]
    path, aud = {
        "other-service": (f"{service}/feedback", "http://testserver/cds-services/another/feedback"),
        "other-host": (f"{service}/feedback", f"https://elsewhere.example{service}/feedback"),
        # A hook call's `aud` is the service's URL: its feedback URL names another endpoint.
        "service-call": (service, f"http://testserver{service}/feedback"),
        # A service whose id is "feedback" is no feedback endpoint: the root is not its URL.
        "bare-feedback": ("/cds-services/feedback", "http://testserver/cds-services"),
    }[case]
    assert _call(client, path, _jwt(key, aud=aud)) == 401


@pytest.mark.parametrize("case", ["other-service", "other-host", "expired", "unregistered", "other-key"])
def test_bad_ehr_jwts_are_refused(client: TestClient, ehr_jwks: tuple[str, ECKey], case: str) -> None:
    path = f"/cds-services/{_service(client)}"
    aud = f"http://testserver{path}"
    key = ehr_jwks[1]
    token = {
        "other-service": lambda: _jwt(key, aud="http://testserver/cds-services/another"),
        "other-host": lambda: _jwt(key, aud=f"https://elsewhere.example{path}"),
        "expired": lambda: _jwt(key, aud=aud, exp=int(time.time()) - 600),
        "unregistered": lambda: _jwt(key, aud=aud, iss="https://rogue-ehr.example"),
        "other-key": lambda: _jwt(ECKey.generate_key("P-384", auto_kid=True), aud=aud),
    }[case]()
    assert _call(client, path, token) == 401


def test_an_ehr_jwt_opens_nothing_but_the_cds_services(
    client: TestClient, ehr_jwks: tuple[str, ECKey]
) -> None:
    token = _jwt(ehr_jwks[1], aud="http://testserver/dicom-web/studies")
    r = client.get("/dicom-web/studies", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 401


def test_a_replay_to_another_node_is_refused(
    backend: Backend, tmp_path: Path, ehr_jwks: tuple[str, ECKey]
) -> None:
    """Two nodes on one database (PostgreSQL, or one SQLite file shared by two processes of a
    node): a token used on one is refused by the other, and by the first again."""
    nodes = []
    for name in ("a", "b"):
        settings = Settings(
            data_dir=tmp_path / name,
            database_url=backend.database_url,
            storage_url=backend.storage_url,
            cds_clients={EHR: ehr_jwks[0]},
            mllp_port=0,
        )
        nodes.append(TestClient(create_app(settings)))
    a, b = nodes
    path = f"/cds-services/{_service(a)}"
    token = _jwt(ehr_jwks[1], aud=f"http://testserver{path}")
    assert _call(a, path, token) == 400  # accepted: the service answers
    assert _call(b, path, token) == 401  # the same jti on the other node: a replay
    assert _call(a, path, token) == 401
    fresh = _jwt(ehr_jwks[1], aud=f"http://testserver{path}")
    assert _call(b, path, fresh) == 400  # a new jti is accepted on either
    for node in nodes:
        node.app.state.scanonce.engine.dispose()  # type: ignore[attr-defined]


def test_expired_token_ids_are_purged_or_taken_over(backend: Backend) -> None:
    engine = make_engine(backend.database_url)
    try:
        migrate(engine)
        assert claim_token_id(engine=engine, key="k1", expires_at=1_000, now=500)
        assert not claim_token_id(engine=engine, key="k1", expires_at=1_000, now=900)
        # Past its expiry and not purged yet: a new token with that id is a first use.
        assert claim_token_id(engine=engine, key="k1", expires_at=3_000, now=1_001)
        assert claim_token_id(engine=engine, key="k2", expires_at=2_000, now=1_001)
        assert purge_token_ids(engine=engine, now=2_500) == 1  # k2 gone, k1 kept
        assert not claim_token_id(engine=engine, key="k1", expires_at=3_000, now=2_500)
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_a_token_that_cannot_be_checked_for_replay_is_refused_with_503(
    cuttable_pg: CuttablePg, tmp_path: Path, ehr_jwks: tuple[str, ECKey]
) -> None:
    """The database away: the jti cannot be recorded, so the token is not accepted (503, retry
    with a new token), never accepted unchecked."""
    settings = Settings(
        data_dir=tmp_path,
        database_url=cuttable_pg.database_url,
        cds_clients={EHR: ehr_jwks[0]},
        db_connect_timeout_seconds=2,
        mllp_port=0,
    )
    client = TestClient(create_app(settings))
    path = f"/cds-services/{_service(client)}"
    cuttable_pg.proxy.stop()
    r = client.post(
        path,
        json={"hook": "nothing"},
        headers={"Authorization": f"Bearer {_jwt(ehr_jwks[1], aud=f'http://testserver{path}')}"},
    )
    assert (r.status_code, r.headers.get("Retry-After")) == (503, "5"), r.text
    assert "127.0.0.1" not in r.text and "psycopg" not in r.text
    client.app.state.scanonce.engine.dispose()  # type: ignore[attr-defined]
