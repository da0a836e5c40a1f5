"""QIDO-RS query keys and values at the edges of PS3.18 8.3.4: what is an error, what is ignored."""

from __future__ import annotations

import httpx
import pytest

from tests.dicomweb.conftest import Archive
from tests.dicomweb.data import MUELLER, MULLER, SMITH

STUDY_UID = "0020000D"
LOCAL = "/facilities/local/dicom-web/studies"


def _get(archive: Archive, path: str) -> httpx.Response:
    with archive.server.http() as http:
        return http.get(path)


def _uids(r: httpx.Response) -> set[str]:
    return {m[STUDY_UID]["Value"][0] for m in r.json()} if r.status_code == 200 else set()


@pytest.mark.parametrize(
    "query",
    [
        "&includefield=PatientAge",  # as Weasis sends it
        "includefield=PatientAge&&limit=5",
        "=&includefield=PatientAge",
        "=x&limit=5",  # a value under an empty key constrains nothing
        "&&&",
    ],
)
def test_an_empty_query_key_is_ignored(archive: Archive, query: str) -> None:
    r = _get(archive, f"{LOCAL}?{query}")
    assert r.status_code == 200, (query, r.text)
    assert _uids(r) == {MUELLER, MULLER, SMITH}
    assert "warning" not in r.headers, r.headers.get("warning")


@pytest.mark.parametrize("tag", ["00991234", "00101234", "0009ABCD"])
def test_a_well_formed_tag_not_supported_for_matching_is_ignored_with_a_warning(
    archive: Archive, tag: str
) -> None:
    # PS3.18 8.3.4.1: an attribute is any 8-hex-digit tag or a PS3.6 keyword; one the origin
    # server does not match on is ignored (PS3.4 C.2.2.1.3), and the Warning header says so.
    r = _get(archive, f"{LOCAL}?{tag}=x")
    assert r.status_code == 200, r.text
    assert _uids(r) == {MUELLER, MULLER, SMITH}
    assert tag in r.headers["warning"]
    assert "not supported for matching" in r.headers["warning"]


@pytest.mark.parametrize("key", ["NoSuchKeyword", "PatientNam", "0011ZZZZ", "001012345", "0010123"])
def test_a_key_outside_the_grammar_is_400(archive: Archive, key: str) -> None:
    r = _get(archive, f"{LOCAL}?{key}=x")
    assert r.status_code == 400, r.text
    assert "PS3.18 8.3.4.1" in r.json()["detail"]


@pytest.mark.parametrize(
    ("query", "says"),
    [
        ("StudyTime=25:99", "StudyTime"),
        ("StudyTime=2599", "hour"),
        ("StudyTime=1260", "minute"),
        ("StudyTime=120061", "second"),
        ("StudyTime=12:3", "StudyTime"),
        ("StudyTime=1200-0900", "range"),
        ("StudyTime=24", "hour"),
        ("StudyDate=20221231-20200101", "range"),
        ("StudyDate=20200230", "StudyDate"),
        ("PatientBirthDate=19800001", "PatientBirthDate"),
        ("PerformedProcedureStepStartTime=9999", "hour"),
        # Keys the index does not match on are still values of their VR: malformed is malformed.
        ("AcquisitionDateTime=2020130101", "AcquisitionDateTime"),
        ("AcquisitionDateTime=20200101-20190101", "range"),
        ("SeriesTime=7777", "SeriesTime"),
        ("ContentDate=2020", "ContentDate"),
    ],
)
def test_invalid_dates_times_and_ranges_are_400_not_204(archive: Archive, query: str, says: str) -> None:
    r = _get(archive, f"{LOCAL}?{query}")
    assert r.status_code == 400, (query, r.status_code, r.text)
    assert says in r.json()["detail"]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("StudyTime=101500", {MUELLER}),
        ("StudyTime=10:15", {MUELLER}),
        ("StudyTime=1015-1016", {MUELLER}),
        ("StudyTime=235960", set()),  # a leap second is a valid time
        ("StudyDate=20200105-20200105", {MUELLER}),
        ("AcquisitionDateTime=20200101120000.5%2B0100", {MUELLER, MULLER, SMITH}),  # valid, not matched
        ("AcquisitionDateTime=2020-", {MUELLER, MULLER, SMITH}),
    ],
)
def test_valid_dates_and_times_still_match(archive: Archive, query: str, expected: set[str]) -> None:
    r = _get(archive, f"{LOCAL}?{query}")
    assert r.status_code == (200 if expected else 204), r.text
    assert _uids(r) == expected


