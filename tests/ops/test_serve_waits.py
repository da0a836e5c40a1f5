"""`scanonce serve` (a real process) started while its database refuses connections: it says so
naming the setting, answers /readyz 503 and /healthz 200 meanwhile, and becomes ready by itself
once the database answers. `uvicorn --factory broker.app:app_from_env` waits the same way (its
port is uvicorn's, so it answers nothing meanwhile)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.engine import make_url

from tests.ops.proxy import TcpProxy

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=5)
    except httpx.TransportError:
        return None


def _stop_group(proc: subprocess.Popen[Any]) -> None:
    """The server and what it started (its own process group): SIGTERM, then SIGKILL."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


def _until(predicate: Any, what: str, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := predicate():
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.postgres
def test_serve_waits_for_its_database_not_ready_then_ready(
    pg_admin: Any, _pg_template: str, tmp_path: Path
) -> None:
    name = pg_admin.new_name("wait")
    url = make_url(pg_admin.create(name, template=_pg_template))
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)  # not started: connections refused
    port = _free_port()
    env = {
        **os.environ,
        "SCANONCE_DATA_DIR": str(tmp_path),
        "SCANONCE_DATABASE_URL": url.set(host="127.0.0.1", port=proxy.port).render_as_string(
            hide_password=False
        ),
        "SCANONCE_DB_CONNECT_TIMEOUT_SECONDS": "2",
        "SCANONCE_INGEST_PROCESSES": "0",
        "SCANONCE_SYNC_INTERVAL_SECONDS": "0",
    }
    log = (tmp_path / "serve.log").open("w+")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "broker.cli",
            "serve",
            "--port",
            str(port),
            "--dimse-port",
            "0",
            "--mllp-port",
            "0",
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        waiting = _until(lambda: _get(f"{base}/readyz"), "the node to answer on its HTTP port")
        assert waiting.status_code == 503
        assert waiting.json() == {"status": "not ready", "database": "unreachable (SCANONCE_DATABASE_URL)"}
        assert waiting.headers["Retry-After"] == "5"
        alive = _get(f"{base}/healthz")
        assert alive is not None and alive.status_code == 200
        said = _until(
            lambda: "SCANONCE_DATABASE_URL" in Path(log.name).read_text(), "the log to name the setting"
        )
        assert said
        proxy.start()  # the database comes up
        ready = _until(
            lambda: (r := _get(f"{base}/readyz")) is not None and r.status_code == 200 and r, "readiness"
        )
        assert ready.json()["status"] == "ready"
    finally:
        _stop_group(proc)
        proxy.stop()
        log.close()
        pg_admin.drop(name)
    text = Path(log.name).read_text()
    assert "cannot connect to the database" in text and "retrying in" in text
    assert "Traceback" not in text


@pytest.mark.postgres
def test_the_uvicorn_factory_waits_for_its_database_then_serves(
    pg_admin: Any, _pg_template: str, tmp_path: Path
) -> None:
    name = pg_admin.new_name("wait")
    url = make_url(pg_admin.create(name, template=_pg_template))
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)  # not started: connections refused
    port = _free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "SCANONCE_DATA_DIR": str(tmp_path),
        "SCANONCE_DATABASE_URL": url.set(host="127.0.0.1", port=proxy.port).render_as_string(
            hide_password=False
        ),
        "SCANONCE_DB_CONNECT_TIMEOUT_SECONDS": "2",
        "SCANONCE_INGEST_PROCESSES": "0",
    }
    log = (tmp_path / "factory.log").open("w+")
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "uvicorn", "--factory", "broker.app:app_from_env"),
            *("--host", "127.0.0.1", "--port", str(port)),
        ],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        _until(
            lambda: proc.poll() is not None or "retrying in" in Path(log.name).read_text(),
            "the log to say it waits",
        )
        assert proc.poll() is None, Path(log.name).read_text()  # waiting, not refused at once
        proxy.start()  # the database comes up
        ready = _until(
            lambda: (r := _get(f"{base}/readyz")) is not None and r.status_code == 200 and r, "readiness"
        )
        assert ready.json()["status"] == "ready"
    finally:
        _stop_group(proc)
        proxy.stop()
        log.close()
        pg_admin.drop(name)
    text = Path(log.name).read_text()
    assert "SCANONCE_DATABASE_URL" in text and "Traceback" not in text, text
