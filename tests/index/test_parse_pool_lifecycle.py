"""The parse worker pool lives as long as the server: started with it (so the first STOW-RS
does not wait seconds for worker processes to spawn) and shut down cleanly with it."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import httpx
from fastapi.testclient import TestClient

from broker.app import create_app
from broker.index import ingest
from broker.settings import Settings
from tests.dicomweb.data import multipart_body
from tests.identity.test_mllp_serve import scanonce_serve
from tests.peers import _stop
from tests.support import auth_headers, make_ds, to_bytes


def test_the_pool_is_running_once_the_app_has_started(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, mllp_port=0, ingest_processes=1)
    try:
        with TestClient(create_app(settings), headers=auth_headers()) as client:
            pool = ingest._PARSE_POOL
            assert pool is not None, "no parse pool after startup: the first STOW-RS would start it"
            workers = list(pool._processes.values())  # noqa: SLF001 - what a request would wait for
            assert len(workers) == 1 and all(w.is_alive() for w in workers)
            study = "1.2.826.0.1.3680043.8.498.92"
            body, ctype = multipart_body(
                [to_bytes(make_ds(sop=study + ".1.1", study=study, series=study + ".1"))]
            )
            r = client.post("/dicom-web/studies", content=body, headers={"Content-Type": ctype})
            assert r.status_code == 200, r.text
            assert ingest._PARSE_POOL is pool  # the request used the started pool
        # Shut down with the app: its worker processes are gone.
        assert ingest._PARSE_POOL is None
        assert not any(w.is_alive() for w in workers)
    finally:
        ingest.configure_parsing(processes=0)


def test_serve_shuts_the_pool_down_without_leaking_semaphores(tmp_path: Path) -> None:
    backend = SimpleNamespace(
        database_url=f"sqlite:///{tmp_path / 'index.db'}", storage_url=f"file://{tmp_path / 'objects'}"
    )
    study = "1.2.826.0.1.3680043.8.498.93"
    body, ctype = multipart_body([to_bytes(make_ds(sop=study + ".1.1", study=study, series=study + ".1"))])
    with scanonce_serve(
        tmp_path / "serve", backend, SCANONCE_MLLP_PORT="0", SCANONCE_INGEST_PROCESSES="2"
    ) as served:
        r = httpx.post(
            f"{served.url}/dicom-web/studies",
            content=body,
            headers={"Content-Type": ctype, **auth_headers()},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        _stop(served.proc)  # SIGTERM
    # Python's resource tracker, a process of its own, reports leaks once the server has exited.
    time.sleep(2)
    log = served.log.read_text(errors="replace")
    assert "Application shutdown complete" in log
    assert "leaked semaphore" not in log, log[-2000:]
