"""Outbound calls on a caller's behalf go only to the networks an administrator allowed
(SCANONCE_OUTBOUND_ALLOW_NETWORKS), checked when a target is registered and on the address
actually connected to (DNS rebinding): against real HTTP servers on loopback addresses."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from fastapi.testclient import TestClient
from joserfc import jwt
from joserfc.jwk import ECKey

from broker.app import build_state, create_app
from broker.deps import AppState
from broker.facilities.models import Facility
from broker.federation.sync import sync_facility
from broker.peers.archive import QidoSource, wado_retrieve_study
from broker.security import network
from broker.security.tokens import TokenInvalid, Verifier
from broker.settings import Settings
from tests.support import auth_headers


class _Archive:
    """A tiny HTTP server that records the paths asked of it and answers an empty QIDO list."""

    def __init__(self, host: str, port: int = 0) -> None:
        self.paths: list[str] = []
        paths = self.paths

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                paths.append(self.path)
                body = b"[]"
                self.send_response(200)
                self.send_header("content-type", "application/dicom+json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def archives() -> Iterator[tuple[_Archive, _Archive]]:
    """The real archive on 127.0.0.1 and, on the same port, another host on 127.0.0.2 (where a
    rebinding name would send the broker)."""
    first = _Archive("127.0.0.1")
    try:
        second = _Archive("127.0.0.2", first.port)
    except OSError:
        first.close()
        pytest.skip("127.0.0.2 port taken")
    yield first, second
    first.close()
    second.close()


@pytest.fixture
def state(tmp_path: Path) -> Iterator[AppState]:
    state = build_state(Settings(data_dir=tmp_path / "data", mllp_port=0, dimse_port=0))
    yield state
    state.engine.dispose()


@pytest.fixture(autouse=True)
def _restore() -> Iterator[None]:
    yield
    network.configure(network.LOOPBACK)


def _facility(url: str) -> Facility:
    return Facility(id="remote", issuer="REMOTE", dicomweb_url=url)


def test_the_guarded_client_connects_only_to_allowed_networks(archives: tuple[_Archive, _Archive]) -> None:
    real, other = archives
    network.configure(["127.0.0.1/32"])
    assert QidoSource(_facility(f"http://127.0.0.1:{real.port}/dicom-web")).studies() == []
    assert real.paths and real.paths[0].startswith("/dicom-web/studies")
    with pytest.raises(network.OutboundRefused, match="SCANONCE_OUTBOUND_ALLOW_NETWORKS"):
        QidoSource(_facility(f"http://127.0.0.2:{other.port}/dicom-web")).studies()
    with pytest.raises(network.OutboundRefused):
        wado_retrieve_study(
            facility=_facility(f"http://127.0.0.2:{other.port}"), study_uid="1.2.3", into="/tmp"
        )
    assert other.paths == []  # never connected to


def test_a_name_that_rebinds_after_registration_is_refused_at_connect_time(
    archives: tuple[_Archive, _Archive], state: AppState, monkeypatch: pytest.MonkeyPatch
) -> None:
    real, other = archives
    network.configure(["127.0.0.1/32"])
    answer = {"archive.test": "127.0.0.1"}
    resolve = socket.getaddrinfo

    def fake_dns(host: str, port: Any, *args: Any, **kwargs: Any) -> Any:
        # The only stand-in here: a DNS server whose answer the test changes.
        return resolve(answer.get(host, host), port, *args, **kwargs)

    monkeypatch.setattr(network.socket, "getaddrinfo", fake_dns)
    client = TestClient(create_app(state=state), headers=auth_headers())
    url = f"http://archive.test:{real.port}/dicom-web"
    r = client.post("/api/facilities", json={"id": "rebind", "issuer": "REBIND", "dicomweb_url": url})
    assert r.status_code == 201, r.text
    assert QidoSource(_facility(url)).studies() == [] and real.paths

    answer["archive.test"] = "127.0.0.2"  # the name now points elsewhere
    with pytest.raises(network.OutboundRefused):
        QidoSource(_facility(url)).studies()
    assert other.paths == []


def test_registering_a_target_outside_the_allowed_networks_is_a_400_and_stores_nothing(
    state: AppState,
) -> None:
    client = TestClient(create_app(state=state), headers=auth_headers())
    for body in (
        {"id": "far", "issuer": "FAR", "dicomweb_url": "http://10.1.2.3/dicom-web"},
        {"id": "far", "issuer": "FAR", "ae_title": "FARPACS", "host": "192.168.7.7", "port": 104},
    ):
        r = client.post("/api/facilities", json=body)
        assert r.status_code == 400 and "SCANONCE_OUTBOUND_ALLOW_NETWORKS" in r.json()["detail"], r.text
        assert client.get("/api/facilities/far").status_code == 404
    near = client.post(
        "/api/facilities", json={"id": "near", "issuer": "NEAR", "dicomweb_url": "http://127.0.0.1:9/x"}
    )
    assert near.status_code == 201
    assert client.patch("/api/facilities/near", json={"dicomweb_url": "http://10.1.2.3/x"}).status_code == 400
    assert client.get("/api/facilities/near").json()["dicomweb_url"] == "http://127.0.0.1:9/x"


def test_the_setting_is_validated_and_defaults_to_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().outbound_allow_networks == ["127.0.0.0/8", "::1/128"]
    monkeypatch.setenv("SCANONCE_OUTBOUND_ALLOW_NETWORKS", "10.1.0.0/16, 192.168.1.7")
    assert Settings().outbound_allow_networks == ["10.1.0.0/16", "192.168.1.7/32"]
    monkeypatch.setenv("SCANONCE_OUTBOUND_ALLOW_NETWORKS", "not-a-network")
    with pytest.raises(ValueError):
        Settings()


def test_a_jwks_url_outside_the_allowed_networks_is_never_fetched(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, cds_clients={"https://ehr.example": "http://10.9.8.7/jwks.json"})
    verifier = Verifier(settings=settings, signing_key=ECKey.generate_key("P-256"))
    token = jwt.encode(
        {"alg": "ES256"}, {"iss": "https://ehr.example", "aud": "x", "jti": "1"}, ECKey.generate_key("P-256")
    )
    with pytest.raises(TokenInvalid, match="may not call"):
        verifier.verify_cds_client(token, audiences=["x"])


def test_a_sync_to_an_archive_outside_the_networks_fails_naming_the_setting(
    archives: tuple[_Archive, _Archive], state: AppState
) -> None:
    real, _other = archives
    client = TestClient(create_app(state=state), headers=auth_headers())
    url = f"http://127.0.0.1:{real.port}/dicom-web"
    assert (
        client.post("/api/facilities", json={"id": "arch", "issuer": "ARCH", "dicomweb_url": url}).status_code
        == 201
    )
    network.configure(["127.0.0.2/32"])  # the administrator has since narrowed the networks
    with pytest.raises(network.OutboundRefused):
        sync_facility(engine=state.engine, facility_id="arch")
    sync = client.get("/api/facilities/arch").json()["sync"]
    assert sync["last_status"] == "failed" and "SCANONCE_OUTBOUND_ALLOW_NETWORKS" in sync["last_error"]
    assert real.paths == []  # nothing was asked of the archive


class _Provider:
    """An OpenID provider's discovery document on 127.0.0.1 whose token endpoint (and keys) are on
    `elsewhere`; records every request it gets."""

    def __init__(self, elsewhere: str) -> None:
        self.paths: list[str] = []
        paths = self.paths
        doc: dict[str, str] = {}

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                paths.append(self.path)
                body = json.dumps(doc).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer  # noqa: N815 - http.server's names

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.issuer = f"http://127.0.0.1:{self.server.server_address[1]}"
        doc.update(
            issuer=self.issuer,
            authorization_endpoint=f"{self.issuer}/auth",
            token_endpoint=f"{elsewhere}/token",
            jwks_uri=f"{elsewhere}/jwks",
        )
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_the_pages_sign_in_calls_its_provider_only_within_the_allowed_networks(
    archives: tuple[_Archive, _Archive], tmp_path: Path
) -> None:
    _real, other = archives
    elsewhere = f"http://127.0.0.2:{other.port}"
    provider = _Provider(elsewhere)
    try:
        # A provider whose discovery document is outside: 503 naming the setting, nothing fetched.
        far = Settings(
            data_dir=tmp_path / "far", auth_oidc_issuer=elsewhere, outbound_allow_networks=["127.0.0.1"]
        )
        client = TestClient(create_app(far), headers=auth_headers(), follow_redirects=False)
        r = client.get("/auth/oidc/start")
        assert r.status_code == 503 and "SCANONCE_OUTBOUND_ALLOW_NETWORKS" in r.text, r.text
        assert "discovery document" in r.text and other.paths == []

        # A provider inside whose token endpoint is outside: the sign-in starts, the code
        # exchange is refused naming the setting, and the token endpoint is never called.
        near = Settings(
            data_dir=tmp_path / "near",
            auth_oidc_issuer=provider.issuer,
            outbound_allow_networks=["127.0.0.1"],
        )
        client = TestClient(create_app(near), headers=auth_headers(), follow_redirects=False)
        started = client.get("/auth/oidc/start")
        assert started.status_code == 303 and started.headers["location"].startswith(
            f"{provider.issuer}/auth"
        )
        state = parse_qs(urlsplit(started.headers["location"]).query)["state"][0]
        r = client.get("/auth/oidc/callback", params={"code": "c", "state": state})
        assert (
            r.status_code == 503
            and "token endpoint" in r.text
            and "SCANONCE_OUTBOUND_ALLOW_NETWORKS" in r.text
        )
        assert "scanonce_session" not in r.headers.get("set-cookie", "")
        assert other.paths == [] and provider.paths == ["/.well-known/openid-configuration"]
    finally:
        provider.close()
