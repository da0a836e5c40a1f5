""" "Compare in viewer" in Debian's Chromium over `scanonce serve`: from the radiologist's lookup, an
outside prior opens beside the patient's most recent local study in the bundled OHIF viewer (both
study UIDs in the viewer URL, current first, OHIF's compare hanging protocol), and the viewer
really loads both studies from the broker's DICOMweb."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import parse_qs, urlparse

import httpx
import pydicom
import pytest
from playwright.sync_api import Browser, Request
from pydicom.uid import generate_uid
from sqlmodel import Session

from broker.app import build_state
from broker.db import session_scope
from broker.facilities import service as facilities
from broker.identity import matching
from broker.identity import service as identity
from broker.identity.schemas import Identifier
from broker.index import service as index
from broker.settings import Settings
from tests.dicomweb.data import TEST_FILES
from tests.identity.test_mllp_serve import Served, scanonce_serve
from tests.support import ADMIN, auth_headers

from .conftest import screenshot_stats

MINE, MINE_ISSUER, OUTSIDE, OUTSIDE_ISSUER = "mine", "MYPACS", "outside", "OUTHOSP"


@dataclass(frozen=True)
class Compared:
    served: Served
    outside: str  # the outside prior (CT)
    older_local: str  # a local study of the same patient, not the most recent
    today: str  # the most recent local study (MR)


def _copy(name: str, tmp: Path, *, pid: str, issuer: str, date: str, tag: str) -> tuple[str, str]:
    """A copy of one of pydicom's small test images as a study of our patient; (path, study UID)."""
    ds = pydicom.dcmread(TEST_FILES / name)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PatientID, ds.IssuerOfPatientID, ds.PatientName = pid, issuer, "SMITH^ANNA"
    ds.PatientBirthDate, ds.StudyDate, ds.StudyTime = "19800101", date, "090000"
    ds.StudyDescription = f"{ds.Modality} HEAD"  # relevant to the planned CT head: shown open
    path = tmp / f"{tag}.dcm"
    ds.save_as(path)
    return str(path), str(ds.StudyInstanceUID)


@pytest.fixture(scope="module")
def compared(tmp_path_factory: pytest.TempPathFactory, viewer_dir: Path) -> Iterator[Compared]:
    tmp = tmp_path_factory.mktemp("compare")
    backend = SimpleNamespace(
        database_url=f"sqlite:///{tmp / 'index.sqlite3'}", storage_url=(tmp / "objects").as_uri()
    )
    state = build_state(
        Settings(data_dir=tmp / "seed", database_url=backend.database_url,
                 storage_url=backend.storage_url, mllp_port=0)
    )  # fmt: skip
    with Session(state.engine) as session:
        facilities.add_facility(session=session, principal=ADMIN, facility_id=MINE, issuer=MINE_ISSUER)
        facilities.add_facility(session=session, principal=ADMIN, facility_id=OUTSIDE, issuer=OUTSIDE_ISSUER)
    with session_scope(state.engine) as session:  # the local registration names the outside ID
        identity.upsert_record(
            session=session, identifier=Identifier(MINE_ISSUER, "M-123"),
            demographics=matching.Demographics(family="SMITH", given="ANNA", birth_date="19800101"),
            identifiers=[Identifier(OUTSIDE_ISSUER, "P1")], facility_id=MINE, source="hl7",
        )  # fmt: skip
    outside_path, outside = _copy("CT_small.dcm", tmp, pid="P1", issuer=OUTSIDE_ISSUER, date="20240110",
                                  tag="outside-ct")  # fmt: skip
    older_path, older = _copy("MR_small.dcm", tmp, pid="M-123", issuer=MINE_ISSUER, date="20230501",
                              tag="older-mr")  # fmt: skip
    today_path, today = _copy("MR_small.dcm", tmp, pid="M-123", issuer=MINE_ISSUER, date="20250301",
                              tag="today-mr")  # fmt: skip
    for facility, path in ((OUTSIDE, outside_path), (MINE, older_path), (MINE, today_path)):
        outcomes = index.ingest_files(
            engine=state.engine, store=state.store, principal=ADMIN, facility_id=facility, paths=[path]
        )
        assert all(o.status != "failed" for o in outcomes), outcomes
    state.engine.dispose()
    with scanonce_serve(
        tmp / "serve", backend, SCANONCE_MLLP_PORT="0", SCANONCE_VIEWER_DIR=str(viewer_dir)
    ) as served:
        yield Compared(served, outside, older, today)


