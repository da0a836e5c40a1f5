"""A study the broker knows only from a facility's index (NEARLINE): opening it in the viewer
says what is happening while the broker fetches it, then shows it; a facility that is down
gets a page naming it and why, not a viewer that waits forever."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from playwright.sync_api import Page
from pydicom.uid import generate_uid

from broker.web import assets
from tests.dicomweb.data import TEST_FILES
from tests.peers import OrthancPeer, orthanc
from tests.support import auth_headers, to_bytes

from .conftest import Broker, Visit
from .test_lookup_page import AXE_TAGS
from .test_viewer import _rendered


def _new_study(name: str) -> tuple[str, bytes]:
    ds = pydicom.dcmread(TEST_FILES / name)
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return str(ds.StudyInstanceUID), to_bytes(ds)


@pytest.fixture(scope="module")
def northgen(
    broker: Broker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[OrthancPeer, list[str]]]:
    """An archive holding two studies, indexed (not fetched) by the broker as facility `northgen`."""
    with orthanc(tmp_path_factory.mktemp("northgen"), aet="NORTHGEN") as peer:
        uids = []
        for name in ("CT_small.dcm", "MR_small.dcm"):
            uid, data = _new_study(name)
            httpx.post(f"{peer.url}/instances", content=data, trust_env=False, timeout=30).raise_for_status()
            uids.append(uid)
        with httpx.Client(base_url=broker.url, trust_env=False, timeout=30, headers=auth_headers()) as http:
            facility = {
                "id": "northgen",
                "issuer": "NORTH-GENERAL",
                "name": "North General",
                "dicomweb_url": peer.dicomweb_url,
                "sharing_policy": "index_only",
            }
            assert http.post("/api/facilities", json=facility).status_code == 201
            job = http.post("/api/facilities/northgen/sync").json()["job_id"]
            deadline = time.monotonic() + 30
            while http.get(f"/api/jobs/{job}").json()["status"] != "done":
                assert time.monotonic() < deadline, http.get(f"/api/jobs/{job}").json()
                time.sleep(0.1)
            for uid in uids:
                found = http.get("/dicom-web/studies", params={"StudyInstanceUID": uid}).json()
                assert found[0]["00080056"]["Value"] == ["NEARLINE"]
        yield peer, uids


def _sync(broker: Broker, facility: dict[str, str]) -> None:
    with httpx.Client(base_url=broker.url, trust_env=False, timeout=30, headers=auth_headers()) as http:
        assert http.post("/api/facilities", json=facility).status_code == 201
        job = http.post(f"/api/facilities/{facility['id']}/sync").json()["job_id"]
        deadline = time.monotonic() + 30
        while http.get(f"/api/jobs/{job}").json()["status"] != "done":
            assert time.monotonic() < deadline, http.get(f"/api/jobs/{job}").json()
            time.sleep(0.1)


@dataclass
class Gate:
    """An HTTP forwarder in front of an archive that holds the WADO-RS retrieve of a study in
    `held` until its event is set, then fails it (500) if it is in `failing`, as a slow or broken
    archive does; everything else (the sync's QIDO-RS) passes."""

    upstream: str
    url: str = ""
    held: dict[str, threading.Event] = field(default_factory=dict)
    failing: set[str] = field(default_factory=set)

    def hold(self, study: str) -> threading.Event:
        """Hold `study`'s retrieve until the returned event is set."""
        return self.held.setdefault(study, threading.Event())


@contextmanager
def gate_in_front_of(upstream: str) -> Iterator[Gate]:
    gate = Gate(upstream=upstream)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            study = self.path.split("?")[0].rstrip("/").rsplit("/studies/", 1)[-1]
            if (release := gate.held.get(study)) is not None:
                release.wait(120)
            if study in gate.failing:
                self.send_response(500)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            r = httpx.get(
                gate.upstream + self.path,
                headers={"Accept": self.headers.get("Accept", "*/*")},
                trust_env=False,
                timeout=60,
            )
            self.send_response(r.status_code)
            self.send_header("Content-Type", r.headers.get("content-type", "application/octet-stream"))
            self.send_header("Content-Length", str(len(r.content)))
            self.end_headers()
            self.wfile.write(r.content)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    gate.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield gate
    finally:
        for release in gate.held.values():
            release.set()
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def eastgen(broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gate, list[str]]]:
    """Two studies indexed (not fetched) from facility `eastgen`, whose archive is behind a gate."""
    with (
        orthanc(tmp_path_factory.mktemp("eastgen"), aet="EASTGEN") as peer,
        gate_in_front_of(peer.url) as gate,
    ):
        uids = []
        for name in ("CT_small.dcm", "CT_small.dcm"):
            uid, data = _new_study(name)
            httpx.post(f"{peer.url}/instances", content=data, trust_env=False, timeout=30).raise_for_status()
            uids.append(uid)
        facility = {
            "id": "eastgen",
            "issuer": "EAST-GENERAL",
            "name": "East General",
            "dicomweb_url": f"{gate.url}/dicom-web",
            "sharing_policy": "index_only",
        }
        _sync(broker, facility)
        yield gate, uids


