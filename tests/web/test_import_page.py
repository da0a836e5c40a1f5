"""The radiologist's import page in Debian's Chromium over `scanonce serve`: the dry-run diff shown
before confirming, then the import running in the server's job worker into a real Orthanc, its
progress on the page."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from playwright.sync_api import Browser, expect

from broker.app import build_state
from broker.settings import Settings
from tests.identity.test_mllp_serve import scanonce_serve
from tests.imports.conftest import (
    LOCAL_MRN,
    MINE,
    add_destination,
    ingest_outside,
    pacs_instances,
    register_local_patient,
)
from tests.peers import orthanc
from tests.support import auth_headers


def test_import_page_shows_the_diff_then_imports(tmp_path: Path, browser: Browser) -> None:
    backend = SimpleNamespace(
        database_url=f"sqlite:///{tmp_path / 'index.sqlite3'}", storage_url=(tmp_path / "objects").as_uri()
    )
    with orthanc(
        tmp_path / "pacs", aet="MYPACS", modalities={"scanonce": ["SCANONCE", "127.0.0.1", 104]}
    ) as pacs:
        state = build_state(
            Settings(
                data_dir=tmp_path / "seed",
                database_url=backend.database_url,
                storage_url=backend.storage_url,
                mllp_port=0,
            )
        )
        add_destination(state, pacs)
        (tmp_path / "src").mkdir()
        study = ingest_outside(state, tmp_path / "src")
        register_local_patient(state)
        state.engine.dispose()
        with scanonce_serve(tmp_path / "serve", backend, SCANONCE_MLLP_PORT="0") as served:
            page = browser.new_page(extra_http_headers=auth_headers("radiologist"))
            page.goto(f"{served.url}/imports?study={study.study_uid}&facility={MINE}")
            diff = page.locator("table.diff").first
            expect(diff).to_contain_text("PatientID")
            expect(diff).to_contain_text(LOCAL_MRN)
            assert pacs_instances(pacs) == []  # the preview sent nothing
            page.get_by_role("button", name="Import").click()
            row = page.locator("table.imports tbody tr").first
            expect(row.locator(".status")).to_have_text("done", timeout=30_000)
            expect(row).to_contain_text("5/5")
            # Nothing runs now: the list stays put (no reload, no poll closing what the reader opened).
            expect(page.locator("#imports")).not_to_have_attribute("hx-trigger", "every 2s")
            assert page.locator('meta[http-equiv="refresh"]').count() == 0
            page.close()
        assert {d.PatientID for d in pacs_instances(pacs)} == {LOCAL_MRN}
