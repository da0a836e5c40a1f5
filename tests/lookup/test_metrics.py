"""Prometheus counters of avoided repeats and dose spared, on the default registry that the
broker's /metrics serves: recorded avoided repeats move them, refused ones do not."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from pydicom.uid import generate_uid
from sqlmodel import Session

from broker.app import create_app
from broker.index.service import ingest_files
from broker.lookup import service
from tests.support import ADMIN, auth_headers, make_ds, write

STUDY = generate_uid()


@pytest.fixture
def client(settings: Any, tmp_path: Path) -> Iterator[TestClient]:
    """A broker holding one CT abdomen/pelvis (no dose records: a repeat costs the typical dose)."""
    with TestClient(create_app(settings=settings), headers=auth_headers()) as c:
        st = c.app.state.scanonce  # type: ignore[attr-defined]
        ds = make_ds(sop=generate_uid(), study=STUDY, series=generate_uid(), description="CT ABDOMEN PELVIS")
        out = ingest_files(
            engine=st.engine,
            store=st.store,
            principal=ADMIN,
            facility_id="local",
            paths=[write(tmp_path, "ct.dcm", ds)],
        )
        assert out[0].ok
        yield c


def _sample(name: str, facility: str) -> float:
    return REGISTRY.get_sample_value(name, {"facility": facility}) or 0.0


def test_avoided_repeats_and_dose_spared_are_counted(client: TestClient) -> None:
    engine = client.app.state.scanonce.engine  # type: ignore[attr-defined]
    uid = STUDY
    repeats = _sample("scanonce_repeats_avoided_total", "local")
    dose = _sample("scanonce_dose_spared_msv_total", "local")

    with Session(engine) as session:
        first = service.record_avoided(
            session=session,
            principal=ADMIN,
            study_uid=uid,
            planned_exam="CT ABDOMEN PELVIS",
            facility="local",
        )
    r = client.post(
        "/api/priors/avoided",
        json={"study_instance_uid": uid, "planned_exam": "CT ABD PEL", "facility": "local"},
    )
    assert r.status_code == 201, r.text
    assert first.estimated_dose_msv and first.estimated_dose_msv > 0

    assert _sample("scanonce_repeats_avoided_total", "local") == repeats + 2
    assert _sample("scanonce_dose_spared_msv_total", "local") == pytest.approx(
        dose + first.estimated_dose_msv + r.json()["estimated_dose_msv"]
    )
    # Refused: an unknown study, an unknown facility. Nothing is counted.
    for body in (
        {"study_instance_uid": "1.2.3", "planned_exam": "CT", "facility": "local"},
        {"study_instance_uid": uid, "planned_exam": "CT", "facility": "nowhere"},
    ):
        assert client.post("/api/priors/avoided", json=body).status_code == 404
    assert _sample("scanonce_repeats_avoided_total", "local") == repeats + 2
