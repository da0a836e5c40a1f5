"""Shared fixtures: real PostgreSQL, S3 over HTTP (moto's server mode), and the two backends.

Every test that takes `backend` runs twice: on the embedded default (SQLite file + local
folder) and on production parts (PostgreSQL + S3). Each run gets its own database and its own
bucket, so tests never see each other's rows or objects.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import psycopg
import pytest
from _pytest.logging import LogCaptureHandler
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from sqlalchemy.engine import URL

from broker.settings import Settings

# One signing key for every broker the tests build or start (inherited by `scanonce serve`
# subprocesses), so that `tests.support.auth_headers` mints tokens they all accept.
TEST_SIGNING_KEY = Path(
    os.environ.setdefault(
        "SCANONCE_AUTH_SIGNING_KEY_FILE",
        str(Path(tempfile.mkdtemp(prefix="scanonce-test-key-")) / "signing-key.json"),
    )
)

# Where tests find PostgreSQL: a libpq DSN of a server where we may CREATE DATABASE.
PG_DSN = os.environ.get("SCANONCE_TEST_PG_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=postgres")


# -- S3: moto in server mode ----------------------------------------------------------------


@pytest.fixture(autouse=True)
def _root_logger_restored() -> Iterator[None]:
    """A command run in-process (`scanonce serve` or `worker` through CliRunner) points the root
    logger at the runner's stderr, closed once it returns: a later test's log line in the same
    process then fails to print ("--- Logging error ---", an association thread's "Association
    Released" once). The handlers it added go, the level comes back; pytest's own capture
    handlers, added and removed around each phase, are left to pytest."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers and not isinstance(handler, LogCaptureHandler):
            root.removeHandler(handler)
    for handler in handlers:
        if handler not in root.handlers and not isinstance(handler, LogCaptureHandler):
            root.addHandler(handler)
    root.setLevel(level)


@pytest.fixture(scope="session", autouse=True)
def _aws_test_credentials() -> Iterator[None]:
    """Dummy credentials in every test process, so boto3's usual chain never reaches for real
    ones (or for IMDS), whichever tests a pytest-xdist worker happens to run first."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        for var in ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE"):
            mp.delenv(var, raising=False)
        yield


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """A real S3 endpoint over HTTP on a free loopback port; yields its URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_client(moto_server: str) -> Any:
    """A plain boto3 client on the moto server, for seeding and inspecting buckets."""
    import boto3

    return boto3.session.Session().client("s3", endpoint_url=moto_server, region_name="us-east-1")


@pytest.fixture
def s3_bucket(s3_client: Any) -> Iterator[str]:
    """A fresh bucket name on the moto server (created by the store via create_bucket=true);
    emptied and removed after the test so the in-memory server does not grow."""
    bucket = f"t-{secrets.token_hex(8)}"
    yield bucket
    client = s3_client
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", ())]
            if keys:
                client.delete_objects(Bucket=bucket, Delete={"Objects": keys})
        client.delete_bucket(Bucket=bucket)
    except client.exceptions.NoSuchBucket:
        pass


def s3_storage_url(endpoint_url: str, bucket: str, prefix: str = "") -> str:
    path = f"/{prefix}" if prefix else ""
    return f"s3://{bucket}{path}?" + urlencode({"endpoint_url": endpoint_url, "create_bucket": "true"})


# -- PostgreSQL -----------------------------------------------------------------------------


class PgAdmin:
    """Creates and drops uniquely named databases on the test server (autocommit)."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.params = conninfo_to_dict(dsn)
        self.prefix = f"scanonce_test_{os.getpid()}_{secrets.token_hex(3)}"
        try:
            self.conn = psycopg.connect(dsn, autocommit=True, connect_timeout=5, application_name=self.prefix)
            error = None
        except psycopg.OperationalError as exc:
            error = exc
        if error is not None:  # failed outside the except: the message alone, no chained traceback
            pytest.fail(
                f"PostgreSQL is not reachable at {dsn!r}: {error}\n"
                "The PostgreSQL tests need a server: start one as the README's test command does, "
                "or point SCANONCE_TEST_PG_DSN at a server where this user may CREATE DATABASE.",
                pytrace=False,
            )
        self._count = 0
        self._sweep_dead_runs()

    def _sweep_dead_runs(self) -> None:
        """Drop databases left by test runs that were killed before their teardown.

        A live run keeps its admin connection open under its prefix as application_name (and
        its pid is alive here), so this never touches another engineer's or a parallel
        worker's run, even from another container sharing the server.
        """
        live = {
            name
            for (name,) in self.conn.execute(
                "SELECT application_name FROM pg_stat_activity WHERE application_name LIKE 'scanonce_test_%'"
            )
        }
        rows = self.conn.execute(
            "SELECT datname FROM pg_database WHERE datname ~ '^scanonce_test_[0-9]+_[0-9a-f]{6}_'"
        ).fetchall()
        for (name,) in rows:
            run = "_".join(name.split("_")[:4])
            # The pid check also spares runs of an older conftest that set no application_name.
            if run not in live and not Path(f"/proc/{run.split('_')[2]}").exists():
                self.drop(name)

    def new_name(self, tag: str = "") -> str:
        self._count += 1
        return f"{self.prefix}_{tag}{self._count}"

    def create(self, name: str, *, template: str | None = None) -> str:
        query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template:
            query = sql.SQL("{} TEMPLATE {}").format(query, sql.Identifier(template))
        self.conn.execute(query)
        return self.url(name)

    def drop(self, name: str) -> None:
        # FORCE: a test that leaked a connection must not leave its database behind.
        self.conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def url(self, name: str) -> str:
        """The SQLAlchemy URL (psycopg 3 driver) of database `name` on the test server."""
        p = {k: str(v) for k, v in self.params.items() if v not in (None, "")}
        return URL.create(
            "postgresql+psycopg",
            username=p.get("user"),
            password=p.get("password"),
            host=p.get("host"),
            port=int(p["port"]) if "port" in p else None,
            database=name,
        ).render_as_string(hide_password=False)

    def close(self) -> None:
        self.conn.close()


@pytest.fixture(scope="session")
def pg_admin() -> Iterator[PgAdmin]:
    admin = PgAdmin(PG_DSN)
    try:
        yield admin
    finally:
        admin.close()


@pytest.fixture(scope="session")
def pg_url(pg_admin: PgAdmin) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for the session; dropped at the end."""
    name = pg_admin.new_name("s")
    url = pg_admin.create(name)
    try:
        yield url
    finally:
        pg_admin.drop(name)


@pytest.fixture(scope="session")
def _pg_template(pg_admin: PgAdmin) -> Iterator[str]:
    """A migrated database that each postgres test clones (a clone is ~30 ms; a migration
    is far more and grows with every domain)."""
    from broker.db import make_engine, migrate

    name = pg_admin.new_name("tpl")
    url = pg_admin.create(name)
    try:
        engine = make_engine(url)
        try:
            migrate(engine)
        finally:
            engine.dispose()  # CREATE DATABASE ... TEMPLATE needs the template to have no sessions
        yield name
    finally:
        pg_admin.drop(name)


@dataclass(frozen=True, slots=True)
class CuttablePg:
    """A migrated database reached through a proxy the test can cut (`proxy.stop()`) and
    restore (`proxy.start()`): the database "going away" for one broker only."""

    database_url: str
    proxy: Any  # tests.ops.proxy.TcpProxy


@pytest.fixture
def cuttable_pg(pg_admin: PgAdmin, _pg_template: str) -> Iterator[CuttablePg]:
    from sqlalchemy.engine import make_url

    from tests.ops.proxy import TcpProxy

    name = pg_admin.new_name("cut")
    url = make_url(pg_admin.create(name, template=_pg_template))
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432).start()
    try:
        yield CuttablePg(
            database_url=url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False),
            proxy=proxy,
        )
    finally:
        proxy.stop()
        pg_admin.drop(name)


