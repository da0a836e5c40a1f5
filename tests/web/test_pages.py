"""The pages' server side on both backends (SQLite + folder, PostgreSQL + S3), without a browser:
what each page says on the demo data, the review decision and the avoided repeat going through
their services, and bad input answered with the message and nothing stored."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydicom.uid import generate_uid
from sqlmodel import Session, select

from broker.app import create_app
from broker.identity.models import ReviewItem
from broker.lookup.models import AvoidedRepeat
from tests.dicomweb.data import multipart_body
from tests.support import CHARSET_FILES, auth_headers, make_ds, to_bytes

LOOKUP = {
    "facility": "kids",
    "mrn": "K346295",
    "exam": "CT abdomen pelvis",
    "setting": "ed",
    "now": "2026-06-25",
}
FORM = {"content-type": "application/x-www-form-urlencoded"}


@pytest.fixture
def client(demo_backend: Any, tmp_path: Path, make_settings: Any) -> Iterator[TestClient]:
    with TestClient(create_app(settings=make_settings(demo_backend, tmp_path)), headers=auth_headers()) as c:
        yield c


def _avoided(client: TestClient) -> int:
    engine = client.app.state.scanonce.engine  # type: ignore[attr-defined]
    with Session(engine) as session:
        return len(session.exec(select(AvoidedRepeat)).all())


def test_pages_on_the_demo_data(client: TestClient) -> None:
    r = client.get("/", params=LOOKUP)
    assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
    first = r.text.index('<li class="prior inwindow"')
    assert "9 days ago" in r.text[first : first + 2000] and "St Mary" in r.text[first : first + 2000]
    assert "Warning:" in r.text and "mSv" in r.text
    # htmx asks for the form and the answer only.
    partial = client.get("/", params=LOOKUP, headers={"HX-Request": "true"})
    assert partial.text.lstrip().startswith('<div id="lookup"') and "<html" not in partial.text

    # "Use this prior": recorded through the lookup service, then back to the answer.
    uid = re.search(r'data-study="([^"]+)"', r.text[first:])
    assert uid is not None
    body = {
        "study_instance_uid": uid.group(1),
        "planned_exam": "CT abdomen pelvis",
        "facility": "kids",
        "back": "/?facility=kids",
    }
    r = client.post("/avoided", data=body, headers=FORM, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].endswith("#answer")
    assert _avoided(client) == 1
    r = client.post("/avoided", data={**body, "study_instance_uid": "1.2.3"}, headers=FORM)
    assert r.status_code == 404 and _avoided(client) == 1  # an unknown study: said, nothing stored
    r = client.post("/avoided", data={**body, "back": "https://elsewhere.example/"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/?avoided=")  # never off-site
    assert _avoided(client) == 2

    r = client.get("/", params={**LOOKUP, "exam": "!!!"})
    assert r.status_code == 400 and 'id="exam-error"' in r.text
    r = client.get("/", params={**LOOKUP, "mrn": "NO-SUCH"})
    assert r.status_code == 200 and "No studies found in" in r.text

    record = client.get("/record", params=LOOKUP)
    assert record.status_code == 200 and "medical imaging record" in record.text

    facilities = client.get("/admin/facilities")
    assert facilities.status_code == 200 and "St Mary" in facilities.text
    assert client.get("/admin/jobs").status_code == 200


def test_use_this_prior_for_an_exam_given_by_code_alone(client: TestClient) -> None:
    # A LOINC code whose label the vocabulary shares with another code: the page still names the
    # exam in words the lookup reads, so "Use this prior" records the avoided repeat.
    lookup = {"facility": "kids", "mrn": "K346295", "code": "36643-5", "system": "LOINC", "now": "2026-06-25"}
    r = client.get("/", params=lookup)
    assert r.status_code == 200, r.text
    form = re.search(r'<input type="hidden" name="planned_exam" value="([^"]+)"', r.text)
    uid = re.search(r'data-study="([^"]+)"', r.text)
    assert form is not None and uid is not None
    assert "36643-5" not in form.group(1)
    body = {
        "study_instance_uid": uid.group(1),
        "planned_exam": form.group(1),
        "facility": "kids",
        "back": "/",
    }
    r = client.post("/avoided", data=body, headers=FORM, follow_redirects=False)
    assert r.status_code == 303, r.text
    assert _avoided(client) == 1


def test_review_decisions_go_through_the_identity_service(client: TestClient) -> None:
    engine = client.app.state.scanonce.engine  # type: ignore[attr-defined]
    with Session(engine) as session:
        item = session.exec(select(ReviewItem).where(ReviewItem.status == "open")).first()
        if item is None:
            pytest.skip("the demo data has no open review item")
        item_id = item.id
    page = client.get("/admin/review")
    assert page.status_code == 200 and f'id="review-{item_id}"' in page.text
    # A decision needs a reason: refused, and the item stays open.
    r = client.post(f"/admin/review/{item_id}", data={"decision": "link", "reason": ""}, headers=FORM)
    assert r.status_code == 400
    # Said beside the item's Reason, and what the reviewer typed is still there to correct.
    typed = {"decision": "link", "reason": "same phone\x00 and address"}
    r = client.post(f"/admin/review/{item_id}", data=typed, headers=FORM)
    assert r.status_code == 400
    field = re.search(rf'<input id="why-{item_id}"[^>]*>', r.text)
    assert field is not None and 'aria-invalid="true"' in field.group(0), r.text[-3000:]
    assert 'value="same phone' in field.group(0)
    assert (
        f'id="why-{item_id}-error"' in r.text and "NUL" in r.text.split(f'id="why-{item_id}-error"')[1][:200]
    )
    r = client.post(f"/admin/review/{item_id}", data={"decision": "maybe", "reason": "x"}, headers=FORM)
    assert r.status_code == 400
    with Session(engine) as session:
        assert session.get(ReviewItem, item_id).status == "open"  # type: ignore[union-attr]
    r = client.post(f"/admin/review/{item_id}", data={"decision": "reject", "reason": "twins"}, headers=FORM)
    assert r.status_code == 200 and f"Review item {item_id} rejected" in r.text
    assert f'id="review-{item_id}"' not in r.text
    with Session(engine) as session:
        assert session.get(ReviewItem, item_id).status != "open"  # type: ignore[union-attr]
    r = client.post(f"/admin/review/{item_id}", data={"decision": "link", "reason": "again"}, headers=FORM)
    assert r.status_code == 409  # already decided


def test_hostile_stored_values_are_shown_escaped(client: TestClient) -> None:
    """A facility's StudyDescription carrying markup is shown as text on the lookup and the record."""
    hostile = "CT ABDOMEN PELVIS <script>alert(1)</script><img src=x onerror=alert(2)>"
    ds = make_ds(
        sop=generate_uid(),
        study=generate_uid(),
        series=generate_uid(),
        pid="K346295",
        name="SCHRODER^MATEO",
        date="20260620",
        description=hostile,
    )
    body, content_type = multipart_body([to_bytes(ds)])
    r = client.post(
        "/facilities/kids/dicom-web/studies", content=body, headers={"Content-Type": content_type}
    )
    assert r.status_code == 200, r.text
    for path in ("/", "/record"):
        page = client.get(path, params=LOOKUP).text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page, path
        assert "<script>alert(1)" not in page and "<img src=x" not in page, path


