"""`scanonce db upgrade|status`, migrations on start, and a database that refuses connections:
what an operator sees (messages naming the setting or the command, exit codes, /readyz)."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydicom.uid import generate_uid
from sqlalchemy.engine import make_url
from typer.testing import CliRunner

from broker.app import build_state, create_app
from broker.cli import app as cli
from broker.db import SchemaBehind, make_engine, migrate, schema_status, wait_for_database
from broker.settings import Settings
from tests.conftest import CuttablePg, s3_storage_url
from tests.dicomweb.data import multipart_body
from tests.ops.proxy import TcpProxy
from tests.support import auth_headers, cli_env, make_ds, to_bytes

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.postgres
def test_upgrade_twice_at_once_and_again_is_safe_and_says_so(empty_pg: str, tmp_path: Path) -> None:
    status = runner.invoke(cli, ["db", "status"], env=cli_env(tmp_path, empty_pg))
    assert status.exit_code == 1
    assert "pending:" in status.output and "0010_jobs_lease" in status.output
    assert "scanonce db upgrade" in status.output

    # Two upgrades at once (as two nodes' migration jobs would run them): the advisory lock lets one
    # migrate; the other waits, then finds nothing pending (each returns what it found pending).
    engines = [make_engine(empty_pg) for _ in range(2)]
    found: list[tuple[str, ...]] = []
    errors: list[BaseException] = []

    def upgrade(engine: Any) -> None:
        try:
            found.append(migrate(engine).pending)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=upgrade, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    for e in engines:
        e.dispose()
    assert errors == []
    assert sorted(len(p) for p in found)[0] == 0 and "0010_jobs_lease" in max(found, key=len)

    again = runner.invoke(cli, ["db", "upgrade"], env=cli_env(tmp_path, empty_pg))
    assert again.exit_code == 0
    said = " ".join(again.output.split())
    assert "already at the newest schema" in said and "nothing to do" in said
    status = runner.invoke(cli, ["db", "status"], env=cli_env(tmp_path, empty_pg))
    assert status.exit_code == 0 and "up to date" in status.output
    engine = make_engine(empty_pg)
    try:
        assert schema_status(engine).up_to_date
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_a_node_on_an_unmigrated_postgres_refuses_to_start_naming_the_command(
    empty_pg: str, tmp_path: Path
) -> None:
    settings = Settings(data_dir=tmp_path, database_url=empty_pg, mllp_port=0)
    assert settings.resolved_migrate_on_start() is False  # PostgreSQL: off by default
    with pytest.raises(SchemaBehind) as refused:
        build_state(settings)
    assert "scanonce db upgrade" in refused.value.message
    # The same through `scanonce serve`: a message and exit 1, no traceback, nothing served.
    served = runner.invoke(
        cli,
        ["serve", "--port", str(_free_port()), "--dimse-port", "0", "--mllp-port", "0"],
        env={**cli_env(tmp_path, empty_pg), "SCANONCE_AUTH_ENABLED": "true"},
    )
    assert served.exit_code == 1, served.output
    assert "scanonce db upgrade" in " ".join(served.output.split())
    assert "Traceback" not in served.output
    engine = make_engine(empty_pg)
    try:
        assert schema_status(engine).current == ()  # nothing was migrated behind the operator's back
    finally:
        engine.dispose()
    # Asked for explicitly, a node migrates on start.
    state = build_state(
        Settings(data_dir=tmp_path, database_url=empty_pg, migrate_on_start=True, mllp_port=0)
    )
    try:
        assert schema_status(state.engine).up_to_date
    finally:
        state.engine.dispose()


def test_sqlite_migrates_on_start_by_default(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    assert settings.resolved_migrate_on_start() is True
    state = build_state(settings)
    try:
        assert schema_status(state.engine).up_to_date
    finally:
        state.engine.dispose()


def test_a_database_that_refuses_connections_is_named_with_its_setting(tmp_path: Path) -> None:
    closed = f"postgresql+psycopg://scanonce:secret@127.0.0.1:{_free_port()}/nothing"
    for args in (["db", "status"], ["db", "upgrade"], ["jobs", "list"]):
        result = runner.invoke(cli, args, env=cli_env(tmp_path, closed))
        text = " ".join(result.output.split())
        assert result.exit_code == 1, (args, result.output)
        assert "SCANONCE_DATABASE_URL" in text and "127.0.0.1" in text, text
        assert "secret" not in text  # the password is never shown
        assert "Traceback" not in result.output


@pytest.mark.postgres
def test_a_node_retries_until_the_database_answers(pg_url: str) -> None:
    """At start a refused connection is retried with backoff (and said so in the log) until the
    database comes up; then the node goes on."""
    target = make_url(pg_url)
    proxy = TcpProxy(target.host or "127.0.0.1", target.port or 5432)
    url = target.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    engine = make_engine(url, connect_timeout=2)
    tries: list[float] = []
    stop = threading.Event()

    def up_later() -> None:
        while len(tries) < 2 and not stop.is_set():
            time.sleep(0.05)
        proxy.start()

    import logging

    class Count(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "SCANONCE_DATABASE_URL" in record.getMessage():
                tries.append(time.monotonic())

    handler = Count()
    logging.getLogger("scanonce.db").addHandler(handler)
    opener = threading.Thread(target=up_later)
    opener.start()
    try:
        wait_for_database(engine, stop=stop)
    finally:
        stop.set()
        opener.join(30)
        logging.getLogger("scanonce.db").removeHandler(handler)
        engine.dispose()
        proxy.stop()
    assert len(tries) >= 2


@pytest.mark.postgres
def test_readyz_is_false_while_the_database_is_away(
    cuttable_pg: CuttablePg, cut_node_settings: Settings
) -> None:
    app = create_app(cut_node_settings)
    client = TestClient(app)
    r = client.get("/readyz")
    assert (r.status_code, r.json()["status"]) == (200, "ready")
    cuttable_pg.proxy.stop()  # the database goes away: refused, and the pooled connections dropped
    r = client.get("/readyz")
    assert r.status_code == 503 and r.headers["Retry-After"]
    assert r.json() == {
        "status": "not ready",
        "database": "unreachable (SCANONCE_DATABASE_URL)",
        "object_store": "ok",
    }
    cuttable_pg.proxy.start()
    assert client.get("/readyz").status_code == 200
    app.state.scanonce.engine.dispose()


def test_a_bucket_that_does_not_exist_starts_the_node_not_ready(tmp_path: Path, moto_server: str) -> None:
    """Without create_bucket the store is first contacted by /readyz: a missing bucket (a typo in
    SCANONCE_STORAGE_URL) is 503 naming the setting, or 200 degraded when the store is not required."""
    settings = Settings(
        data_dir=tmp_path, storage_url=f"s3://missing-{generate_uid()[-12:]}?endpoint_url={moto_server}"
    )
    for requires, code, status in ((True, 503, "not ready"), (False, 200, "degraded")):
        app = create_app(settings.model_copy(update={"readyz_requires_store": requires}))
        r = TestClient(app).get("/readyz")
        assert (r.status_code, r.json()["status"]) == (code, status)
        assert r.json()["object_store"] == "unreachable (SCANONCE_STORAGE_URL)"
        app.state.scanonce.engine.dispose()


def test_an_unreachable_bucket_makes_the_node_not_ready_or_degraded_as_configured(
    tmp_path: Path, moto_server: str
) -> None:
    """By default /readyz is 503 while the bucket is away, as while the database is. A fleet
    sharing one bucket sets SCANONCE_READYZ_REQUIRES_STORE=false (infra/ does): were the fault to
    make /readyz false, the balancer would take every node out and the queries the index answers
    alone would be refused too. /readyz then stays 200 and says "degraded" (and the metric says
    which dependency); what needs the store answers 503 with Retry-After."""
    proxy = TcpProxy("127.0.0.1", int(moto_server.rsplit(":", 1)[1])).start()
    try:
        settings = Settings(
            data_dir=tmp_path,
            storage_url=s3_storage_url(f"http://127.0.0.1:{proxy.port}", "readyz-bucket")
            + "&connect_timeout=1&read_timeout=1&retries=0",
            mllp_port=0,
            readyz_requires_store=False,
        )
        app = create_app(settings)
        client = TestClient(app)
        strict = TestClient(create_app(settings.model_copy(update={"readyz_requires_store": True})))
        assert client.get("/readyz").json()["status"] == "ready"
        assert strict.get("/readyz").json()["status"] == "ready"
        proxy.stop()
        r = strict.get("/readyz")
        assert r.status_code == 503 and r.headers["Retry-After"], r.text
        assert r.json() == {
            "status": "not ready",
            "database": "ok",
            "object_store": "unreachable (SCANONCE_STORAGE_URL)",
        }
        r = client.get("/readyz")
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["status"], body["database"]) == ("degraded", "ok")
        assert body["object_store"] == "unreachable (SCANONCE_STORAGE_URL)"
        metrics = client.get("/metrics", headers=auth_headers("auditor")).text
        assert 'scanonce_dependency_up{dependency="object_store"} 0.0' in metrics
        assert 'scanonce_dependency_up{dependency="database"} 1.0' in metrics
        # Reads the index answers alone are served; a write is refused clearly, for a retry.
        assert client.get("/dicom-web/studies", headers=auth_headers()).status_code in (200, 204)
        body_, content_type = multipart_body(
            [to_bytes(make_ds(sop=generate_uid(), study=generate_uid(), series=generate_uid()))]
        )
        stow = client.post(
            "/dicom-web/studies", content=body_, headers={**auth_headers(), "Content-Type": content_type}
        )
        assert stow.status_code == 503 and stow.headers["Retry-After"], stow.text
        assert "Traceback" not in stow.text and "127.0.0.1" not in stow.text
        proxy.start()
        assert client.get("/readyz").json()["status"] == "ready"
    finally:
        proxy.stop()


def test_an_unreachable_or_wrong_bucket_is_a_clear_error(tmp_path: Path) -> None:
    closed = f"s3://scanonce?endpoint_url=http://127.0.0.1:{_free_port()}&create_bucket=true"
    for url, said in ((closed, "cannot reach the object store s3://scanonce"), ("ftp://x/y", "not a usable")):
        env = {"SCANONCE_DATA_DIR": str(tmp_path), "SCANONCE_STORAGE_URL": url}
        result = runner.invoke(cli, ["jobs", "list"], env=env)
        text = " ".join(result.output.split())
        assert result.exit_code == 1, result.output
        assert said in text and "SCANONCE_STORAGE_URL" in text, text
        assert "Traceback" not in result.output
