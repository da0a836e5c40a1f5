"""Engine, sessions and migrations.

SQLite (the embedded default) runs in WAL mode so readers never wait for the writer, with
`synchronous=FULL`: every commit is on disk before it returns, so what the broker acknowledged
survives a power loss (WAL with NORMAL may roll the last commits back; docs/storage.md has the
measured cost). PostgreSQL is used as is (its default `synchronous_commit=on` is durable).

The schema is owned by Alembic: each domain adds its tables in its own migration branch, and
`migrate()` upgrades to all heads. On PostgreSQL it holds an advisory lock while it does, so two
`scanonce db upgrade` (or two nodes starting with SCANONCE_MIGRATE_ON_START) never migrate at
once: the second waits, then finds nothing left to do.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from operator import itemgetter
from pathlib import Path
from typing import Any, Literal, NamedTuple

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Table, event, make_url, text
from sqlalchemy.engine import Connection, Engine, ExceptionContext
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, OperationalError
from sqlmodel import Session, SQLModel, create_engine

from broker.errors import InvalidSetting, Unavailable

log = logging.getLogger("scanonce.db")

_MIGRATIONS = Path(__file__).parent / "migrations"
# pg_advisory_xact_lock key of schema migrations: any constant other code does not use ("SCANONCE").
_MIGRATION_LOCK = 0x5343414E4F4E4345


class DatabaseUnreachable(Unavailable):
    """The database refuses or does not answer connections."""

    title = "Database unreachable"


class SchemaBehind(Unavailable):
    """The database's schema is older than this version of the broker."""

    title = "Database schema is behind"


