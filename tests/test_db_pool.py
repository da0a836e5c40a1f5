"""The embedded database hands a thread that writes in turns the same connection each time."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import text

from broker.db import make_engine


def test_the_connection_used_last_is_the_next_one_handed_out(tmp_path: Path) -> None:
    """Each SQLite connection keeps its own page cache, dropped once another connection writes.
    A writer handed the pool's oldest idle connection each time (FIFO) alternates between
    connections and re-reads every page it touches; handed back the one it just used, its cache
    stays warm."""
    engine = make_engine(f"sqlite:///{tmp_path / 'index.sqlite3'}")
    try:
        # Two idle connections in the pool, as when a poller's request overlapped a write.
        first, second = engine.connect(), engine.connect()
        first.close()
        second.close()
        used = []
        for n in range(3):
            with engine.begin() as conn:
                conn.execute(text("CREATE TABLE IF NOT EXISTS t (n INTEGER)"))
                conn.execute(text("INSERT INTO t VALUES (:n)"), {"n": n})
                used.append(conn.connection.dbapi_connection)
        assert used[0] is used[1] is used[2]
    finally:
        engine.dispose()
