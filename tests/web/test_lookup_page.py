"""The clinician's lookup page, the imaging record and the admin pages in Debian's Chromium,
over `scanonce serve` with the demo data: the whole flow by keyboard, with and without
JavaScript, at phone and desktop widths; axe-core on every page; hostile input shown escaped;
the record printed to PDF; a review decision that changes the lookup.

Seed 42 (the demo default): the child K346295 of the children's hospital had a CT abdomen/pelvis
at St Mary's on 2026-06-16; the page judges as of 2026-06-25 ("9 days ago", in the ED window).

Set SCANONCE_SCREENSHOTS=1 to refresh the README's screenshots (docs/screenshots/) from the run.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pydicom
import pytest
from playwright.sync_api import Browser, Page, expect
from pydicom.uid import generate_uid
from sqlalchemy import create_engine
from sqlmodel import Session, select

from broker.app import build_state
from broker.demo.service import load_demo
from broker.errors import ScanOnceError
from broker.identity.models import IdentityRecord, ReviewItem
from broker.imports.models import ImportJob
from broker.jobs.models import Job
from broker.settings import Settings
from broker.web import assets
from tests.dicomweb.data import TEST_FILES
from tests.identity.test_mllp_serve import scanonce_serve
from tests.live_demo import the_child_and_a_stranger
from tests.peers import orthanc
from tests.support import auth_headers

from .test_viewer import _rendered

CHILD = ("kids", "K346295")
AS_OF = "2026-06-25"
EXAM = "CT abdomen pelvis"
ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "docs" / "screenshots"
AXE_TAGS = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]


@dataclass(frozen=True)
class Demo:
    url: str
    database_url: str
    axe: Path
    shots: Path

    def lookup_url(self, **params: str) -> str:
        query = {"facility": CHILD[0], "mrn": CHILD[1], "exam": EXAM, "setting": "ed", "now": AS_OF} | params
        return f"{self.url}/?{httpx.QueryParams(query)}"


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory, viewer_dir: Path) -> Iterator[Demo]:
    tmp = tmp_path_factory.mktemp("lookup-page")
    backend = SimpleNamespace(
        database_url=f"sqlite:///{tmp / 'index.sqlite3'}", storage_url=(tmp / "objects").as_uri()
    )
    state = build_state(
        Settings(data_dir=tmp, database_url=backend.database_url, storage_url=backend.storage_url)
    )
    load_demo(engine=state.engine, store=state.store)
    state.engine.dispose()
    try:
        (axe,) = (
            assets.install(root=viewer_dir, pin=pin)[0]
            for pin in assets.pins(Path(__file__).with_name("assets.lock")).values()
        )
    except ScanOnceError as exc:
        pytest.fail(f"axe-core could not be installed: {exc.message}", pytrace=False)
    shots = SCREENSHOTS if os.environ.get("SCANONCE_SCREENSHOTS") else tmp / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    with scanonce_serve(
        tmp / "serve", backend, SCANONCE_MLLP_PORT="0", SCANONCE_VIEWER_DIR=str(viewer_dir)
    ) as s:
        yield Demo(url=s.url, database_url=backend.database_url, axe=axe / "axe.min.js", shots=shots)


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900}, extra_http_headers=auth_headers())
    context.add_init_script(
        "localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']));"
        "sessionStorage.setItem('investigationalUseDialog', 'hidden');"
    )
    try:
        yield context.new_page()
    finally:
        context.close()


def _axe(page: Page, demo: Demo) -> list[dict[str, Any]]:
    """axe-core's WCAG 2.1 A/AA violations of the page as it is now."""
    page.add_script_tag(path=str(demo.axe))
    result = page.evaluate("tags => axe.run(document, {runOnly: {type: 'tag', values: tags}})", AXE_TAGS)
    assert len(result["passes"]) > 10  # axe ran its rules on this page
    return [
        {"id": v["id"], "impact": v["impact"], "nodes": [n["target"] for n in v["nodes"]][:5]}
        for v in result["violations"]
    ]


def _avoided_count(page: Page) -> int:
    text = page.locator("#avoided-count strong").inner_text()
    return int(text)


def _tab_to(page: Page, selector: str, limit: int = 40) -> None:
    for _ in range(limit):
        page.keyboard.press("Tab")
        if page.evaluate("s => !!document.activeElement && document.activeElement.matches(s)", selector):
            return
    raise AssertionError(f"{selector} cannot be reached with the Tab key")


