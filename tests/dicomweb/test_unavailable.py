"""An object store that fails under a retrieve: the client gets a 503 it can retry, never a 200
whose body breaks off after the headers (tests/cluster found the cut stream under load)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid

from broker.settings import Settings
from storage import StoreUnavailable
from tests.conftest import s3_storage_url
from tests.dicomweb.conftest import LiveServer, serve
from tests.dicomweb.data import multipart_body
from tests.support import make_ds, to_bytes


class _Refusing:
    """The store as it is, except that every read fails as an unreachable S3 does."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.url = inner.url

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def open_local(self, key: str) -> str | None:
        return None  # as S3: every read goes through get()

    def get(self, key: str, **_kwargs: Any) -> Iterator[bytes]:
        raise StoreUnavailable("object store unreachable: ConnectionError")


def test_wado_rs_series_is_503_when_the_store_cannot_open_the_first_object(live_server: LiveServer) -> None:
    study, series = generate_uid(), generate_uid()
    data = to_bytes(make_ds(sop=generate_uid(), study=study, series=series))
    with live_server.http() as http:
        body, content_type = multipart_body([data])
        stored = http.post("/dicom-web/studies", content=body, headers={"Content-Type": content_type})
        assert stored.status_code == 200
        app: Any = live_server.app
        state = app.state.scanonce
        app.state.scanonce = dataclasses.replace(state, store=_Refusing(state.store))
        try:
            for accept in (
                'multipart/related; type="application/dicom"; transfer-syntax=*',
                "image/jpeg",
            ):
                suffix = "/rendered" if "jpeg" in accept else ""
                r = http.get(
                    f"/dicom-web/studies/{study}/series/{series}{suffix}", headers={"Accept": accept}
                )
                assert r.status_code == 503, (accept, r.status_code, r.content[:200])
                assert r.json()["error"] == "Service unavailable"
        finally:
            app.state.scanonce = state
        r = http.get(
            f"/dicom-web/studies/{study}/series/{series}",
            headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
        )
        assert r.status_code == 200 and data in r.content


@pytest.mark.postgres  # runs with the S3 (moto server) tests
def test_wado_rs_is_503_naming_the_bucket_when_the_bucket_is_gone(
    tmp_path: Path, moto_server: str, s3_bucket: str, s3_client: Any
) -> None:
    """The object store's bucket deleted under a node (or the URL changed to a wrong one): a viewer
    gets 503 "try again" naming the bucket, the operator's cue, not 404 "no such instance"."""
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=f"sqlite:///{tmp_path / 'index.sqlite3'}",
        storage_url=s3_storage_url(moto_server, s3_bucket),
    )
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    data = to_bytes(make_ds(sop=sop, study=study, series=series))
    with serve(settings) as server, server.http() as http:
        body, content_type = multipart_body([data])
        stored = http.post("/dicom-web/studies", content=body, headers={"Content-Type": content_type})
        assert stored.status_code == 200, stored.text
        for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=s3_bucket):
            for obj in page.get("Contents", ()):
                s3_client.delete_object(Bucket=s3_bucket, Key=obj["Key"])
        s3_client.delete_bucket(Bucket=s3_bucket)
        accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'
        for path in (
            f"/dicom-web/studies/{study}",
            f"/dicom-web/studies/{study}/series/{series}/instances/{sop}",
        ):
            r = http.get(path, headers={"Accept": accept})
            assert r.status_code == 503, (path, r.status_code, r.content[:200])
            assert r.json()["error"] == "Service unavailable"
            assert s3_bucket in r.json()["detail"] and "does not exist" in r.json()["detail"], r.json()
