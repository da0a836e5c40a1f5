"""Who acts, as each way in records it, and what each way in answers: the ADT feed ("hl7"), the
FHIR feed (the HTTP caller), the CLI (--who, else $USER; refusals on stderr); the admin API's
documented response shapes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session, select
from typer.testing import CliRunner

from broker.app import create_app
from broker.cli import app as scanonce
from broker.deps import AppState
from broker.identity import service
from broker.identity.adt import feed_principal, handle_message
from broker.identity.models import LinkEvent
from broker.settings import Settings
from storage import open_store
from tests.support import auth_headers

from .conftest import cli_index, ingest_patient
from .test_mllp import adt, msa


@pytest.fixture
def client(engine: Engine, tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(data_dir=tmp_path)
    state = AppState(settings=settings, engine=engine, store=open_store((tmp_path / "objects").as_uri()))
    with TestClient(create_app(settings=settings, state=state), headers=auth_headers()) as c:
        yield c


def _who(engine: Engine, issuer: str, value: str) -> list[str]:
    with Session(engine) as s:
        rec = service.get_record(session=s, issuer=issuer, value=value)
        assert rec is not None
        return [e.who for e in s.exec(select(LinkEvent).where(LinkEvent.record_id == rec.id))]


def test_an_adt_message_is_recorded_as_the_hl7_feed(engine: Engine) -> None:
    reply = handle_message(
        engine=engine,
        raw=adt("A04", "C1", "H-1^^^ISSUER-A", "NEUMANN^MICHAELA", "19151111", "F"),
        principal=feed_principal(facility="fac-a"),
    )
    [ack] = reply.acks
    assert reply.code == msa(ack.message)[1] == "AA", ack.text
    assert _who(engine, "ISSUER-A", "H-1") == ["hl7"]


def test_a_fhir_feed_is_recorded_as_the_http_caller(client: TestClient, engine: Engine) -> None:
    body = {
        "resourceType": "Patient",
        "identifier": [{"system": "urn:oid:1.2.826.0.1.99", "value": "C-5"}],
        "name": [{"family": "Okafor", "given": ["Chidi"]}],
        "birthDate": "1990-03-04",
    }
    assert client.post("/fhir/Patient", json=body).status_code == 201
    assert _who(engine, "1.2.826.0.1.99", "C-5") == ["test"]  # the token's subject


def test_admin_api_documents_its_answers(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    for path, method, status in [
        ("/api/identity/review", "get", "200"),
        ("/api/identity/review/{review_id}", "post", "200"),
        ("/api/identity/link", "post", "200"),
        ("/api/identity/unlink", "post", "200"),
        ("/api/identity/records", "get", "200"),
        ("/api/identity/records/{record_id}/explain", "get", "200"),
        ("/api/identity/trusted-issuers", "post", "201"),
        ("/api/identity/train", "post", "200"),
    ]:
        schema = spec["paths"][path][method]["responses"][status]["content"]["application/json"]["schema"]
        assert schema, f"{method.upper()} {path} has no response schema"
    explained = spec["components"]["schemas"]["Explanation"]["properties"]
    assert {"history", "compared_with_person", "thresholds"} <= set(explained)
    r = client.post("/api/identity/trusted-issuers", json={"issuer": "NATIONAL"})
    assert r.status_code == 201 and r.json() == {"issuer": "NATIONAL"}
    r = client.post("/api/identity/train")
    assert r.status_code == 400 and "too few" in r.json()["detail"]


def test_cli_records_the_operator_and_refuses_on_stderr(tmp_path: Path) -> None:
    engine = cli_index(tmp_path)
    with Session(engine) as s:
        ingest_patient(s, "fac-a", "A1", "NGUYEN^SONJA", "20150601", "F", "17 Sharwood Crescent 2866")
        ingest_patient(s, "fac-b", "B1", "NGUYEN^PIA", "20150601", "F", "17 Sharwood Crescent 2866")
    runner = CliRunner(env={"USER": "night-nurse"})
    dd = ["--data-dir", str(tmp_path)]

    def run(*args: str) -> Any:
        return runner.invoke(scanonce, ["identity", *args, *dd])

    r = run("link", "ISSUER-B|B1", "ISSUER-A|A1", "--why", "same child")
    assert r.exit_code == 0, r.output
    assert "night-nurse" in _who(engine, "ISSUER-B", "B1")
    r = run("link", "ISSUER-B|B1", "ISSUER-A|A1", "--why", " ")
    assert r.exit_code == 1 and "must say why" in r.stderr and "must say why" not in r.stdout
    r = run("explain", "NOPE|1")
    assert r.exit_code == 1 and "no record for NOPE|1" in r.stderr
    r = run("unlink", "B1", "--why", "typo")
    assert r.exit_code == 2 and "record id or ISSUER|VALUE" in r.stderr
    engine.dispose()
