"""The broker served for real: uvicorn on a free loopback port, spoken to over HTTP.

`live_server` is fresh per test (an empty archive on the `backend` under test). `archive` is one
loaded archive per module and backend, for the read-only QIDO/WADO tests, so that loading the data
is paid once and not per test.
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn
from dicomweb_client.api import DICOMwebClient

from broker.app import create_app
from broker.settings import Settings
from tests.conftest import Backend
from tests.dicomweb.data import Corpus, build_corpus, multipart_body
from tests.support import auth_headers


@dataclass
class LiveServer:
    origin: str  # http://127.0.0.1:port
    settings: Settings
    app: object

    @property
    def url(self) -> str:
        return f"{self.origin}/dicom-web"

    def facility_url(self, facility: str) -> str:
        return f"{self.origin}/facilities/{facility}/dicom-web"

    def client(self, url: str | None = None) -> DICOMwebClient:
        return DICOMwebClient(url or self.url, headers=auth_headers())

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.origin, timeout=30, headers=auth_headers())


@contextlib.contextmanager
def serve(settings: Settings) -> Iterator[LiveServer]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    # dicomweb-client sends a Host header without the port, so URLs the broker writes
    # (RetrieveURL, BulkDataURI) come from the configured public origin, as in production.
    settings = settings.model_copy(update={"base_url": f"http://127.0.0.1:{port}"})
    app = create_app(settings)
    config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield LiveServer(f"http://127.0.0.1:{port}", settings, app)
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
        engine = getattr(getattr(app, "state", None), "scanonce", None)
        if engine is not None:
            engine.engine.dispose()


@pytest.fixture
def live_server(backend: Backend, tmp_path: Path) -> Iterator[LiveServer]:
    settings = Settings(
        data_dir=tmp_path / "data", database_url=backend.database_url, storage_url=backend.storage_url
    )
    with serve(settings) as server:
        yield server


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    return build_corpus(tmp_path_factory.mktemp("corpus"))


@dataclass
class Archive:
    server: LiveServer
    corpus: Corpus


@pytest.fixture(
    scope="module",
    params=[
        pytest.param("sqlite-local", id="sqlite-local"),
        pytest.param("postgres-s3", id="postgres-s3", marks=pytest.mark.postgres),
    ],
)
def archive(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, corpus: Corpus
) -> Iterator[Archive]:
    """A broker holding the whole corpus, shared by a module's read-only tests."""
    tmp = tmp_path_factory.mktemp("archive")
    with contextlib.ExitStack() as stack:
        if request.param == "sqlite-local":
            db_url = f"sqlite:///{tmp / 'index.sqlite3'}"
            storage_url = (tmp / "objects").as_uri()
        else:
            pg_admin = request.getfixturevalue("pg_admin")
            template = request.getfixturevalue("_pg_template")
            moto_url = request.getfixturevalue("moto_server")
            name = pg_admin.new_name("dw")
            db_url = pg_admin.create(name, template=template)
            stack.callback(pg_admin.drop, name)
            from tests.conftest import s3_storage_url

            storage_url = s3_storage_url(moto_url, f"dw-{secrets.token_hex(6)}")
        settings = Settings(data_dir=tmp / "data", database_url=db_url, storage_url=storage_url)
        server = stack.enter_context(serve(settings))
        with server.http() as http:
            for facility, paths in corpus.by_facility().items():
                if facility != settings.default_facility:
                    r = http.post(
                        "/api/facilities", json={"id": facility, "issuer": facility.upper(), "name": facility}
                    )
                    assert r.status_code == 201, r.text
                body, ctype = multipart_body([p.read_bytes() for p in paths])
                url = (
                    "/dicom-web/studies"
                    if facility == settings.default_facility
                    else f"/facilities/{facility}/dicom-web/studies"
                )
                r = http.post(url, content=body, headers={"Content-Type": ctype})
                assert r.status_code == 200, r.text
        yield Archive(server, corpus)
