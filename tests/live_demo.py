"""A live broker (uvicorn on a free loopback port) holding the demo data, on either backend: for
interface tests that speak HTTP through a real client library (FHIR clients, CDS Hooks clients).
A module shares one (demo loading takes seconds); its tests only read, or write rows of their own."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.demo.service import load_demo
from broker.settings import Settings
from tests.conftest import s3_storage_url
from tests.dicomweb.conftest import LiveServer, serve

BACKENDS = [
    pytest.param("sqlite-local", id="sqlite-local"),
    pytest.param("postgres-s3", id="postgres-s3", marks=pytest.mark.postgres),
]

# Seed 42 (the demo default): a ten-year-old with a CT abdomen/pelvis at the children's hospital
# and one at St Mary's on 2026-06-16 (linked to the same person); an adult at North General.
CHILD_ISSUER, CHILD_MRN = "CHILDRENS", "K346295"
CHILD_ST_MARYS_MRN = "M55078256"
ADULT_ISSUER, ADULT_MRN = "NORTH-GENERAL", "183882874"


@contextlib.contextmanager
def demo_server(request: pytest.FixtureRequest, tmp: Path) -> Iterator[LiveServer]:
    with contextlib.ExitStack() as stack:
        if request.param == "sqlite-local":
            db_url = f"sqlite:///{tmp / 'index.sqlite3'}"
            storage_url = (tmp / "objects").as_uri()
        else:
            pg_admin = request.getfixturevalue("pg_admin")
            template = request.getfixturevalue("_pg_template")
            moto_url = request.getfixturevalue("moto_server")
            name = pg_admin.new_name("demo")
            db_url = pg_admin.create(name, template=template)
            stack.callback(pg_admin.drop, name)
            storage_url = s3_storage_url(moto_url, f"demo-{secrets.token_hex(6)}")
        settings = Settings(data_dir=tmp / "data", database_url=db_url, storage_url=storage_url, mllp_port=0)
        server = stack.enter_context(serve(settings))
        st = server.app.state.scanonce  # type: ignore[attr-defined]
        load_demo(engine=st.engine, store=st.store)
        yield server
