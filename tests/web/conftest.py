"""A broker started as `scanonce serve` with a few studies, the pinned browser assets, and Debian's
headless Chromium driven by Playwright (it cannot download browsers here)."""

from __future__ import annotations

import io
import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pydicom
import pytest
import uvicorn
from fastapi import FastAPI
from playwright.sync_api import Browser, Page, sync_playwright
from pydicom.uid import generate_uid

from broker.errors import ScanOnceError
from broker.settings import Settings
from broker.web import assets
from tests.dicomweb.data import TEST_FILES, multipart_body
from tests.identity.test_mllp_serve import Served, scanonce_serve
from tests.peers import _stop
from tests.support import auth_headers, to_bytes

ROOT = Path(__file__).resolve().parents[2]
OIDC_DIR = ROOT / ".cache" / "oidc-provider"
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


@dataclass(frozen=True)
class NodePeer:
    """A node script of tests/security/oidc (an OpenID provider, a SMART EHR) started for a
    broker that is not serving yet: `sock` is the broker's bound socket, `origin` its URL."""

    sock: socket.socket
    origin: str
    urls: dict[str, str]  # what the script printed on its first line (its issuer, ...)


@contextmanager
def node_peer(script: str, redirect_path: str) -> Iterator[NodePeer]:
    """Start `script` (npm's oidc-provider underneath) with the broker's callback URL, which it
    must know before the broker starts: so the broker's port is taken here first."""
    if not (OIDC_DIR / "node_modules" / "oidc-provider").is_dir():
        pytest.fail("oidc-provider is not installed: ./scripts/test installs it into .cache/oidc-provider")
    shutil.copy(ROOT / "tests" / "security" / "oidc" / script, OIDC_DIR / script)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    origin = f"http://127.0.0.1:{sock.getsockname()[1]}"
    node = subprocess.Popen(
        ["node", str(OIDC_DIR / script)],
        env={"PATH": "/usr/bin:/bin", "REDIRECT_URI": f"{origin}{redirect_path}"},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        assert node.stdout is not None
        yield NodePeer(sock=sock, origin=origin, urls=json.loads(node.stdout.readline()))
    finally:
        _stop(node)
        sock.close()


@contextmanager
def serving(app: FastAPI, sock: socket.socket) -> Iterator[None]:
    """Serve `app` on `sock` in a thread of this process until the block ends."""
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield
    finally:
        server.should_exit = True
        thread.join(10)
