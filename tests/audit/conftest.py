"""An empty, migrated database on each backend (SQLite file, PostgreSQL clone) for the chain tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from broker.db import make_engine, migrate


@pytest.fixture(
    params=[pytest.param("sqlite"), pytest.param("postgres", marks=pytest.mark.postgres)],
)
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'index.sqlite3'}"
        eng = make_engine(url)
        migrate(eng)
        try:
            yield eng
        finally:
            eng.dispose()
        return
    pg_admin = request.getfixturevalue("pg_admin")
    template = request.getfixturevalue("_pg_template")
    name = pg_admin.new_name("audit")
    eng = make_engine(pg_admin.create(name, template=template))
    try:
        yield eng
    finally:
        eng.dispose()
        pg_admin.drop(name)


def drop_triggers(engine: Engine) -> None:
    """What someone with raw SQL access would do first to rewrite history."""
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text("DROP TRIGGER IF EXISTS audit_event_append_only ON audit_event"))
            conn.execute(text("DROP TRIGGER IF EXISTS audit_head_no_delete ON audit_chain_head"))
        else:
            for name in ("audit_event_no_update", "audit_event_no_delete", "audit_head_no_delete"):
                conn.execute(text(f"DROP TRIGGER IF EXISTS {name}"))
