"""Engine, sessions and migrations.

SQLite (the embedded default) runs in WAL mode so readers never wait for the writer, with
`synchronous=FULL`: every commit is on disk before it returns, so what the broker acknowledged
survives a power loss (WAL with NORMAL may roll the last commits back; docs/storage.md has the
measured cost). PostgreSQL is used as is (its default `synchronous_commit=on` is durable).

The schema is owned by Alembic: each domain adds its tables in its own migration branch, and
`migrate()` upgrades to all heads.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, Literal

from alembic import command
from alembic.config import Config
from sqlalchemy import Table, event
from sqlalchemy.engine import Engine
from sqlmodel import Session, SQLModel, create_engine

_MIGRATIONS = Path(__file__).parent / "migrations"


def make_engine(url: str, *, sqlite_synchronous: Literal["FULL", "NORMAL"] = "FULL") -> Engine:
    """`sqlite_synchronous="NORMAL"` only for measuring what durability costs (bench/durability.py)."""
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # One connection per thread; the worker threads of ingest each get their own.
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    else:
        kwargs["pool_size"] = 10
        kwargs["max_overflow"] = 20
        kwargs["pool_pre_ping"] = True
    engine = create_engine(url, **kwargs)
    if url.startswith("sqlite"):
        event.listen(engine, "connect", partial(_sqlite_pragmas, synchronous=sqlite_synchronous))
    return engine


def _sqlite_pragmas(dbapi_conn: Any, _record: Any, *, synchronous: str = "FULL") -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute(f"PRAGMA synchronous={'NORMAL' if synchronous == 'NORMAL' else 'FULL'}")
    cur.execute("PRAGMA foreign_keys=ON")
    # DICOM matching is case-sensitive except for PN (matched on casefolded columns); this also
    # lets SQLite use indexes for prefix LIKE patterns.
    cur.execute("PRAGMA case_sensitive_like=ON")
    cur.execute("PRAGMA temp_store=MEMORY")
    # Modest page cache and map: several pooled connections each get their own, and the
    # broker's resident memory must stay small while it streams gigabytes (bench/: peak RSS).
    cur.execute("PRAGMA cache_size=-8192")
    cur.execute("PRAGMA mmap_size=0")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision of every domain branch (safe to run twice)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "heads")


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    with Session(engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


def core_table(model: type[SQLModel]) -> Table:
    """A table model's Core table, for bulk statements and Core queries (SQLModel does not declare
    `__table__` to type checkers)."""
    table: Table = getattr(model, "__table__")  # noqa: B009 - the typed way to read it
    return table