# -- the two backends -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Backend:
    name: str  # "sqlite-local" or "postgres-s3"
    database_url: str
    storage_url: str


@pytest.fixture(
    params=[
        pytest.param("sqlite-local", id="sqlite-local"),
        pytest.param("postgres-s3", id="postgres-s3", marks=pytest.mark.postgres),
    ]
)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """The database and object store a test runs on, fresh for each test.

    sqlite-local: an empty SQLite file and a folder under tmp_path.
    postgres-s3: a database cloned from a migrated template and a new bucket on the moto
    server. Call broker.db.migrate() either way (it is idempotent), as the app does.
    """
    if request.param == "sqlite-local":
        yield Backend(
            name="sqlite-local",
            database_url=f"sqlite:///{tmp_path / 'index.sqlite3'}",
            storage_url=(tmp_path / "objects").as_uri(),
        )
        return
    pg_admin: PgAdmin = request.getfixturevalue("pg_admin")
    template: str = request.getfixturevalue("_pg_template")
    moto_url: str = request.getfixturevalue("moto_server")
    bucket: str = request.getfixturevalue("s3_bucket")
    name = pg_admin.new_name("t")
    url = pg_admin.create(name, template=template)
    try:
        yield Backend(name="postgres-s3", database_url=url, storage_url=s3_storage_url(moto_url, bucket))
    finally:
        pg_admin.drop(name)


