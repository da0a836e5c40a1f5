"""What a new user meets when following the README: a home page at `/`, API docs that load with
no network beyond the broker, one clear line when a port is taken, whole URLs in the banner,
and tables that are not cut at 80 columns."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from broker.app import create_app
from broker.cli import app as cli
from broker.settings import Settings
from tests.support import auth_headers

from .conftest import Broker, Visit

SCANONCE = str(Path(sys.executable).with_name("scanonce"))


def test_home_is_the_lookup_page_and_links_the_viewer_and_the_docs(broker: Broker) -> None:
    r = httpx.get(broker.url + "/", trust_env=False, headers=auth_headers())
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    for link in ('href="/viewer/"', 'href="/docs"', 'role="search"', 'name="mrn"', 'name="exam"'):
        assert link in r.text


def test_api_docs_render_with_nothing_leaving_loopback(broker: Broker, visit: Visit) -> None:
    response = visit.page.goto(f"{broker.url}/docs")
    assert response is not None and response.status == 200
    # Swagger UI rendered the broker's own OpenAPI document: its title and an operation.
    visit.page.locator(".swagger-ui .info .title", has_text="ScanOnce").wait_for(timeout=15_000)
    visit.page.locator(".opblock-summary-path", has_text="/dicom-web/studies").first.wait_for(timeout=15_000)
    assert visit.left_loopback() == []
    assert f"{broker.url}/openapi.json" in visit.requests


def test_api_leads_to_the_docs_and_redoc_is_not_a_blank_page(broker: Broker) -> None:
    with httpx.Client(base_url=broker.url, trust_env=False, headers=auth_headers()) as http:
        r = http.get("/api", follow_redirects=True)
        assert r.status_code == 200 and "swagger-ui" in r.text
        assert http.get("/openapi.json").json()["info"]["title"] == "ScanOnce"
        assert http.get("/redoc").status_code == 404  # it would load ReDoc from a CDN


def test_banner_urls_are_whole_lines(broker: Broker) -> None:
    # The broker runs with COLUMNS=40 (conftest): a wrapped banner would break these URLs.
    lines = broker.served.log.read_text().splitlines()
    for path in ("/", "/viewer/", "/docs", "/dicom-web"):
        assert any(line.rstrip().endswith(f"{broker.url}{path}") for line in lines), (path, lines[:10])


def test_without_installed_assets_the_pages_say_how_to_install_them(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, viewer_dir=tmp_path / "nothing-here", mllp_port=0)
    with TestClient(create_app(settings), headers=auth_headers()) as client:
        for path in ("/viewer/", "/viewer/viewer?StudyInstanceUIDs=1.2.3", "/docs"):
            r = client.get(path)
            assert r.status_code == 503, path
            assert "scanonce web install" in r.text and str(tmp_path / "nothing-here") in r.text
        home = client.get("/")
        assert home.status_code == 200 and "scanonce web install" in home.text
        assert client.get("/openapi.json").status_code == 200


@pytest.mark.parametrize(
    ("taken", "option"),
    [
        ("SCANONCE_PORT", "--port"),
        ("SCANONCE_DIMSE_PORT", "--dimse-port"),
        ("SCANONCE_MLLP_PORT", "--mllp-port"),
    ],
)
def test_a_taken_port_is_one_line_naming_it_and_its_option(tmp_path: Path, taken: str, option: str) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        ports = {name: "0" for name in ("SCANONCE_DIMSE_PORT", "SCANONCE_MLLP_PORT")}
        env = {
            **os.environ,
            **ports,
            "SCANONCE_DATA_DIR": str(tmp_path),
            "SCANONCE_HOST": "127.0.0.1",
            "SCANONCE_PORT": str(_free_port()),
            taken: str(port),
            "COLUMNS": "40",
        }
        result = subprocess.run(
            [SCANONCE, "serve"], env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
        )
    assert result.returncode == 1
    assert result.stdout == ""  # no banner for a server that does not start
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"Port {port}" in lines[0] and "already in use" in lines[0] and option in lines[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_facility_list_is_not_cut_at_80_columns(tmp_path: Path) -> None:
    url = "http://pacs.north-general-hospital.example.org:8042/orthanc/dicom-web"
    name = "North General Hospital, Department of Radiology"
    run = CliRunner().invoke
    data = ["--data-dir", str(tmp_path)]
    added = run(cli, ["facility", "add", "northgen", "--issuer", "NORTH-GENERAL", "--name", name,
                      "--dicomweb", url, *data])  # fmt: skip
    assert added.exit_code == 0, added.output
    listed = run(cli, ["facility", "list", *data], env={"COLUMNS": "80"})
    assert listed.exit_code == 0, listed.output
    assert url in listed.output and name in listed.output, listed.output
    assert "…" not in listed.output
