"""A live broker (uvicorn on a free loopback port) holding the demo data, on either backend: for
interface tests that speak HTTP through a real client library (FHIR clients, CDS Hooks clients).
A module shares one (demo loading takes seconds); its tests only read, or write rows of their own."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlmodel import Session, select

from broker.index.models import Patient, Study
from broker.settings import Settings
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
    """The broker serving a copy of the demo loaded once per session (tests/conftest.py's
    templates): loading it again per module took 30-70 s on a loaded machine."""
    with contextlib.ExitStack() as stack:
        if request.param == "sqlite-local":
            src: Path = request.getfixturevalue("_demo_sqlite")
            tmp.mkdir(parents=True, exist_ok=True)
            for f in src.glob("index.sqlite3*"):
                shutil.copy2(f, tmp / f.name)
            shutil.copytree(src / "objects", tmp / "objects")
            db_url = f"sqlite:///{tmp / 'index.sqlite3'}"
            storage_url = (tmp / "objects").as_uri()
        else:
            pg_admin = request.getfixturevalue("pg_admin")
            template, storage_url = request.getfixturevalue("_demo_pg")
            name = pg_admin.new_name("demo")
            db_url = pg_admin.create(name, template=template)
            stack.callback(pg_admin.drop, name)
        settings = Settings(data_dir=tmp / "data", database_url=db_url, storage_url=storage_url, mllp_port=0)
        yield stack.enter_context(serve(settings))


def the_child_and_a_stranger(session: Session) -> tuple[Patient, Patient, Study]:
    """The demo child's patient row at the children's hospital, another person's patient row at
    North General, and one of that stranger's studies: the tests' "namesake" scenarios start
    from these (a shared Patient ID, an open review item between the two)."""
    child = session.exec(select(Patient).where(Patient.issuer != "", Patient.patient_id == CHILD_MRN)).one()
    stranger = session.exec(
        select(Patient).where(Patient.person_id != child.person_id, Patient.facility_id == "northgen")
    ).first()
    assert stranger is not None
    study = session.exec(select(Study).where(Study.patient_pk == stranger.pk)).first()
    assert study is not None
    return child, stranger, study