@pytest.fixture(scope="module")
def axe_js(viewer_dir: Path) -> Path:
    (axe,) = (
        assets.install(root=viewer_dir, pin=pin)[0]
        for pin in assets.pins(Path(__file__).with_name("assets.lock")).values()
    )
    return axe / "axe.min.js"


def _axe_violations(page: Page, axe_js: Path) -> list[dict[str, Any]]:
    page.add_script_tag(path=str(axe_js))
    result = page.evaluate("tags => axe.run(document, {runOnly: {type: 'tag', values: tags}})", AXE_TAGS)
    assert len(result["passes"]) > 5  # axe ran its rules on this page
    return [{"id": v["id"], "nodes": [n["target"] for n in v["nodes"]][:5]} for v in result["violations"]]


def _polls(visit: Visit, url: str, at_least: int) -> int:
    """Wait until the page has asked for `url` `at_least` times after loading it; how many."""
    deadline = time.monotonic() + 30
    while (n := visit.requests.count(url) - 1) < at_least:
        assert time.monotonic() < deadline, f"the page asked {n} times in 30 s"
        visit.page.wait_for_timeout(200)
    return n


def test_the_wait_page_stays_put_while_fetching_then_opens_the_viewer(
    broker: Broker, eastgen: tuple[Gate, list[str]], visit: Visit, axe_js: Path
) -> None:
    """While the study is fetched the page asks the broker in the background (htmx) and never
    reloads itself (a meta refresh fails WCAG 2.2.1 and restarts a screen reader every time); once
    the study is here it moves on to the viewer."""
    gate, (uid, _failing) = eastgen
    release = gate.hold(uid)
    url = f"{broker.url}/viewer/viewer?StudyInstanceUIDs={uid}"
    page = visit.page
    response = page.goto(url)
    assert response is not None and response.status == 202
    page.evaluate("window.stillTheFirstLoad = true")
    assert _polls(visit, url, at_least=2) >= 2
    assert page.evaluate("window.stillTheFirstLoad") is True  # asked twice, not reloaded
    assert page.locator('meta[http-equiv="refresh"]').count() == 0
    status = page.locator('[role="status"][aria-live="polite"]')
    assert "Fetching from East General" in status.inner_text()
    assert page.get_by_role("link", name="Check again").count() == 1  # without JavaScript
    assert _axe_violations(page, axe_js) == []

    release.set()
    _rendered(visit)  # the viewer, showing the study
    assert visit.page.locator('[data-cy="study-browser-thumbnail"]').count() == 1
    assert page.evaluate("window.stillTheFirstLoad") is None  # a new page: the viewer's


def test_the_wait_page_says_a_failed_fetch_in_place(
    broker: Broker, eastgen: tuple[Gate, list[str]], visit: Visit, axe_js: Path
) -> None:
    """A fetch that fails while the page waits is said in its live region (read out politely),
    with the page not reloaded and no more polling; "Try again" starts a new fetch."""
    gate, (_fetched, uid) = eastgen
    gate.failing.add(uid)
    release = gate.hold(uid)  # failing at once could beat the page's first answer (then 503)
    url = f"{broker.url}/viewer/viewer?StudyInstanceUIDs={uid}"
    page = visit.page
    response = page.goto(url)
    assert response is not None and response.status == 202
    page.evaluate("window.stillTheFirstLoad = true")
    release.set()
    status = page.locator('[role="status"][aria-live="polite"]')
    status.get_by_text("Could not fetch the study from East General").wait_for(timeout=30_000)
    assert "500" in status.inner_text()  # the facility's answer
    assert page.title() == "Could not fetch the study · ScanOnce"  # the tab says it too
    assert page.evaluate("window.stillTheFirstLoad") is True
    asked = visit.requests.count(url)
    page.wait_for_timeout(4500)
    assert visit.requests.count(url) == asked  # polling stopped with the failure
    assert status.get_by_role("link", name="Try again").count() == 1
    assert _axe_violations(page, axe_js) == []