def test_a_patient_named_in_hangul_is_found_by_name_and_shown(client: TestClient) -> None:
    """chrKoreanMulti.dcm (ISO 2022 IR 149), named 김희중 in Hangul alone, sent over STOW-RS: the
    search by family name lists the person under that name (before, such a name normalised to
    nothing and the search was refused: "family must contain letters")."""
    body, content_type = multipart_body([(CHARSET_FILES / "chrKoreanMulti.dcm").read_bytes()])
    r = client.post(
        "/facilities/kids/dicom-web/studies", content=body, headers={"Content-Type": content_type}
    )
    assert r.status_code == 200, r.text
    page = client.get("/", params={"family": "김희", "exam": "CT abdomen pelvis"})
    assert page.status_code == 200, page.text[:300]
    people = page.text[page.text.index('<ul class="people">') :]
    assert "<strong>김희중</strong>" in people and "2008-3 at" in people


@pytest.mark.parametrize("family", ["山田", "やまだ", "YAMADA"])
def test_a_patient_is_found_by_any_component_group_of_its_name(client: TestClient, family: str) -> None:
    """chrH31.dcm, Yamada^Tarou=山田^太郎=やまだ^たろう, sent over STOW-RS: the search by family
    name finds the person by its Han or kana name as by its Latin one (before, the MPI's name,
    from the Alphabetic group, alone: 山田 found no one)."""
    body, content_type = multipart_body([(CHARSET_FILES / "chrH31.dcm").read_bytes()])
    r = client.post(
        "/facilities/kids/dicom-web/studies", content=body, headers={"Content-Type": content_type}
    )
    assert r.status_code == 200, r.text
    page = client.get("/", params={"family": family, "exam": "CT abdomen pelvis"})
    assert page.status_code == 200, page.text[:300]
    people = page.text[page.text.index('<ul class="people">') :]
    assert "<strong>YAMADA, TAROU</strong>" in people and "H31EXAMPLE at" in people


