"""An acknowledged write survives a power loss: SQLite commits with a full sync."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import text

from broker.db import make_engine


def test_a_new_sqlite_connection_syncs_every_commit(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'index.sqlite3'}")
    try:
        with engine.connect() as conn:
            assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
            # 2 = FULL: in WAL mode NORMAL (1) may roll back the last commits on power loss.
            assert conn.execute(text("PRAGMA synchronous")).scalar() == 2
    finally:
        engine.dispose()