@pytest.mark.parametrize(
    ("query", "says"),
    [
        ("PatientID=PID%00", "PatientID"),  # no DICOM string holds NUL; PostgreSQL refuses it
        ("PatientName=M%00*", "PatientName"),
        ("StudyDescription=%00", "StudyDescription"),
        ("InstitutionName=%00", "InstitutionName"),  # not matched on, but no less malformed
    ],
)
def test_a_nul_character_in_a_value_is_400_not_500(archive: Archive, query: str, says: str) -> None:
    for path in (LOCAL, "/dicom-web/series", "/dicom-web/instances"):
        r = _get(archive, f"{path}?{query}")
        assert r.status_code == 400, (path, query, r.status_code, r.text)
        assert says in r.json()["detail"]


@pytest.mark.parametrize(
    "query",
    ["SeriesNumber=" + "9" * 30, "SeriesNumber=-" + "9" * 20, "InstanceNumber=3000000000", "Rows=1_0"],
)
def test_an_integer_no_is_value_can_hold_is_400_not_500(archive: Archive, query: str) -> None:
    # PS3.5 6.2: IS is an optional sign and digits, -2^31 to 2^31-1 (no underscores).
    for path in ("/dicom-web/instances", f"/dicom-web/studies/{MUELLER}/instances"):
        r = _get(archive, f"{path}?{query}")
        assert r.status_code == 400, (path, query, r.status_code, r.text)
        assert query.split("=")[0] in r.json()["detail"]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("PatientID=PID-3&PatientID=PID-1", {SMITH, MUELLER}),
        ("AccessionNumber=ACC-1&AccessionNumber=NONE", {MUELLER}),
        ("StudyDate=20200105&StudyDate=20220101-", {MUELLER, SMITH}),
        ("PatientName=smith*&PatientName=mul*", {SMITH, MULLER}),
        ("PatientName=smith*&PatientName=", {MUELLER, MULLER, SMITH}),  # one universal: no constraint
        (f"StudyInstanceUID={MUELLER}&StudyInstanceUID={SMITH}", {MUELLER, SMITH}),
    ],
)
def test_a_key_given_twice_matches_any_of_its_values(
    archive: Archive, query: str, expected: set[str]
) -> None:
    r = _get(archive, f"{LOCAL}?{query}")
    assert r.status_code == 200, (query, r.status_code, r.text)
    assert _uids(r) == expected


@pytest.mark.parametrize(
    "query", ["PatientName=M%FCller*", "includefield=Patient%FFName", "Patient%E9Name=x"]
)
def test_a_query_not_percent_encoded_utf8_is_400_not_a_search_for_something_else(
    archive: Archive, query: str
) -> None:
    # PS3.18 8.3.1: query parameters are UTF-8, percent-encoded. Latin-1 `%FC` is not `ü`; read as
    # U+FFFD it would search for another name and answer "no such study".
    r = _get(archive, f"{LOCAL}?{query}")
    assert r.status_code == 400, (query, r.status_code, r.text)
    assert "UTF-8" in r.json()["detail"]
    assert _uids(_get(archive, f"{LOCAL}?PatientName=M%C3%BCller*")) == {MUELLER}


@pytest.mark.parametrize(
    "query",
    [
        "accept=application%2Fdicom%2Bjson",
        "accept=application/json",
        "accept=*/*",
        "charset=utf-8",
        "charset=ISO-8859-1,utf-8;q=0.5",
        "accept=application%2Fdicom%2Bjson&charset=UTF-8",
    ],
)
def test_accept_and_charset_query_parameters_are_honoured(archive: Archive, query: str) -> None:
    """PS3.18 8.3.3.1-2: a link opened in a browser says with `accept` and `charset` what a
    client would say in its headers; they are not query keys."""
    r = _get(archive, f"{LOCAL}?{query}")
    assert r.status_code == 200, (query, r.text)
    assert r.headers["content-type"].startswith("application/dicom+json")
    assert _uids(r) == {MUELLER, MULLER, SMITH}


@pytest.mark.parametrize(
    ("query", "status"),
    [
        ("accept=application%2Fdicom%2Bxml", 406),
        ("accept=image/png", 406),
        ("charset=ISO-8859-1", 406),
        ("charset=utf-8;q=0", 406),
        ("charset=utf-8;q=x", 400),
        ("accept=application/json&accept=application/json", 400),
    ],
)
def test_an_accept_or_charset_parameter_that_cannot_be_met_is_refused(
    archive: Archive, query: str, status: int
) -> None:
    r = _get(archive, f"{LOCAL}?{query}")
    assert r.status_code == status, (query, r.text)


def test_the_accept_parameter_takes_precedence_over_the_header(archive: Archive) -> None:
    with archive.server.http() as http:
        r = http.get(f"{LOCAL}?accept=application%2Fdicom%2Bjson", headers={"Accept": "image/png"})
        assert r.status_code == 200
        refused = http.get(f"{LOCAL}?accept=image%2Fpng", headers={"Accept": "application/dicom+json"})
        assert refused.status_code == 406