def make_engine(
    url: str,
    *,
    sqlite_synchronous: Literal["FULL", "NORMAL"] = "FULL",
    connect_timeout: float | None = None,
) -> Engine:
    """`sqlite_synchronous="NORMAL"` only for measuring what durability costs (bench/durability.py).
    `connect_timeout` bounds each new PostgreSQL connection (SCANONCE_DB_CONNECT_TIMEOUT_SECONDS), so
    a database that does not answer fails a request in seconds rather than hanging it."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        # Not shown: a URL that does not parse cannot have its password masked.
        raise InvalidSetting(
            "SCANONCE_DATABASE_URL is not a database URL: expected postgresql+psycopg://user@host/db "
            "or sqlite:///path"
        ) from None
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            try:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise InvalidSetting(
                    f"SCANONCE_DATABASE_URL {safe_url(url)}: cannot create the SQLite file's folder "
                    f"({exc.strerror})"
                ) from None
        # One connection per thread; the worker threads of ingest each get their own.
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        # The connection returned last is handed out next. Each SQLite connection has its own
        # page cache, dropped whenever another connection has written since its last use: with
        # the default FIFO order the ingest writer took a different connection than last time
        # whenever a poller (the job worker, the schedules) had used one in between, and re-read
        # every index page it touched (~22 reads per C-STORE'd instance, measured with strace).
        kwargs["pool_use_lifo"] = True
    else:
        kwargs["pool_size"] = 10
        kwargs["max_overflow"] = 20
        kwargs["pool_pre_ping"] = True
        if connect_timeout:
            kwargs["connect_args"] = {"connect_timeout": max(1, round(connect_timeout))}
    # Error texts reach logs, stored job errors and import messages: never with the statement's
    # values, which can be patient names and identifiers (the driver's own text: `_scrub_error`).
    try:
        engine = create_engine(url, hide_parameters=True, **kwargs)
    except (NoSuchModuleError, ImportError) as exc:
        missing = exc.name if isinstance(exc, ImportError) else parsed.drivername
        raise InvalidSetting(
            f"SCANONCE_DATABASE_URL {safe_url(url)} names a database the broker has no driver for "
            f"({missing}): use postgresql+psycopg://user@host/db or sqlite:///path"
        ) from None
    event.listen(engine, "handle_error", _scrub_error)
    if url.startswith("sqlite"):
        event.listen(engine, "connect", partial(_sqlite_pragmas, synchronous=sqlite_synchronous))
    return engine


_QUOTED = re.compile(r'".*"', re.DOTALL)


def _scrub_driver_text(exc: BaseException) -> bool:
    """Cut what a driver error quotes of the data from its text (in place: it is the chained
    cause, printed with every traceback of the error). True if the text changed.

    PostgreSQL adds the rows' values in DETAIL (`Key (issuer, value)=(HOSP, MRN-4711) already
    exists`, `Failing row contains (...)`) and CONTEXT (`portal parameter $1 = '...'`), and a data
    exception (SQLSTATE class 22) quotes the value it could not read: only the primary message
    stays, and of a data exception's only what names the problem. SQLite's messages name columns
    and constraints, never values; a client-side psycopg error (no SQLSTATE) names types."""
    sqlstate = getattr(exc, "sqlstate", None)
    diag = getattr(exc, "diag", None)
    if not sqlstate or diag is None:
        return False
    primary = str(diag.message_primary or type(exc).__name__)
    if sqlstate.startswith("22"):
        # `invalid input syntax for type integer: "..."`, `value "..." is out of range`: what
        # follows a colon, and all between the first and the last quote (a value may hold one).
        primary = _QUOTED.sub('"\u2026"', primary.split(":", 1)[0])
    safe = f"{primary} (SQLSTATE {sqlstate})"
    if exc.args == (safe,):
        return False
    exc.args = (safe,)
    return True


def _scrub_error(ctx: ExceptionContext) -> BaseException | None:
    """`handle_error`: the statement's error raised with the driver's text scrubbed."""
    wrapped = ctx.sqlalchemy_exception
    if not _scrub_driver_text(ctx.original_exception) or not isinstance(wrapped, DBAPIError):
        return None
    # DBAPIError quoted the driver's text when it was made: made again from the scrubbed one.
    return DBAPIError.instance(
        wrapped.statement,
        wrapped.params,
        ctx.original_exception,
        ctx.dialect.loaded_dbapi.Error,
        hide_parameters=True,
        connection_invalidated=ctx.is_disconnect,
        dialect=ctx.dialect,
        ismulti=wrapped.ismulti,
    )


def _sqlite_pragmas(dbapi_conn: Any, _record: Any, *, synchronous: str = "FULL") -> None:
    cur = dbapi_conn.cursor()
    # Only takes effect on a new, empty file (before WAL is switched on); an existing index keeps
    # the page size it was made with. An instance row is ~1.1 KB: three fit in a 4 KiB page with
    # ~0.6 KB left empty, seven in an 8 KiB page with ~0.3 KB (bench/index_size.py after the
    # archive benchmark: 2,371 -> 2,220 bytes per instance; reads measured no slower).
    cur.execute("PRAGMA page_size=8192")
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


def _config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    return cfg


@dataclass(frozen=True, slots=True)
class SchemaStatus:
    current: tuple[str, ...]  # the revisions the database is at (one per branch head)
    heads: tuple[str, ...]  # the newest revisions this version knows
    pending: tuple[str, ...]  # revisions not applied yet, oldest first

    @property
    def up_to_date(self) -> bool:
        return not self.pending


def _status(conn: Connection) -> SchemaStatus:
    script = ScriptDirectory.from_config(_config())
    current = tuple(sorted(MigrationContext.configure(conn).get_current_heads()))
    applied = {rev.revision for head in current for rev in script.iterate_revisions(head, "base")}
    pending = [rev.revision for rev in script.walk_revisions() if rev.revision not in applied]
    return SchemaStatus(
        current=current, heads=tuple(sorted(script.get_heads())), pending=tuple(reversed(pending))
    )


def schema_status(engine: Engine) -> SchemaStatus:
    """Where the database's schema stands against this version's migrations."""
    with engine.connect() as conn:
        return _status(conn)


def migrate(engine: Engine) -> SchemaStatus:
    """Bring the schema to the newest revision of every domain branch (safe to run twice, and
    from two processes at once on PostgreSQL). Returns the status found before upgrading."""
    cfg = _config()
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # Released at commit; a second migrator waits here, then finds nothing pending.
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK})
        before = _status(conn)
        if before.pending:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "heads")
    return before


def require_current_schema(engine: Engine) -> None:
    """Refuse to serve on a schema older than this version (migrations are not run on start)."""
    status = schema_status(engine)
    if not status.up_to_date:
        raise SchemaBehind(
            f"the database schema lacks {len(status.pending)} migration(s) ({', '.join(status.pending)}); "
            "run `scanonce db upgrade` first (migrations run on start only with "
            "SCANONCE_MIGRATE_ON_START=true)"
        )


def safe_url(url: str) -> str:
    """The database URL without its password, fit for a message or a log line."""
    return make_url(url).render_as_string(hide_password=True)


def check_connection(engine: Engine) -> None:
    """Connect once; `DatabaseUnreachable` (naming the setting, not the password) if that fails."""
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except OperationalError as exc:
        reason = str(exc.orig or exc).strip().splitlines()[0][:300] if (exc.orig or exc) else ""
        raise DatabaseUnreachable(
            f"cannot connect to the database {safe_url(str(engine.url))} (SCANONCE_DATABASE_URL): "
            f"{reason}. Check that setting and that the server is up; each try waits at most "
            "SCANONCE_DB_CONNECT_TIMEOUT_SECONDS"
        ) from exc


def wait_for_database(
    engine: Engine,
    *,
    stop: threading.Event | None = None,
    max_wait: float = 30.0,
    give_up_after: float | None = None,
) -> None:
    """Retry `check_connection` with backoff (1 s, 2 s, ... up to `max_wait` between tries),
    logging the clear message each time, until the database answers or `stop` is set. With
    `give_up_after` (SCANONCE_DB_START_WAIT_SECONDS), `DatabaseUnreachable` once that many
    seconds have passed, saying so."""
    delay = 1.0
    deadline = None if give_up_after is None else time.monotonic() + give_up_after
    while True:
        try:
            check_connection(engine)
            return
        except DatabaseUnreachable as exc:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise DatabaseUnreachable(
                    f"{exc.message}; gave up after {give_up_after:g} s (SCANONCE_DB_START_WAIT_SECONDS)"
                ) from exc
            pause = delay if left is None else min(delay, left)
            log.error("%s; retrying in %g s", exc.message, round(pause, 1))
            if stop is not None and stop.wait(pause):
                raise
            if stop is None:
                time.sleep(pause)
            delay = min(delay * 2, max_wait)


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


class _Compiled(NamedTuple):
    sql: str
    order: tuple[str, ...] | None  # positional drivers (SQLite's qmark): the values' order
    processors: list[tuple[str, Any]]  # (bound name, the column type's bind processor)
    fixed: dict[str, Any]  # values the statement itself holds


class Prepared:
    """A Core statement run through the driver's own `execute`/`executemany`, in the session's
    transaction, instead of SQLAlchemy's statement execution.

    For the ingest writer's hot statements (a C-STORE group, a STOW-RS batch, their audit
    append): SQLAlchemy's per-statement work (cache key, compiled-cache lookup, parameter
    processing, result setup, events) cost 0.2-0.5 ms of CPU per statement on this deployment's
    hardware, several times the driver's own. The statement is still written in Core and compiled
    by SQLAlchemy, once per dialect (SQLite, PostgreSQL): the same SQL, with each column type's
    bind processing applied (a datetime in SQLite's stored format). Driver errors are raised as
    SQLAlchemy's (an IntegrityError stays an IntegrityError for ingest's retry, an
    OperationalError for the app's 503), and a connection the driver calls lost is invalidated.

    Not for statements with expanding IN lists or Python-side defaults left to SQLAlchemy: the
    caller passes every bound value (`column_keys` names an insert's columns)."""

    def __init__(self, statement: Any, *, column_keys: list[str] | None = None) -> None:
        self.statement = statement
        self.column_keys = column_keys
        self._compiled: dict[str, _Compiled] = {}

    def _for(self, dialect: Any) -> _Compiled:
        # By driver too: psycopg and pg8000 are both "postgresql", with different paramstyles.
        key = f"{dialect.name}+{dialect.driver}"
        found = self._compiled.get(key)
        if found is None:
            compiled = self.statement.compile(dialect=dialect, column_keys=self.column_keys)
            if getattr(compiled, "insert_prefetch", None) or getattr(compiled, "update_prefetch", None):
                raise TypeError("a Prepared statement is given every value; SQLAlchemy computes none")
            names = compiled.bind_names
            processors = []
            for bind in compiled.binds.values():
                process = bind.type.dialect_impl(dialect).bind_processor(dialect)
                if process is not None:
                    processors.append((names[bind], process))
            # The values the statement holds itself (a literal compared with, an id): bound too.
            fixed = {
                names[b]: b.value for b in compiled.binds.values() if not b.required and b.callable is None
            }
            order = tuple(compiled.positiontup) if compiled.positional else None
            found = self._compiled[key] = _Compiled(compiled.string, order, processors, fixed)
        return found

    @staticmethod
    def _params(rows: Sequence[Mapping[str, Any]], c: _Compiled) -> list[Any]:
        if c.fixed or c.processors:
            fixed = []
            for row in rows:
                values = {**c.fixed, **row}
                for name, process in c.processors:
                    values[name] = process(values[name])
                fixed.append(values)
            rows = fixed
        if c.order is None:
            return list(rows)
        if len(c.order) == 1:
            return [(row[c.order[0]],) for row in rows]
        pick = itemgetter(*c.order)
        return [pick(row) for row in rows]

    def run(self, session: Session | Connection, rows: Sequence[Mapping[str, Any]]) -> int:
        """Execute once per row (one `executemany`); returns the rows the driver says it
        changed (summed over the parameter sets by both drivers). `session`: the session, or
        its connection (`session.connection()`, fetched once by a caller running several)."""
        if not rows:
            return 0
        conn = session.connection() if isinstance(session, Session) else session
        c = self._for(conn.dialect)
        sql, params = c.sql, self._params(rows, c)
        with _driver_cursor(conn, sql, params, many=len(params) > 1) as cursor:
            if len(params) == 1:
                cursor.execute(sql, params[0])
            else:
                cursor.executemany(sql, params)
            return int(cursor.rowcount)

    def all(
        self, session: Session | Connection, row: Mapping[str, Any] | None = None
    ) -> list[tuple[Any, ...]]:
        """Execute once and return the rows it yields (a SELECT, or a RETURNING, read to its
        end: SQLite runs an UPDATE ... RETURNING only as its rows are read)."""
        conn = session.connection() if isinstance(session, Session) else session
        c = self._for(conn.dialect)
        sql, (params,) = c.sql, self._params([row or {}], c)
        with _driver_cursor(conn, sql, params, many=False) as cursor:
            cursor.execute(sql, params)
            return [tuple(r) for r in cursor.fetchall()]


@contextmanager
def _driver_cursor(conn: Connection, sql: str, params: Any, *, many: bool) -> Iterator[Any]:
    """A cursor of the session's own driver connection for one Prepared execution: announced
    to SQLAlchemy's `before_cursor_execute` listeners (statement counts in tests, tracing; a
    check of an empty list when none is set), driver errors raised as SQLAlchemy's, closed."""
    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    listeners = conn.dispatch.before_cursor_execute
    if listeners:
        listeners(conn, cursor, sql, params, None, many)
    try:
        yield cursor
    except Exception as exc:
        _raise_wrapped(conn, sql, exc)
        raise
    finally:
        cursor.close()


def _raise_wrapped(conn: Connection, sql: str, exc: Exception) -> None:
    """Raise a driver error as SQLAlchemy would have from the same statement (anything else is
    left to the caller to re-raise as it is)."""
    dialect = conn.dialect
    dbapi_error = dialect.loaded_dbapi.Error
    if not isinstance(exc, dbapi_error):
        return
    lost = dialect.is_disconnect(exc, conn.connection.dbapi_connection, None)
    if lost:
        conn.invalidate(exc)
    # Without the parameters, nor the values the driver quotes: error texts reach logs.
    _scrub_driver_text(exc)
    raise DBAPIError.instance(
        sql, None, exc, dbapi_error, hide_parameters=True, connection_invalidated=lost, dialect=dialect
    ) from exc
