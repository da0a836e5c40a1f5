"""STOW-RS request limits: a request above SCANONCE_STOW_MAX_REQUEST_BYTES or with more parts than
SCANONCE_STOW_MAX_PARTS is refused whole (413) and stores nothing."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import httpx
import pytest

from broker.settings import Settings
from tests.conftest import Backend
from tests.dicomweb.conftest import serve
from tests.dicomweb.data import Corpus, multipart_body
from tests.support import auth_headers


def _local_bytes(corpus: Corpus) -> list[bytes]:
    return [i.read_bytes() for i in corpus.by_facility()["local"]]


def _settings(backend: Backend, tmp_path: Path, **limits: Any) -> Settings:
    return Settings(
        data_dir=tmp_path / "d", database_url=backend.database_url, storage_url=backend.storage_url, **limits
    )


def test_the_defaults_are_4_gib_and_10000_parts() -> None:
    s = Settings()
    assert s.stow_max_request_bytes == 4 * 1024**3
    assert s.stow_max_parts == 10_000


def test_the_limits_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCANONCE_STOW_MAX_REQUEST_BYTES", "12345")
    monkeypatch.setenv("SCANONCE_STOW_MAX_PARTS", "7")
    s = Settings()
    assert (s.stow_max_request_bytes, s.stow_max_parts) == (12345, 7)


def test_more_parts_than_allowed_is_413_and_stores_nothing(
    backend: Backend, tmp_path: Path, corpus: Corpus
) -> None:
    data = _local_bytes(corpus)
    assert len(data) > 3
    with serve(_settings(backend, tmp_path, stow_max_parts=3)) as server, server.http() as http:
        body, ctype = multipart_body(data[:3])
        assert (
            http.post("/dicom-web/studies", content=body, headers={"Content-Type": ctype}).status_code == 200
        )
        stored = len(server.client().search_for_instances())
        body, ctype = multipart_body(data[3:] + data[:3])
        r = http.post("/dicom-web/studies", content=body, headers={"Content-Type": ctype})
        assert r.status_code == 413, r.text
        assert "limit of 3 parts" in r.json()["detail"]
        assert len(server.client().search_for_instances()) == stored
        assert not list((server.settings.data_dir / "spool").iterdir())  # no part left behind


def test_a_request_above_the_size_limit_is_413_and_stores_nothing(
    backend: Backend, tmp_path: Path, corpus: Corpus
) -> None:
    data = _local_bytes(corpus)
    body, ctype = multipart_body(data)
    limit = len(body) - 1
    with serve(_settings(backend, tmp_path, stow_max_request_bytes=limit)) as server, server.http() as http:
        r = http.post("/dicom-web/studies", content=body, headers={"Content-Type": ctype})
        assert r.status_code == 413, r.text
        assert str(limit) in r.json()["detail"]
        assert http.get("/dicom-web/studies").status_code == 204
        # Without a Content-Length (chunked), the count of bytes received decides.
        r = http.post(
            "/dicom-web/studies",
            content=iter([body[i : i + 65536] for i in range(0, len(body), 65536)]),
            headers={"Content-Type": ctype},
        )
        assert r.status_code == 413, r.text
        assert http.get("/dicom-web/studies").status_code == 204
        assert not list((server.settings.data_dir / "spool").iterdir())
        # Exactly at the limit is accepted.
        body_ok, ctype_ok = multipart_body(data[:2])
        assert len(body_ok) <= limit
        r = http.post("/dicom-web/studies", content=body_ok, headers={"Content-Type": ctype_ok})
        assert r.status_code == 200, r.text


def test_an_announced_oversized_body_is_refused_before_it_is_sent(
    backend: Backend, tmp_path: Path, corpus: Corpus
) -> None:
    with serve(_settings(backend, tmp_path, stow_max_request_bytes=1000)) as server:
        host, port = server.origin.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            # Headers only: the 413 must come without the server waiting for 10 GB of body.
            token = auth_headers("facility")["Authorization"].encode()
            sock.sendall(
                b"POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000000\r\n"
                b"Authorization: " + token + b"\r\n"
                b'Content-Type: multipart/related; type="application/dicom"; boundary=b\r\n\r\n'
            )
            reply = sock.recv(65536)
        assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
        with httpx.Client(base_url=server.origin, headers=auth_headers()) as http:
            assert http.get("/dicom-web/studies").status_code == 204