def test_an_unknown_facility_is_named_beside_its_field(client: TestClient) -> None:
    """A lookup at a facility the broker does not know (an old bookmark, a CDS card of another
    site) says so beside the facility, as every other bad field does; it is not a blank 400."""
    r = client.get("/", params={**LOOKUP, "facility": "nosuch"})
    assert r.status_code == 400
    assert 'id="facility-error"' in r.text and "nosuch" in r.text.split('id="facility-error"')[1][:200]
    select = re.search(r'<select id="facility"[^>]*>', r.text)
    assert select is not None and 'aria-describedby="facility-error"' in select.group(0)
    assert 'value="K346295"' in r.text and 'value="CT abdomen pelvis"' in r.text  # what was typed stays


@pytest.mark.parametrize("name", ["mrn", "exam", "family", "given"])
def test_a_nul_in_a_field_is_a_message_beside_it(client: TestClient, name: str) -> None:
    """A NUL (pasted from a broken export) is refused beside its field on either backend: not
    PostgreSQL's JSON error in place of the page, and not read as another patient or exam."""
    params = {**LOOKUP, name: "K34\x006295"}
    if name in ("family", "given"):
        params = {name: "SCHR\x00ODER", "exam": "CT abdomen pelvis"}
    r = client.get("/", params=params)
    assert r.status_code == 400 and r.headers["content-type"].startswith("text/html"), r.text[:200]
    assert f'id="{name}-error"' in r.text and "NUL" in r.text.split(f'id="{name}-error"')[1][:200]


def test_a_birth_date_out_of_range_is_not_called_unreal(client: TestClient) -> None:
    """0001-01-01 (a placeholder some systems write) is a real date: the message beside the field
    says what is checked, the range, so the user does not hunt for a typo."""
    r = client.get("/", params={"family": "SCHRODER", "birthdate": "0001-01-01", "exam": "CT abdomen pelvis"})
    assert r.status_code == 400
    said = r.text.split('id="birthdate-error"')[1][:200]
    assert "from 1850-01-01 to today" in said and "real date" not in said, said


@pytest.mark.parametrize("name", ["mrn", "family"])
def test_an_over_long_field_is_a_message_beside_it(client: TestClient, name: str) -> None:
    """A value longer than any record holds (a paste of a whole document) is said to be too long
    beside its field, not cut silently and answered "no studies found" for what was left."""
    params = {**LOOKUP, name: "K" * 300}
    if name == "family":
        params = {name: "SCHRODER" * 40, "exam": "CT abdomen pelvis"}
    r = client.get("/", params=params)
    assert r.status_code == 400 and r.headers["content-type"].startswith("text/html"), r.text[:200]
    assert f'id="{name}-error"' in r.text and "too long" in r.text.split(f'id="{name}-error"')[1][:200]


