"""A broker started as `scanonce serve` with a few studies, the pinned browser assets, and Debian's
headless Chromium driven by Playwright (it cannot download browsers here)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pydicom
import pytest
from playwright.sync_api import Browser, Page, sync_playwright
from pydicom.uid import generate_uid

from broker.errors import ScanOnceError
from broker.settings import Settings
from broker.web import assets
from tests.dicomweb.data import TEST_FILES, multipart_body
from tests.identity.test_mllp_serve import Served, scanonce_serve
from tests.support import auth_headers, to_bytes

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


@pytest.fixture(scope="session")
def viewer_dir() -> Path:
    """The pinned assets, installed as the README's set-up does. Not installable: the tests fail
    (CI runs the set-up, so a missing viewer is a broken set-up, not a reason to skip)."""
    root = Settings().resolved_viewer_dir()
    try:
        for pin in assets.pins().values():
            assets.install(root=root, pin=pin)
    except ScanOnceError as exc:
        pytest.fail(f"the viewer's assets could not be installed in {root}: {exc.message}", pytrace=False)
    return root


@dataclass(frozen=True)
class Studies:
    ct: str  # one series
    mr: str  # two series
    mr_series: int = 2


def _studies() -> tuple[Studies, list[bytes]]:
    ct = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    mr = pydicom.dcmread(TEST_FILES / "MR_small.dcm")
    second = pydicom.dcmread(TEST_FILES / "MR_small.dcm")
    second.SeriesInstanceUID = generate_uid()
    second.SOPInstanceUID = second.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    second.SeriesNumber = 2
    second.SeriesDescription = "second series"
    parts = [to_bytes(ds) for ds in (ct, mr, second)]
    return Studies(ct=str(ct.StudyInstanceUID), mr=str(mr.StudyInstanceUID)), parts


@dataclass(frozen=True)
class Broker:
    url: str
    studies: Studies
    served: Served


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory, viewer_dir: Path) -> Iterator[Broker]:
    tmp = tmp_path_factory.mktemp("web")
    backend = SimpleNamespace(
        database_url=f"sqlite:///{tmp / 'index.sqlite3'}", storage_url=(tmp / "objects").as_uri()
    )
    studies, parts = _studies()
    body, content_type = multipart_body(parts)
    with scanonce_serve(
        # COLUMNS: a narrow terminal, where a banner that wraps would break its URLs.
        tmp / "serve",
        backend,
        SCANONCE_MLLP_PORT="0",
        SCANONCE_VIEWER_DIR=str(viewer_dir),
        COLUMNS="40",
    ) as served:
        r = httpx.post(
            f"{served.url}/dicom-web/studies",
            content=body,
            headers={"Content-Type": content_type, **auth_headers()},
            trust_env=False,
            timeout=60,
        )
        assert r.status_code == 200, r.text
        yield Broker(url=served.url, studies=studies, served=served)


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: the README's test set-up installs Debian's chromium")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@dataclass
class Visit:
    page: Page
    requests: list[str]  # every URL the page asked for

    def left_loopback(self) -> list[str]:
        return [u for u in self.requests if not u.startswith(("http://127.0.0.1:", "data:", "blob:"))]


@pytest.fixture
def visit(browser: Browser) -> Iterator[Visit]:
    """A fresh page (its own storage) that records every request it makes. OHIF's first-visit
    tour and investigational-use notice are marked as seen, as a returning user has them."""
    context = browser.new_context(viewport={"width": 1280, "height": 800}, extra_http_headers=auth_headers())
    context.add_init_script(
        "localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']));"
        "sessionStorage.setItem('investigationalUseDialog', 'hidden');"
    )
    requests: list[str] = []
    page = context.new_page()
    page.on("request", lambda request: requests.append(request.url))
    try:
        yield Visit(page=page, requests=requests)
    finally:
        context.close()


def screenshot_stats(png: bytes) -> Any:
    """(standard deviation, distinct grey levels) of the middle half of a screenshot."""
    import numpy as np
    from PIL import Image

    grey = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=float)
    h, w = grey.shape
    middle = grey[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4]
    return float(middle.std()), len(np.unique(middle))