# -- the demo data set, loaded once per backend ------------------------------------------------


def _load_demo_into(backend: Backend, data_dir: Path) -> None:
    """Load the demo as `scanonce demo` does: through the app's state, which wires ingest to
    identity linking and trains the matcher; then close every connection (a SQLite file is
    whole again, a PostgreSQL template has no sessions left)."""
    from broker.app import build_state
    from broker.demo.service import load_demo

    state = build_state(_make_settings(backend, data_dir))
    try:
        load_demo(engine=state.engine, store=state.store)
    finally:
        state.engine.dispose()


@pytest.fixture(scope="session")
def _demo_sqlite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo (seed 42, 40 persons) loaded once into SQLite + a folder; demo tests copy it.
    Loading it takes seconds per test on a loaded machine, copying it a fraction of one."""
    root = tmp_path_factory.mktemp("demo-sqlite")
    backend = Backend("sqlite-local", f"sqlite:///{root / 'index.sqlite3'}", (root / "objects").as_uri())
    _load_demo_into(backend, root)
    return root


@pytest.fixture(scope="session")
def _demo_pg(
    pg_admin: PgAdmin, _pg_template: str, moto_server: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str]]:
    """The demo loaded once into a PostgreSQL template database and a bucket on the moto server;
    yields (template name, storage URL). Clones share the bucket: demo tests read it, and the
    objects a test writes are its own new keys, so sharing it changes no test's outcome."""
    name = pg_admin.new_name("demo")
    url = pg_admin.create(name, template=_pg_template)
    storage_url = s3_storage_url(moto_server, f"demo-{secrets.token_hex(6)}")
    _load_demo_into(Backend("postgres-s3", url, storage_url), tmp_path_factory.mktemp("demo-pg"))
    try:
        yield name, storage_url
    finally:
        pg_admin.drop(name)


@pytest.fixture(
    params=[
        pytest.param("sqlite-local", id="sqlite-local"),
        pytest.param("postgres-s3", id="postgres-s3", marks=pytest.mark.postgres),
    ]
)
def demo_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """A backend already holding the demo data set, fresh for each test (a copy of a template
    loaded once per session), as if `load_demo` had just run on an empty one."""
    if request.param == "sqlite-local":
        src: Path = request.getfixturevalue("_demo_sqlite")
        for f in src.glob("index.sqlite3*"):
            shutil.copy2(f, tmp_path / f.name)
        shutil.copytree(src / "objects", tmp_path / "objects")
        yield Backend(
            name="sqlite-local",
            database_url=f"sqlite:///{tmp_path / 'index.sqlite3'}",
            storage_url=(tmp_path / "objects").as_uri(),
        )
        return
    pg_admin: PgAdmin = request.getfixturevalue("pg_admin")
    template, storage_url = request.getfixturevalue("_demo_pg")
    name = pg_admin.new_name("d")
    url = pg_admin.create(name, template=template)
    try:
        yield Backend(name="postgres-s3", database_url=url, storage_url=storage_url)
    finally:
        pg_admin.drop(name)


def _make_settings(backend: Backend, tmp_path: Path, **overrides: Any) -> Settings:
    # No fixed listener ports: an app built with services=True must not bind HL7's 2575.
    overrides.setdefault("mllp_port", 0)
    return Settings(
        data_dir=tmp_path,
        database_url=backend.database_url,
        storage_url=backend.storage_url,
        **overrides,
    )


@pytest.fixture
def make_settings() -> Callable[..., Settings]:
    """`make_settings(backend, tmp_path, **overrides)` -> Settings on that backend."""
    return _make_settings


@pytest.fixture
def settings(backend: Backend, tmp_path: Path) -> Settings:
    return _make_settings(backend, tmp_path)