def test_the_record_of_a_bad_lookup_says_what_is_wrong(client: TestClient) -> None:
    """A record asked with a facility the broker does not know is not "no imaging is known for
    this patient" (a parent would believe it): it says what was wrong."""
    r = client.get("/record", params={**LOOKUP, "facility": "nosuch"})
    assert r.status_code == 400
    assert "No imaging is known" not in r.text
    assert re.search(r'class="error"[^>]*>[^<]*nosuch', r.text), r.text[-800:]


def test_refusals_are_not_kept_by_a_shared_cache(client: TestClient) -> None:
    """Every HTML answer is no-store (docs/web.md), the refusals of the forms too: they name the
    study and the facility that was asked."""
    bad = {"study_instance_uid": "1.2.3", "planned_exam": "CT head", "facility": "kids", "back": "/"}
    answers = {
        "avoided page": client.post("/avoided", data=bad, headers=FORM),
        "avoided fragment": client.post("/avoided", data=bad, headers={**FORM, "HX-Request": "true"}),
        "import": client.post("/imports", data={"study_uid": "1.2.3", "facility": "kids"}, headers=FORM),
    }
    for what, r in answers.items():
        assert r.status_code == 404 and r.headers["content-type"].startswith("text/html"), what
        assert r.headers.get("cache-control") == "no-store", what


def test_a_nul_in_a_link_or_form_is_a_page_saying_so(client: TestClient) -> None:
    """A NUL in the study or facility of the import, compare and "use this prior" pages is a page
    saying so on either backend, not PostgreSQL's refusal as a JSON body in place of the page."""
    nul = "1.2.3\x00"
    answers = {
        "import preview": client.get("/imports", params={"study": nul, "facility": "kids"}),
        "compare": client.get("/compare", params={"study": nul}),
        "import": client.post("/imports", data={"study_uid": nul, "facility": "kids"}, headers=FORM),
        "avoided": client.post(
            "/avoided", data={"study_instance_uid": nul, "planned_exam": "CT head", "facility": "kids"}
        ),
        "review": client.post("/admin/review/1", data={"decision": "link", "reason": "same\x00"}),
    }
    for what, r in answers.items():
        assert r.status_code == 400, (what, r.status_code)
        assert r.headers["content-type"].startswith("text/html") and "NUL" in r.text, (what, r.text[:200])


def test_a_nul_in_a_viewer_link_is_a_page_saying_so(client: TestClient) -> None:
    r = client.get("/viewer/viewer", params={"StudyInstanceUIDs": "1.2.3\x00"})
    assert r.status_code == 400 and r.headers["content-type"].startswith("text/html"), r.text[:200]
    assert "NUL" in r.text


def test_a_nul_in_a_viewer_link_is_the_links_fault_where_no_viewer_is_installed(
    demo_backend: Any, tmp_path: Path, make_settings: Any
) -> None:
    """The broken link is said as such, not hidden behind "the viewer is not installed" (which
    would send the operator to install something for nothing)."""
    settings = make_settings(demo_backend, tmp_path, viewer_dir=tmp_path / "no-viewer")
    with TestClient(create_app(settings=settings), headers=auth_headers()) as c:
        r = c.get("/viewer/viewer", params={"StudyInstanceUIDs": "1.2.3\x00"})
        assert r.status_code == 400 and "NUL" in r.text, (r.status_code, r.text[:200])
        # A good link there still says what to install.
        assert c.get("/viewer/viewer", params={"StudyInstanceUIDs": "1.2.3"}).status_code == 503


def test_a_refused_import_leads_back_to_its_preview(client: TestClient) -> None:
    """'Back' from a refused import returns to the preview of that study and destination (to try
    again once the archive answers), not to the bare list."""
    r = client.post("/imports", data={"study_uid": "1.2.3", "facility": "kids"}, headers=FORM)
    assert r.status_code == 404
    back = re.search(r'<a href="([^"]+)">Back</a>', r.text)
    assert back is not None and back.group(1) == "/imports?study=1.2.3&amp;facility=kids", back
