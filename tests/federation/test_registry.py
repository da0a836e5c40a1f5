"""The facility registry through /api/facilities and `scanonce facility ...`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session
from typer.testing import CliRunner

from broker.app import create_app
from broker.cli import app
from broker.deps import AppState
from broker.facilities import service as facilities
from broker.security import network
from tests.support import auth_headers

WEB: dict[str, Any] = {
    "id": "stmarys",
    "issuer": "STMARYS",
    "name": "St Mary's",
    "dicomweb_url": "https://pacs.stmarys.example/dicom-web/",
    "calling_ae_titles": ["STMARYS_PACS", "STMARYS_CT"],
    "sharing_policy": "index_only",
}


@pytest.fixture
def client(state: AppState) -> TestClient:
    return TestClient(create_app(state=state), headers=auth_headers())


def test_crud_with_documented_status_codes(client: TestClient, state: AppState) -> None:
    r = client.post("/api/facilities", json=WEB)
    assert r.status_code == 201
    body = r.json()
    assert body["dicomweb_url"] == "https://pacs.stmarys.example/dicom-web"  # one canonical form
    assert body["calling_ae_titles"] == ["STMARYS_CT", "STMARYS_PACS"] and body["sync"] is None

    assert client.post("/api/facilities", json=WEB).status_code == 409  # same id
    assert client.post("/api/facilities", json={**WEB, "id": "other"}).status_code == 409  # same issuer
    taken = client.post(
        "/api/facilities", json={"id": "x", "issuer": "X", "calling_ae_titles": ["STMARYS_CT"]}
    )
    assert taken.status_code == 409 and "STMARYS_CT" in taken.json()["detail"]
    half = client.post(
        "/api/facilities", json={"id": "y", "issuer": "Y", "ae_title": "YPACS", "host": "pacs"}
    )
    assert half.status_code == 400 and "port" in half.json()["detail"]
    assert (
        client.post("/api/facilities", json={"id": "z", "issuer": "Z", "ae_title": "BAD\\AE"}).status_code
        == 400
    )
    assert (
        client.post("/api/facilities", json={"id": "z", "issuer": "Z", "sharing_policy": "some"}).status_code
        == 400
    )

    # The broker would connect to the archive: an address outside the administrator's outbound
    # networks (default loopback only) is refused at once, and nothing changes.
    outside = client.patch(
        "/api/facilities/stmarys", json={"ae_title": "SMPACS", "host": "10.0.0.5", "port": 104}
    )
    assert outside.status_code == 400 and "SCANONCE_OUTBOUND_ALLOW_NETWORKS" in outside.json()["detail"]
    assert client.get("/api/facilities/stmarys").json()["ae_title"] is None
    r = client.patch(
        "/api/facilities/stmarys",
        json={
            "ae_title": "SMPACS",
            "host": "127.0.0.5",
            "port": 104,
            "sharing_policy": "none",
            "calling_ae_titles": ["SM"],
        },
    )
    assert r.status_code == 200
    assert (r.json()["ae_title"], r.json()["port"], r.json()["sharing_policy"]) == ("SMPACS", 104, "none")
    assert r.json()["dicomweb_url"] == WEB["dicomweb_url"].rstrip("/")  # untouched fields stay
    assert client.get("/api/facilities/stmarys").json()["calling_ae_titles"] == ["SM"]
    assert client.patch("/api/facilities/nowhere", json={"name": "n"}).status_code == 404

    # The DIMSE SCP identifies a caller by its calling AE title (trailing padding ignored).
    with Session(state.engine) as session:
        found = facilities.facility_for_calling_ae(session=session, ae_title="SM  ")
        assert found is not None and found.id == "stmarys"
        assert facilities.facility_for_calling_ae(session=session, ae_title="STMARYS_CT") is None

    ids = [f["id"] for f in client.get("/api/facilities").json()]
    assert ids == ["local", "stmarys"]
    assert client.delete("/api/facilities/stmarys").status_code == 204
    assert client.get("/api/facilities/stmarys").status_code == 404
    assert client.delete("/api/facilities/stmarys").status_code == 404
    with Session(state.engine) as session:
        assert facilities.facility_for_calling_ae(session=session, ae_title="SM") is None


def test_a_facility_whose_studies_are_indexed_cannot_be_removed(client: TestClient) -> None:
    # The default facility holds the embedded archive; removing a facility would orphan its rows.
    import pydicom

    from broker.demo import synth  # noqa: F401 - the lead's generator is not needed: ingest one file
    from broker.index.service import ingest_files
    from broker.security.schemas import Principal, Role

    path = Path(pydicom.__path__[0]) / "data" / "test_files" / "CT_small.dcm"
    state: AppState = client.app.state.scanonce  # type: ignore[attr-defined]
    outcomes = ingest_files(
        engine=state.engine,
        store=state.store,
        principal=Principal(who="test", role=Role.admin, facility="local"),
        facility_id="local",
        paths=[str(path)],
    )
    assert outcomes[0].status == "stored"
    r = client.delete("/api/facilities/local")
    assert r.status_code == 409 and "studies" in r.json()["detail"]


def test_openapi_documents_the_registry(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    post = spec["paths"]["/api/facilities"]["post"]
    assert {"201", "400", "409"} <= set(post["responses"])
    assert post["responses"]["201"]["content"]["application/json"]["schema"]["$ref"].endswith("/FacilityOut")
    item = spec["paths"]["/api/facilities/{facility_id}"]
    assert {"get", "patch", "delete"} <= set(item)
    assert "404" in item["delete"]["responses"] and "204" in item["delete"]["responses"]
    assert "202" in spec["paths"]["/api/facilities/{facility_id}/sync"]["post"]["responses"]
    assert "/api/jobs/{job_id}" in spec["paths"]
    policy = spec["components"]["schemas"]["SharingPolicy"]["enum"]
    assert policy == ["share_all", "index_only", "none"]


@pytest.fixture
def outbound_reset() -> Iterator[None]:
    """The CLI configures the process's outbound networks from its environment: put them back."""
    yield
    network.configure(network.LOOPBACK)


