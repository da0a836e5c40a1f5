"""The OHIF Viewer served by the broker renders the broker's studies in a real browser."""

from __future__ import annotations

import time

import httpx

from tests.support import auth_headers

from .conftest import Broker, Visit, screenshot_stats


def _open_study(visit: Visit, broker: Broker, study_uid: str) -> None:
    page = visit.page
    response = page.goto(f"{broker.url}/viewer/viewer?StudyInstanceUIDs={study_uid}")
    assert response is not None and response.status == 200


def _rendered(visit: Visit) -> tuple[float, int]:
    """Wait until the first viewport shows an image that is not uniform; its stats."""
    viewport = visit.page.locator(".cornerstone-viewport-element").first
    viewport.wait_for(state="visible", timeout=30_000)
    deadline = time.monotonic() + 30
    stats = (0.0, 0)
    while time.monotonic() < deadline:
        stats = screenshot_stats(viewport.screenshot())
        if stats[0] > 5 and stats[1] > 64:  # an image, not a spinner on black
            return stats
        time.sleep(0.25)
    raise AssertionError(f"the viewport stayed uniform: std {stats[0]:.1f}, {stats[1]} grey levels")


def test_viewer_renders_a_two_series_study(broker: Broker, visit: Visit) -> None:
    _open_study(visit, broker, broker.studies.mr)
    std, levels = _rendered(visit)
    thumbnails = visit.page.locator('[data-cy="study-browser-thumbnail"]')
    thumbnails.nth(broker.studies.mr_series - 1).wait_for(timeout=20_000)
    assert thumbnails.count() == broker.studies.mr_series
    assert visit.left_loopback() == []
    assert visit.page.evaluate("crossOriginIsolated")  # SharedArrayBuffer, for 3D and MPR
    # What the viewer asked of the broker's DICOMweb (its own origin, no CORS needed).
    assert any(u.startswith(f"{broker.url}/dicom-web/studies") for u in visit.requests)


def test_viewer_renders_a_ct(broker: Broker, visit: Visit) -> None:
    _open_study(visit, broker, broker.studies.ct)
    _rendered(visit)
    assert visit.page.locator('[data-cy="study-browser-thumbnail"]').count() == 1


def test_app_config_names_the_brokers_own_dicomweb(broker: Broker) -> None:
    r = httpx.get(f"{broker.url}/viewer/app-config.js", trust_env=False, headers=auth_headers())
    assert r.status_code == 200
    assert "window.location.origin" in r.text and '"/dicom-web"' in r.text
    assert "cloudfront" not in r.text  # the package's own config points at a public demo server


def test_study_list_lists_the_brokers_studies(broker: Broker, visit: Visit) -> None:
    studies = httpx.get(f"{broker.url}/dicom-web/studies", trust_env=False, headers=auth_headers()).json()
    response = visit.page.goto(f"{broker.url}/viewer/")
    assert response is not None and response.status == 200
    visit.page.get_by_text(f"1-{len(studies)} of {len(studies)}").wait_for(timeout=20_000)
    for modality in ("CT", "MR"):  # pydicom's CT_small and MR_small
        visit.page.get_by_text(modality, exact=True).first.wait_for(timeout=5_000)
    assert visit.left_loopback() == []


def test_a_path_outside_the_viewer_is_not_served(broker: Broker) -> None:
    r = httpx.get(
        f"{broker.url}/viewer/..%2F..%2F..%2F..%2Fetc%2Fpasswd", trust_env=False, headers=auth_headers()
    )
    assert "root:" not in r.text
