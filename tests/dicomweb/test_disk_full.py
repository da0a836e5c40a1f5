"""A disk that fills up under a STOW-RS: a clear 507, nothing half-stored, and the same request
stored whole once there is room again."""

from __future__ import annotations

import dataclasses
import errno
from typing import Any

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import event

from tests.conftest import Backend
from tests.dicomweb.conftest import LiveServer
from tests.dicomweb.data import multipart_body
from tests.support import make_ds, to_bytes


class _FullDisk:
    """The store as it is, except that writing an object fails as a full local disk does (the
    one part of this that cannot be made real in a test: no filesystem of our own to fill)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.url = inner.url

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def _full(self, *_args: Any, **_kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")

    put = put_file = put_files = _full


def test_stow_rs_on_a_full_disk_is_507_and_stores_nothing(live_server: LiveServer) -> None:
    study = generate_uid()
    parts = [to_bytes(make_ds(sop=generate_uid(), study=study, series=generate_uid())) for _ in range(3)]
    body, content_type = multipart_body(parts)
    headers = {"Content-Type": content_type, "Accept": "application/dicom+json"}
    app: Any = live_server.app
    state = app.state.scanonce
    with live_server.http() as http:
        app.state.scanonce = dataclasses.replace(state, store=_FullDisk(state.store))
        try:
            refused = http.post("/dicom-web/studies", content=body, headers=headers)
        finally:
            app.state.scanonce = state
        assert refused.status_code == 507, refused.text[:300]
        assert refused.json()["error"] == "Insufficient storage"
        assert "disk is full" in refused.json()["detail"]
        assert http.get(f"/dicom-web/studies?StudyInstanceUID={study}").status_code == 204
        assert list(state.store.list("")) == []

        # Room again: the same request is stored whole, nothing of the refused one in the way.
        stored = http.post("/dicom-web/studies", content=body, headers=headers)
        assert stored.status_code == 200, stored.text[:300]
        found = http.get(f"/dicom-web/studies/{study}/instances")
        assert found.status_code == 200 and len(found.json()) == 3


def test_stow_rs_when_the_embedded_database_cannot_grow_is_507(
    live_server: LiveServer, backend: Backend
) -> None:
    """SQLite's own "database or disk is full", made real by capping the file's page count: the
    sender is told the disk is full, not that the database is away, and nothing is indexed."""
    if backend.name != "sqlite-local":
        pytest.skip("SQLITE_FULL is the embedded database's")
    app: Any = live_server.app
    engine = app.state.scanonce.engine

    def cap(dbapi_connection: Any, _record: Any) -> None:
        (pages,) = dbapi_connection.execute("PRAGMA page_count").fetchone()
        dbapi_connection.execute(f"PRAGMA max_page_count = {pages}")

    engine.pool.dispose()
    event.listen(engine, "connect", cap)
    study = generate_uid()
    # Enough rows that the index must grow by a page or more.
    parts = [to_bytes(make_ds(sop=generate_uid(), study=study, series=generate_uid())) for _ in range(40)]
    body, content_type = multipart_body(parts)
    with live_server.http() as http:
        try:
            refused = http.post("/dicom-web/studies", content=body, headers={"Content-Type": content_type})
        finally:
            event.remove(engine, "connect", cap)
            engine.pool.dispose()
        assert refused.status_code == 507, refused.text[:300]
        assert "disk is full" in refused.json()["detail"]
        assert http.get(f"/dicom-web/studies?StudyInstanceUID={study}").status_code == 204
