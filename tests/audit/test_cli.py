"""`scanonce audit` is an auditor's read-only tool: it never creates or migrates a database,
PostgreSQL or SQLite (that is `scanonce db upgrade`, an operator's step; a SQLite index may be a
copy kept as evidence), and a database it cannot reach or find is one clear line naming it,
never a traceback."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from broker.cli import app
from broker.db import make_engine, schema_status
from tests.support import cli_env

runner = CliRunner()


@pytest.mark.postgres
def test_audit_never_migrates_postgres_and_names_the_command_that_does(pg_admin: Any, tmp_path: Path) -> None:
    url = pg_admin.create(pg_admin.new_name("audit_empty"))
    engine = make_engine(url)
    try:
        # Even where nodes migrate on start: the audit CLI is not a node starting.
        env = {**cli_env(tmp_path, url), "SCANONCE_MIGRATE_ON_START": "true"}
        for args in (["audit", "verify"], ["audit", "head"], ["audit", "list"]):
            result = runner.invoke(app, args, env=env)
            assert result.exit_code == 1, (args, result.output)
            assert isinstance(result.exception, SystemExit), result.exception  # a message, not a crash
            assert "scanonce db upgrade" in " ".join(result.output.split()), result.output
        assert schema_status(engine).current == ()  # no table was created behind the operator's back
    finally:
        engine.dispose()
        pg_admin.drop(url.rsplit("/", 1)[1])


@pytest.mark.postgres
def test_audit_reads_a_migrated_postgres(pg_admin: Any, _pg_template: str, tmp_path: Path) -> None:
    name = pg_admin.new_name("audit_cli")
    url = pg_admin.create(name, template=_pg_template)
    try:
        env = {**cli_env(tmp_path, url), "COLUMNS": "250"}
        verified = runner.invoke(app, ["audit", "verify"], env=env)
        assert verified.exit_code == 0, verified.output
        assert "intact: 0 events" in verified.output
        assert runner.invoke(app, ["audit", "list"], env=env).exit_code == 0
    finally:
        pg_admin.drop(name)


def test_audit_on_an_unreachable_database_is_one_line_naming_it(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    url = f"postgresql+psycopg://auditor:s3cret-pw@127.0.0.1:{port}/scanonce"
    scanonce = str(Path(sys.executable).with_name("scanonce"))
    done = subprocess.run(
        [scanonce, "audit", "verify"],
        env={k: v for k, v in {**os.environ, **cli_env(tmp_path, url)}.items() if k != "COLUMNS"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done
    said = done.stderr.strip()
    assert "Traceback" not in said and len(said.splitlines()) == 1, said
    assert f"127.0.0.1:{port}/scanonce" in said and "SCANONCE_DATABASE_URL" in said
    assert "s3cret-pw" not in said + done.stdout


def test_audit_never_creates_or_migrates_a_sqlite_index(tmp_path: Path) -> None:
    data = tmp_path / "evidence"
    data.mkdir()
    env = {"SCANONCE_DATA_DIR": str(data), "SCANONCE_MIGRATE_ON_START": "true", "COLUMNS": "250"}
    # No index at all: said so, and none is created.
    missing = runner.invoke(app, ["audit", "verify"], env=env)
    assert missing.exit_code == 1 and isinstance(missing.exception, SystemExit), missing.output
    said = " ".join(missing.output.split())
    assert "no index at" in said and "index.sqlite3" in said, said
    assert list(data.iterdir()) == []
    # An index whose schema is behind (here: none of it), as a copy of an older node's would be:
    # named, and the file left as it was.
    index = data / "index.sqlite3"
    with sqlite3.connect(index) as db:
        db.execute("PRAGMA journal_mode=WAL")  # as every ScanOnce index is
        db.execute("CREATE TABLE kept_as_found (x)")
    db.close()

    def tables() -> list[str]:
        with sqlite3.connect(index) as db:
            found = [r[0] for r in db.execute("SELECT name FROM sqlite_master ORDER BY name")]
        db.close()
        return found

    before = tables()
    for args in (["audit", "verify"], ["audit", "head"], ["audit", "list"]):
        result = runner.invoke(app, args, env=env)
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), (args, result.output)
        assert "scanonce db upgrade" in " ".join(result.output.split()), result.output
    assert tables() == before == ["kept_as_found"]
    engine = make_engine(f"sqlite:///{index}")
    try:
        assert schema_status(engine).current == ()
    finally:
        engine.dispose()