@pytest.mark.usefixtures("outbound_reset")
def test_cli_add_list_show_update_remove(tmp_path: Path) -> None:
    runner = CliRunner()
    data = ["--data-dir", str(tmp_path)]
    # The administrator lets the broker call the county's network.
    env = {"COLUMNS": "200", "SCANONCE_OUTBOUND_ALLOW_NETWORKS": "127.0.0.0/8,10.1.2.0/24"}

    def run(*args: str) -> str:
        result = runner.invoke(app, [*args, *data], catch_exceptions=False, env=env)
        assert result.exit_code == 0, result.output
        return result.output

    elsewhere = runner.invoke(
        app, ["facility", "add", "far", "--issuer", "FAR", "--ae", "FARPACS", "--host", "10.9.9.9",
              "--port", "104", *data], env=env,
    )  # fmt: skip
    assert elsewhere.exit_code == 1 and "SCANONCE_OUTBOUND_ALLOW_NETWORKS" in elsewhere.output
    out = run(
        "facility", "add", "county", "--issuer", "COUNTY", "--name", "County Hospital",
        "--ae", "COUNTYPACS", "--host", "10.1.2.3", "--port", "11112",
        "--calling-ae", "COUNTY_CT", "--calling-ae", "COUNTY_MR@10.1.2.0/24", "--policy", "index_only",
    )  # fmt: skip
    assert "COUNTYPACS@10.1.2.3:11112" in out and "index_only" in out
    assert "county" in run("facility", "list") and "local" in run("facility", "list")
    shown = run("facility", "show", "county")
    assert "COUNTY_CT COUNTY_MR@10.1.2.0/24" in shown and "never" in shown
    updated = run(
        "facility", "update", "county", "--dicomweb", "http://pacs.county.example/wado", "--ae", "-"
    )
    assert "http://pacs.county.example/wado" in updated and "COUNTYPACS" not in updated

    bad = runner.invoke(app, ["facility", "add", "county", "--issuer", "OTHER", *data])
    assert bad.exit_code == 1 and "already exists" in bad.output
    missing = runner.invoke(app, ["facility", "show", "nowhere", *data])
    assert missing.exit_code == 1 and "nowhere" in missing.output
    run("facility", "remove", "county")
    assert "county" not in run("facility", "list")


def test_a_node_that_finds_no_local_facility_then_loses_the_insert_race_still_starts(
    state: AppState, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nodes started together on one database: each looks for the default facility and, not
    finding it, inserts it; all but one lose that race. The loser must find the winner's row
    and start, not crash on the unique key (a cluster test's node did)."""
    settings = state.settings
    real_get = Session.get
    looked: list[object] = []

    def raced(self: Session, entity: Any, ident: Any, **kw: Any) -> Any:
        if entity is facilities.Facility and not looked:
            looked.append(ident)
            return None  # this node looked before the other node's insert committed
        return real_get(self, entity, ident, **kw)

    monkeypatch.setattr(Session, "get", raced)
    facilities.ensure_default_facility(engine=state.engine, settings=settings)  # must not raise
    assert looked == [settings.default_facility]
    monkeypatch.undo()
    with Session(state.engine) as session:
        assert session.get(facilities.Facility, settings.default_facility) is not None
