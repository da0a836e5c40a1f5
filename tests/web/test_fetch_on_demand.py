"""A study the broker knows only from a facility's index (NEARLINE): opening it in the viewer
says what is happening while the broker fetches it, then shows it; a facility that is down
gets a page naming it and why, not a viewer that waits forever."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pydicom
import pytest
from pydicom.uid import generate_uid

from tests.dicomweb.data import TEST_FILES
from tests.peers import OrthancPeer, orthanc
from tests.support import auth_headers, to_bytes

from .conftest import Broker, Visit
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


def test_opening_a_nearline_study_says_it_is_fetching_then_shows_it(
    broker: Broker, northgen: tuple[OrthancPeer, list[str]], visit: Visit
) -> None:
    _peer, (uid, _other) = northgen
    response = visit.page.goto(f"{broker.url}/viewer/viewer?StudyInstanceUIDs={uid}")
    assert response is not None and response.status == 202
    assert "Fetching from North General" in visit.page.content()
    # The page reloads itself until the study is here, and then it is the viewer.
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