def _lookup_url(c: Compared) -> str:
    return f"{c.served.url}/?facility={MINE}&mrn=M-123&exam=CT+head"


def test_compare_opens_todays_local_study_beside_the_outside_prior(
    compared: Compared, browser: Browser
) -> None:
    context = browser.new_context(
        viewport={"width": 1280, "height": 800}, extra_http_headers=auth_headers("radiologist")
    )
    context.add_init_script(
        "localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']));"
        "sessionStorage.setItem('investigationalUseDialog', 'hidden');"
    )
    everything: list[Request] = []
    lookup_asked: set[int] = set()  # the lookup page's own (its thumbnails), left out below
    context.on("request", lambda r: everything.append(r))
    try:
        page = context.new_page()
        page.on("request", lambda r: lookup_asked.add(id(r)))
        page.goto(_lookup_url(compared))
        card = page.locator(f'li.prior[data-study="{compared.outside}"]')
        link = card.get_by_role("link", name=re.compile("Compare in viewer"))
        # Local studies get no compare link of their own: they are today's side.
        assert page.locator(f'li.prior[data-study="{compared.today}"] a.compare').count() == 0
        with context.expect_page() as opened:
            link.click()
        viewer = opened.value
        viewer.wait_for_load_state()
        query = parse_qs(urlparse(viewer.url).query)
        assert query["StudyInstanceUIDs"] == [f"{compared.today},{compared.outside}"]  # current first
        assert query["hangingProtocolId"] == ["@ohif/hpCompare"]
        # The viewer asks the broker's DICOMweb for both studies' series and metadata.
        deadline = time.monotonic() + 60

        def viewer_asked() -> list[str]:
            return [r.url for r in list(everything) if id(r) not in lookup_asked]

        wanted = {compared.today, compared.outside}
        asked: set[str] = set()
        while time.monotonic() < deadline and asked != wanted:
            asked = {u for u in wanted for r in viewer_asked() if f"/dicom-web/studies/{u}/series" in r}
            viewer.wait_for_timeout(250)
        assert asked == wanted, [r for r in viewer_asked() if "/dicom-web/" in r]
        assert not any(f"/dicom-web/studies/{compared.older_local}/" in r for r in viewer_asked())
        # Side by side: at least two viewports, each showing an image (not a uniform spinner).
        viewports = viewer.locator(".cornerstone-viewport-element")
        viewports.nth(1).wait_for(state="visible", timeout=30_000)
        for k in range(2):
            _rendered(viewports.nth(k))
    finally:
        context.close()


def _rendered(viewport: object) -> None:
    deadline = time.monotonic() + 30
    stats = (0.0, 0)
    while time.monotonic() < deadline:
        stats = screenshot_stats(viewport.screenshot())  # type: ignore[attr-defined]
        if stats[0] > 5 and stats[1] > 64:
            return
        time.sleep(0.25)
    raise AssertionError(f"a viewport stayed uniform: std {stats[0]:.1f}, {stats[1]} grey levels")


def test_compare_names_the_local_study_when_the_page_passes_one(compared: Compared) -> None:
    rsp = httpx.get(
        f"{compared.served.url}/compare",
        params={"study": compared.outside, "local": compared.older_local},
        headers=auth_headers("radiologist"), trust_env=False, follow_redirects=False,
    )  # fmt: skip
    assert rsp.status_code == 303
    query = parse_qs(urlparse(rsp.headers["location"]).query)
    assert query["StudyInstanceUIDs"] == [f"{compared.older_local},{compared.outside}"]


def test_compare_without_a_local_study_says_so(compared: Compared) -> None:
    h = auth_headers("radiologist")
    rsp = httpx.get(f"{compared.served.url}/compare", params={"study": compared.outside,
                    "facility": OUTSIDE}, headers=h, trust_env=False)  # fmt: skip
    # The outside facility holds nothing else of this patient: a clear page, no viewer.
    assert rsp.status_code == 404 and "no study of this patient" in rsp.text
    rsp = httpx.get(f"{compared.served.url}/compare", params={"study": "1.2.3.404", "facility": MINE},
                    headers=h, trust_env=False)  # fmt: skip
    assert rsp.status_code == 404 and "no study 1.2.3.404" in rsp.text