def test_opening_a_nearline_study_says_it_is_fetching_then_shows_it(
    broker: Broker, northgen: tuple[OrthancPeer, list[str]], visit: Visit
) -> None:
    _peer, (uid, _other) = northgen
    response = visit.page.goto(f"{broker.url}/viewer/viewer?StudyInstanceUIDs={uid}")
    assert response is not None and response.status == 202
    assert "Fetching from North General" in visit.page.content()
    # The page asks in the background until the study is here, and then it is the viewer.
    std, levels = _rendered(visit)
    assert visit.page.locator('[data-cy="study-browser-thumbnail"]').count() == 1
    found = httpx.get(
        f"{broker.url}/dicom-web/studies",
        params={"StudyInstanceUID": uid},
        trust_env=False,
        headers=auth_headers(),
    )
    assert found.json()[0]["00080056"]["Value"] == ["ONLINE"]


def test_a_study_withheld_from_the_caller_is_neither_fetched_nor_named(
    broker: Broker, northgen: tuple[OrthancPeer, list[str]]
) -> None:
    # A clinician with no treatment purpose sees only their own facility's studies (consent):
    # the viewer's page opens as for an unknown study, fetches nothing and names no facility.
    _peer, (_fetched, uid) = northgen
    headers = auth_headers("clinician", facility="local", purpose_of_use=None)
    r = httpx.get(f"{broker.url}/viewer/viewer?StudyInstanceUIDs={uid}", headers=headers, trust_env=False)
    assert r.status_code == 200 and "North General" not in r.text
    found = httpx.get(
        f"{broker.url}/dicom-web/studies",
        params={"StudyInstanceUID": uid},
        trust_env=False,
        headers=auth_headers(),
    )
    assert found.json()[0]["00080056"]["Value"] == ["NEARLINE"]


def test_a_facility_that_is_down_is_named_with_the_reason(
    broker: Broker, northgen: tuple[OrthancPeer, list[str]]
) -> None:
    peer, (_fetched, uid) = northgen
    peer.process.terminate()
    peer.process.wait(timeout=30)
    url = f"{broker.url}/viewer/viewer?StudyInstanceUIDs={uid}"
    with httpx.Client(trust_env=False, timeout=30, headers=auth_headers()) as http:

        def visit() -> httpx.Response:
            """The page until the fetch it started has ended: 202 while fetching, then its outcome."""
            r = http.get(url)
            deadline = time.monotonic() + 30
            while r.status_code == 202 and time.monotonic() < deadline:
                assert "Fetching from North General" in r.text
                time.sleep(0.2)
                r = http.get(url)
            return r

        r = visit()
        assert r.status_code == 503, r.text
        assert "Could not fetch the study from North General" in r.text
        assert "Try again" in r.text
        # Still held only at the facility: a later visit tries again and fails again (503), rather
        # than showing the viewer.
        r = visit()
        assert r.status_code == 503, r.text
        assert "Could not fetch the study from North General" in r.text


def test_a_study_its_facility_sends_in_part_is_not_opened_as_if_whole(
    broker: Broker, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """An instance missing from what the facility sends: the page says how many are missing and
    from where, instead of a viewer showing part of the study as if it were all of it; opening it
    again soon says so again without fetching the whole study again."""
    with orthanc(tmp_path_factory.mktemp("southgen"), aet="SOUTHGEN") as peer:
        first = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
        first.StudyInstanceUID, first.SeriesInstanceUID = generate_uid(), generate_uid()
        sops = [generate_uid(), generate_uid()]
        for sop in sops:
            first.SOPInstanceUID = first.file_meta.MediaStorageSOPInstanceUID = sop
            httpx.post(f"{peer.url}/instances", content=to_bytes(first), trust_env=False, timeout=30)
        facility = {
            "id": "southgen",
            "issuer": "SOUTH-GENERAL",
            "name": "South General",
            "dicomweb_url": peer.dicomweb_url,
            "sharing_policy": "index_only",
        }
        _sync(broker, facility)
        # Lost at the facility after its index listed two instances.
        (gone,) = httpx.post(f"{peer.url}/tools/lookup", content=sops[1], trust_env=False, timeout=10).json()
        httpx.delete(f"{peer.url}/instances/{gone['ID']}", trust_env=False, timeout=10).raise_for_status()
        url = f"{broker.url}/viewer/viewer?StudyInstanceUIDs={first.StudyInstanceUID}"
        with httpx.Client(trust_env=False, timeout=30, headers=auth_headers()) as http:
            for _visit in range(2):
                r = http.get(url)
                deadline = time.monotonic() + 30
                while r.status_code == 202 and time.monotonic() < deadline:
                    time.sleep(0.2)
                    r = http.get(url)
                assert r.status_code == 503, r.text
                assert "Could not fetch the study from South General" in r.text
                assert "1 of 2 instances of the study are missing from facility &#39;southgen&#39;" in r.text
            assert "could not store them" in r.text  # the second answer: from what the broker knows