def test_whole_flow_by_keyboard(demo: Demo, page: Page) -> None:
    """Search the demo child by MRN, plan a CT abdomen pelvis in the ED, see the relevant prior
    first with reasons, dose and the window warning; use it; the avoided-repeat count goes up."""
    page.goto(f"{demo.url}/")
    _tab_to(page, "#facility")
    page.keyboard.type("Children")  # a select picks its option by typing
    _tab_to(page, "#mrn")
    page.keyboard.type(CHILD[1])
    _tab_to(page, "#exam")
    page.keyboard.type(EXAM)
    _tab_to(page, "#setting")
    page.keyboard.type("Emergency")
    page.evaluate(f"document.getElementById('now').value = '{AS_OF}'")  # a date input's keys vary by locale
    _tab_to(page, "form.lookup button[type=submit]")
    page.keyboard.press("Enter")  # submits the form (htmx swaps the answer in)
    first = page.locator("ol.relevant > li").first
    expect(first).to_contain_text("9 days ago", timeout=10_000)
    expect(first).to_contain_text("St Mary")
    expect(first.locator(".why")).to_contain_text("ABDOMEN")
    expect(first.locator(".dose")).to_contain_text(re.compile(r"DLP \d+ mGy·cm .* \d+(\.\d+)? mSv"))
    expect(first.locator(".badge.warn")).to_contain_text("30-day window")
    expect(page.locator("#warning")).to_contain_text("9 days")
    assert "now=2026-06-25" in page.url  # the answer is a bookmarkable URL
    # Not relevant studies are there, collapsed.
    others = page.locator("details.others")
    expect(others).to_be_visible()
    assert not others.evaluate("d => d.open")
    page.screenshot(path=str(demo.shots / "lookup.png"), full_page=True)

    before = _avoided_count(page)
    button = first.get_by_role("button", name="Use this prior instead of a new exam")
    button.focus()
    page.keyboard.press("Enter")
    expect(first.locator(".notice")).to_contain_text("Recorded", timeout=10_000)
    # The button is gone: the keyboard is on its confirmation, not thrown back to the page's top.
    expect(first.locator(".notice")).to_be_focused()
    assert _avoided_count(page) == before + 1
    months = httpx.get(
        f"{demo.url}/api/metrics/avoided",
        params={"facility": "kids"},
        trust_env=False,
        headers=auth_headers(),
    ).json()
    assert sum(m["repeats_avoided"] for m in months) == before + 1


def test_lookup_without_javascript(demo: Demo, browser: Browser) -> None:
    context = browser.new_context(
        java_script_enabled=False, viewport={"width": 375, "height": 800}, extra_http_headers=auth_headers()
    )
    try:
        page = context.new_page()
        page.goto(f"{demo.url}/")
        page.select_option("#facility", CHILD[0])
        page.fill("#mrn", CHILD[1])
        page.fill("#exam", EXAM)
        page.select_option("#setting", "ed")
        page.locator("summary", has_text="Judge as of another date").click()
        page.fill("#now", AS_OF)
        page.get_by_role("button", name="Find priors").click()
        first = page.locator("ol.relevant > li").first
        expect(first).to_contain_text("9 days ago")
        assert page.url.endswith("#answer")  # a phone lands on the answer, not on the form
        page.screenshot(path=str(demo.shots / "lookup-375.png"), full_page=False)
        before = _avoided_count(page)
        first.get_by_role("button", name="Use this prior instead of a new exam").click()
        page.wait_for_url(re.compile(r"avoided="))  # back on the same lookup
        expect(page.locator("#answer .notice")).to_contain_text("Recorded")
        assert _avoided_count(page) == before + 1
        # A phone on the ward: nothing wider than the screen.
        assert page.evaluate("document.documentElement.scrollWidth") <= 375
    finally:
        context.close()


def test_demographic_search_lists_people_to_choose_from(demo: Demo, page: Page) -> None:
    with Session(create_engine(demo.database_url)) as session:
        rec = session.exec(select(IdentityRecord).where(IdentityRecord.value == CHILD[1])).one()
        family, birth = rec.family, rec.birth_date
    page.goto(f"{demo.url}/?{httpx.QueryParams({'family': family[:3], 'exam': EXAM, 'now': AS_OF})}")
    people = page.locator("ul.people > li")
    expect(people.first).to_be_visible()
    assert people.count() >= 1
    # Narrowed by birth date: the child, then the lookup from one of its identifiers.
    iso = f"{birth[:4]}-{birth[4:6]}-{birth[6:]}"
    page.goto(
        f"{demo.url}/?{httpx.QueryParams({'family': family, 'birthdate': iso, 'exam': EXAM, 'now': AS_OF})}"
    )
    page.locator("ul.people a", has_text=CHILD[1]).click()
    expect(page.locator("ol.relevant > li").first).to_contain_text("St Mary")


