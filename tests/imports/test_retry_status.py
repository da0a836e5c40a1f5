"""An import whose run meets a transient failure (here the broker's object store down): its job
is queued again with backoff, its instances are not failed as if the destination had refused
them, and the radiologist's list and the API say when it will be tried again instead of showing
it `running` as if it were moving."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import text

from broker.app import create_app
from broker.deps import AppState
from broker.imports import service
from broker.jobs import service as jobs
from broker.settings import Settings
from storage import StoreUnavailable
from tests.imports.conftest import MINE, add_destination, ingest_outside, register_local_patient
from tests.peers import orthanc
from tests.support import ADMIN, auth_headers


class _DownStore:
    """An object store that does not answer (every call: StoreUnavailable, as S3 down says)."""

    def __getattr__(self, name: str) -> Any:
        def down(*args: Any, **kwargs: Any) -> Any:
            raise StoreUnavailable("the object store does not answer")

        return down


def test_an_import_waiting_for_its_retry_says_when_and_then_completes(
    state: AppState, settings: Settings, tmp_path: Path
) -> None:
    radiologist = auth_headers("radiologist")
    with orthanc(tmp_path / "pacs", aet="MYPACS") as pacs:
        add_destination(state, pacs)
        outside = ingest_outside(state, tmp_path)
        register_local_patient(state)
        row = service.start_import(
            engine=state.engine,
            principal=ADMIN,
            study_uid=outside.study_uid,
            facility_id=MINE,
            via="dicomweb",
        )
        # The broker's own object store is down when the job runs: a transient failure, so the
        # job is queued again with backoff and the import waits, still active.
        before = datetime.now(UTC)
        jobs.work(engine=state.engine, store=_DownStore(), once=True, policy=jobs.Policy(backoff_seconds=600))
        with TestClient(create_app(settings=settings, state=state)) as client:
            got = client.get(f"/api/imports/{row.id}", headers=radiologist)
            assert got.status_code == 200, got.text
            body = got.json()
            assert body["status"] in ("queued", "running") and body["finished_at"] is None, body["message"]
            assert body["failed"] == 0 and not any(i["status"] == "failed" for i in body["instances"])
            retry_at = datetime.fromisoformat(body["retry_at"])
            assert before < retry_at <= datetime.now(UTC) + timedelta(seconds=600)
            listed = client.get("/api/imports", headers=radiologist).json()
            assert [r["retry_at"] for r in listed if r["id"] == row.id] == [body["retry_at"]]
            page = client.get("/imports", headers=radiologist)
            assert page.status_code == 200
            assert f"waiting to retry at {retry_at.strftime('%H:%M:%S')} UTC" in page.text
        # The store is back and the backoff over: the next attempt delivers every instance.
        with state.engine.begin() as conn:
            conn.execute(text("UPDATE job SET run_after = NULL WHERE id = :id"), {"id": row.job_id})
        jobs.work(engine=state.engine, store=state.store, once=True)
        with TestClient(create_app(settings=settings, state=state)) as client:
            done = client.get(f"/api/imports/{row.id}", headers=radiologist).json()
    assert (done["status"], done["sent"], done["failed"], done["retry_at"]) == ("done", 5, 0, None), done[
        "message"
    ]