def test_bad_input_is_a_message_beside_its_field(demo: Demo, page: Page) -> None:
    page.goto(demo.lookup_url(mrn="NO-SUCH-MRN"))
    facilities = len(httpx.get(f"{demo.url}/api/facilities", trust_env=False, headers=auth_headers()).json())
    expect(page.locator("#answer")).to_contain_text(f"No studies found in {facilities} facilities")
    response = page.goto(demo.lookup_url(exam="!!! ???"))
    assert response is not None and response.status == 400
    expect(page.locator("#exam")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#exam-error")).to_be_visible()
    expect(page.locator("#exam")).to_be_focused()  # a link or a plain GET lands on the field too
    page.goto(demo.lookup_url(now="not-a-date"))
    expect(page.locator("#now-error")).to_contain_text("YYYY-MM-DD")
    # With htmx too: the 400's form comes back with the message beside the field.
    page.goto(demo.lookup_url())
    expect(page.locator("ol.relevant > li").first).to_be_visible()
    page.fill("#exam", "!!! ???")
    page.locator("#find").click()
    expect(page.locator("#exam-error")).to_be_visible()
    expect(page.locator("ol.relevant")).to_have_count(0)
    assert "exam=!!!" in page.url  # the pushed URL is the failed lookup, to correct or share
    # By keyboard: Enter on the button lands on the field to correct (its message is its
    # description, so a screen reader says it), with what was typed still there.
    page.fill("#exam", "??? !!!")
    page.locator("#find").press("Enter")
    expect(page.locator("#exam")).to_be_focused()
    expect(page.locator("#exam")).to_have_value("??? !!!")


def test_a_failed_lookup_says_so(demo: Demo, page: Page) -> None:
    """The broker answering 5xx to htmx (its database away: a 503 whose body is the API's JSON)
    is a message in the answer, not a button that seems to do nothing."""
    page.goto(demo.lookup_url())
    expect(page.locator("ol.relevant > li").first).to_be_visible()

    def unavailable(route: Any) -> None:
        if route.request.headers.get("hx-request") != "true":
            route.continue_()
            return
        body = '{"error": "Service unavailable", "detail": "the database is unreachable; try again shortly"}'
        route.fulfill(status=503, content_type="application/json", body=body)

    page.route(re.compile(r"/\?facility="), unavailable)
    page.locator("#find").click()
    expect(page.locator("#answer")).to_contain_text("could not answer", timeout=10_000)
    expect(page.locator("#answer")).not_to_contain_text("Service unavailable")  # no JSON shown
    expect(page.locator("#exam")).to_have_value(EXAM)  # what was typed stays


def test_lookup_by_procedure_code(demo: Demo, page: Page) -> None:
    page.goto(demo.lookup_url(exam="", code="74177", system="CPT"))
    expect(page.locator("#answer h2")).to_contain_text("CT abdomen")  # the code's label
    first = page.locator("ol.relevant > li").first
    expect(first).to_contain_text("9 days ago")
    expect(first.get_by_role("button", name="Use this prior instead of a new exam")).to_be_visible()


def test_hostile_strings_are_shown_escaped(demo: Demo, page: Page) -> None:
    hostile = '<img src=x onerror="window.pwned=1"><script>window.pwned=1</script>'
    for params in (
        {"exam": hostile},
        {"mrn": hostile},
        {"exam": f"CT abdomen pelvis {hostile}"},
        {"mrn": "", "family": hostile},
    ):
        page.goto(demo.lookup_url(**params))
        page.wait_for_load_state("load")
        assert page.evaluate("window.pwned") is None, params
        assert page.locator("main script, main img[src=x]").count() == 0, params
        if params.get("exam", "").startswith("CT"):  # read as a CT A/P: the text is shown, as text
            expect(page.locator("#answer h2")).to_contain_text("<script>")


def test_open_in_viewer_renders_the_prior(demo: Demo, page: Page) -> None:
    page.goto(demo.lookup_url())
    first = page.locator("ol.relevant > li").first
    study = first.get_attribute("data-study")
    series = httpx.get(
        f"{demo.url}/dicom-web/studies/{study}/series", trust_env=False, headers=auth_headers()
    ).json()
    # OHIF gives image series a thumbnail; the dose SR is a report, listed without one.
    series = [s for s in series if s["00080060"]["Value"] != ["SR"]]
    assert len(series) >= 2
    thumbnail = first.locator(".thumb img")
    expect(thumbnail).to_be_visible()
    assert thumbnail.evaluate("img => img.complete && img.naturalWidth > 0")  # WADO-RS thumbnail
    with page.expect_popup() as popup:
        first.get_by_role("link", name=re.compile("Open in viewer")).click()
    viewer = popup.value
    std, levels = _rendered(SimpleNamespace(page=viewer))  # type: ignore[arg-type]
    thumbnails = viewer.locator('[data-cy="study-browser-thumbnail"]')
    thumbnails.nth(len(series) - 1).wait_for(timeout=20_000)
    assert thumbnails.count() == len(series)
    viewer.screenshot(path=str(demo.shots / "viewer.png"))


def test_imaging_record_renders_and_prints_to_pdf(demo: Demo, page: Page) -> None:
    query = {"facility": CHILD[0], "mrn": CHILD[1], "exam": EXAM, "now": AS_OF}
    page.goto(f"{demo.url}/record?{httpx.QueryParams(query)}")
    expect(page.locator("h1")).to_have_text("My child’s medical imaging record")
    rows = page.locator("table.history tbody tr")
    assert rows.count() >= 4
    text = page.locator("table.history").inner_text()
    assert "St Mary" in text and "mSv" in text and re.search(r"about \d+(\.\d)? (days|months|years)", text)
    expect(page.locator("main")).to_contain_text("RadiologyInfo.org")  # the comparison's source
    page.screenshot(path=str(demo.shots / "record.png"), full_page=True)
    page.emulate_media(media="print")
    assert not page.locator(".noprint").first.is_visible()
    # Nothing runs off an A4 page (about 700 CSS px between margins) or a parent's phone: the
    # child's advice wraps, the table fits.
    for media, width in (("screen", 375), ("print", 700)):
        page.emulate_media(media=media)  # type: ignore[arg-type]
        page.set_viewport_size({"width": width, "height": 900})
        right = page.locator("p.badge.child").evaluate("e => e.getBoundingClientRect().right")
        assert right <= width and page.evaluate("document.documentElement.scrollWidth") <= width, width
    page.set_viewport_size({"width": 1280, "height": 900})
    printed = page.evaluate("document.body.innerText")
    # No internal identifiers on paper: no MRN, no UIDs (the back link is not printed).
    assert CHILD[1] not in printed and not re.search(r"\d+\.\d+\.\d+\.\d+", printed)
    pdf = page.pdf(format="A4")
    assert pdf.startswith(b"%PDF") and len(pdf) > 5_000
    assert len(re.findall(rb"/Type\s*/Page\b", pdf)) >= 1  # at least one printed page


def test_admin_pages(demo: Demo, page: Page) -> None:
    page.goto(f"{demo.url}/admin/facilities")
    expect(page.locator("tbody tr")).to_have_count(
        len(httpx.get(f"{demo.url}/api/facilities", trust_env=False, headers=auth_headers()).json())
    )
    expect(page.locator("tbody")).to_contain_text("St Mary")
    page.screenshot(path=str(demo.shots / "facilities.png"), full_page=True)
    page.goto(f"{demo.url}/admin/jobs")
    expect(page.locator("h1")).to_have_text("Jobs")
    # Live: a job that appears after the page opened shows, with its progress, without a reload
    # (htmx polls the table). Its kind is one no worker runs, so it stays as written.
    engine = create_engine(demo.database_url)
    with Session(engine) as session:
        job = Job(kind="page-test", key="live", status="running", progress_done=3, progress_total=4)
        session.add(job)
        session.commit()
        job_id = job.id
    engine.dispose()
    row = page.locator("#jobs tbody tr", has=page.locator("th", has_text=str(job_id)))
    expect(row).to_contain_text("3 / 4", timeout=10_000)
    expect(row.locator("progress")).to_have_attribute("value", "75")


def test_import_list_progress_is_live(demo: Demo, page: Page) -> None:
    """The import list shows a running import's progress without a reload, then stays put once
    nothing runs (the row is written as the job worker writes it; no job runs it here)."""
    engine = create_engine(demo.database_url)
    with Session(engine) as session:
        row = ImportJob(study_uid="1.2.826.0.1.9", facility_id="kids", status="running", total=5, sent=1)
        session.add(row)
        session.commit()
        import_id = row.id
    page.goto(f"{demo.url}/imports")
    tr = page.locator(f'tr[data-import="{import_id}"]')
    expect(tr).to_contain_text("1/5")
    with Session(engine) as session:
        stored = session.get(ImportJob, import_id)
        assert stored is not None
        stored.sent, stored.status = 5, "done"
        session.add(stored)
        session.commit()
    engine.dispose()
    expect(tr.locator(".status")).to_have_text("done", timeout=10_000)
    expect(tr).to_contain_text("5/5")
    expect(page.locator("#imports")).not_to_have_attribute("hx-trigger", "every 2s")


def test_accepting_a_review_item_changes_the_lookup(demo: Demo, page: Page) -> None:
    """An open review item shows the stranger's studies as unconfirmed; a reviewer accepts it
    on the review page (both records side by side, the evidence); the lookup shows them confirmed."""
    engine = create_engine(demo.database_url)
    with Session(engine) as session:
        child, stranger, study = the_child_and_a_stranger(session)
        rec = session.exec(select(IdentityRecord).where(IdentityRecord.patient_pk == child.pk)).one()
        other = session.exec(select(IdentityRecord).where(IdentityRecord.patient_pk == stranger.pk)).one()
        assert other.id is not None and rec.id is not None
        item = ReviewItem(
            record_id=other.id,
            candidate_record_id=rec.id,
            weight=9.0,
            contributions=json.dumps(
                {
                    "family": {"level": "agree", "weight": 7.1},
                    "birth_date": {"level": "disagree", "weight": -4.2},
                }
            ),
        )
        session.add(item)
        session.commit()
        item_id, other_family, study_uid = item.id, other.family, study.study_uid
    engine.dispose()
    card = f'li[data-study="{study_uid}"]'
    page.goto(demo.lookup_url())
    page.locator("details.others summary").click()
    expect(page.locator(card)).to_contain_text("Unconfirmed match")

    page.goto(f"{demo.url}/admin/review")
    section = page.locator("section.review", has=page.locator(f"#review-{item_id}"))
    expect(section.locator("table.side")).to_contain_text(other_family)
    expect(section.locator("table.evidence")).to_contain_text("+7.1")
    page.screenshot(path=str(demo.shots / "review.png"), full_page=True)
    section.get_by_label("Reason").fill("same child: confirmed with the parent by phone")
    section.get_by_role("button", name="Accept: same person").click()
    expect(page.locator(".notice")).to_contain_text(f"Review item {item_id} linked")

    page.goto(demo.lookup_url())
    expect(page.locator(card)).to_have_count(1)
    expect(page.locator(card)).not_to_contain_text("Unconfirmed match")


PAGES = (
    "/",
    "/?facility=kids&mrn=K346295&exam=CT+abdomen+pelvis&setting=ed&now=2026-06-25",
    "/?family=a&exam=CT+head",
    "/?facility=kids&mrn=K346295&exam=%21%21%21",
    "/record?facility=kids&mrn=K346295&exam=CT+abdomen+pelvis&now=2026-06-25",
    "/admin/facilities",
    "/admin/jobs",
    "/admin/review",
    # The radiologist's import page, with a refused preview (no such study).
    "/imports?study=1.2.3&facility=kids",
)


@pytest.mark.parametrize("width", [375, 1920])
def test_axe_finds_no_violations_on_any_page(demo: Demo, browser: Browser, width: int) -> None:
    context = browser.new_context(viewport={"width": width, "height": 900}, extra_http_headers=auth_headers())
    try:
        page = context.new_page()
        found = {}
        for path in PAGES:
            page.goto(demo.url + path)
            page.locator("details").evaluate_all(
                "ds => ds.forEach(d => d.open = true)"
            )  # check collapsed parts too
            violations = _axe(page, demo)
            if violations:
                found[path] = violations
            assert page.evaluate("document.documentElement.scrollWidth") <= width, path  # no sideways page
        assert found == {}
    finally:
        context.close()


def test_the_pages_own_assets_fit_the_budget(demo: Demo, page: Page) -> None:
    """Everything the lookup page loads from the broker besides the thumbnails (its HTML with an
    answer, the stylesheet, htmx) is at most 150 KB gzip-compressed, and nothing else is asked."""
    asked: list[str] = []
    page.on("request", lambda request: asked.append(request.url))
    page.goto(demo.lookup_url())
    page.wait_for_load_state("networkidle")
    own = [u for u in asked if "/dicom-web/" not in u]
    assert all(u.startswith(demo.url) for u in asked), asked
    total = 0
    for url in own:
        body = httpx.get(url, trust_env=False, headers=auth_headers()).content
        total += len(gzip.compress(body, 9))
    assert len(own) == 3, own  # the page, its stylesheet, htmx
    assert total <= 150 * 1024, total


def _study_for(patient_id: str, name: str, birth: str, sex: str, description: str, when: str) -> bytes:
    ds = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = patient_id, name, birth, sex
    ds.StudyDescription, ds.StudyDate, ds.SeriesDate = description, when, when
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for tag in ("OtherPatientIDs", "OtherPatientIDsSequence", "IssuerOfPatientID"):
        if tag in ds:
            delattr(ds, tag)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_a_study_only_indexed_at_another_facility(
    demo: Demo, page: Page, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The child's CT at a facility the broker only indexes: NEARLINE in the lookup; "Open in
    viewer" says it is fetching, then renders it; with the facility down, a page naming it and
    why, and the lookup still answers. (Last in this module: it adds the newest prior.)"""
    with Session(create_engine(demo.database_url)) as session:
        rec = session.exec(select(IdentityRecord).where(IdentityRecord.value == CHILD[1])).one()
        name, birth, sex = f"{rec.family}^{rec.given}", rec.birth_date, rec.sex or "O"
    with orthanc(tmp_path_factory.mktemp("eastside"), aet="EASTSIDE") as peer:
        for description, when in (
            ("CT ABDOMEN PELVIS W CONTRAST", "20260622"),
            ("CT CHEST W CONTRAST", "20260621"),
        ):
            data = _study_for("E-4471", name, birth, sex, description, when)
            httpx.post(f"{peer.url}/instances", content=data, trust_env=False, timeout=30).raise_for_status()
        with httpx.Client(base_url=demo.url, trust_env=False, timeout=30, headers=auth_headers()) as http:
            facility = {
                "id": "eastside",
                "issuer": "EASTSIDE",
                "name": "Eastside Clinic",
                "dicomweb_url": peer.dicomweb_url,
                "sharing_policy": "index_only",
            }
            assert http.post("/api/facilities", json=facility).status_code == 201
            job = http.post("/api/facilities/eastside/sync").json()["job_id"]
            deadline = time.monotonic() + 60
            while http.get(f"/api/jobs/{job}").json()["status"] != "done":
                assert time.monotonic() < deadline, http.get(f"/api/jobs/{job}").json()
                time.sleep(0.2)
        page.goto(demo.lookup_url())
        first = page.locator("ol.relevant > li").first
        expect(first).to_contain_text("Eastside Clinic")
        expect(first).to_contain_text("3 days ago")
        expect(first.locator(".badge.near")).to_have_text("NEARLINE")
        expect(first.locator(".nothumb")).to_be_visible()  # no thumbnail fetch for a study not held
        with page.expect_popup() as popup:
            first.get_by_role("link", name=re.compile("Open in viewer")).click()
        viewer = popup.value
        _rendered(SimpleNamespace(page=viewer))  # type: ignore[arg-type]  # fetched, then the viewer
        assert viewer.locator('[data-cy="study-browser-thumbnail"]').count() == 1
        viewer.close()
        page.reload()
        expect(page.locator("ol.relevant > li").first.locator(".badge.ok")).to_have_text("ONLINE")
    # Eastside is down now: its other study cannot be fetched; the page says so, and the lookup works.
    page.locator("details.others summary").click()
    other = page.locator("ol.priors li", has_text="Eastside Clinic").filter(has_text="NEARLINE")
    study = other.first.get_attribute("data-study")
    with httpx.Client(trust_env=False, timeout=30, headers=auth_headers()) as http:
        url = f"{demo.url}/viewer/viewer?StudyInstanceUIDs={study}"
        r = http.get(url)
        deadline = time.monotonic() + 30
        while r.status_code == 202 and time.monotonic() < deadline:
            time.sleep(0.2)
            r = http.get(url)
        assert r.status_code == 503 and "Could not fetch the study from Eastside Clinic" in r.text
    page.goto(demo.lookup_url())
    expect(page.locator("ol.relevant > li").first).to_contain_text("Eastside Clinic")
