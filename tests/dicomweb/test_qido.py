"""QIDO-RS against a loaded live broker, through dicomweb-client and raw HTTP."""

from __future__ import annotations

import httpx
import pytest

from tests.dicomweb.conftest import Archive, LiveServer
from tests.dicomweb.data import MUELLER, MULLER, NORTH_FACILITY, SMITH, multipart_body, uid
from tests.support import make_ds, to_bytes

STUDY_UID = "0020000D"


def _uids(matches: list[dict], tag: str = STUDY_UID) -> set[str]:
    return {m[tag]["Value"][0] for m in matches}


def _get(archive: Archive, path: str, **headers: str) -> httpx.Response:
    with archive.server.http() as http:
        return http.get(path, headers=headers)


def test_all_studies_federation_wide_and_per_facility(archive: Archive) -> None:
    server = archive.server
    north = {i.study for i in archive.corpus.by_facility()[NORTH_FACILITY]}
    assert _uids(server.client().search_for_studies()) == {MUELLER, MULLER, SMITH} | north
    assert _uids(server.client(server.facility_url("local")).search_for_studies()) == {MUELLER, MULLER, SMITH}
    assert _uids(server.client(server.facility_url(NORTH_FACILITY)).search_for_studies()) == north
    r = _get(archive, "/facilities/nowhere/dicom-web/studies")
    assert r.status_code == 404


def test_study_attributes_counts_modalities_retrieve_url(archive: Archive) -> None:
    client = archive.server.client()
    (study,) = client.search_for_studies(search_filters={"StudyInstanceUID": MUELLER})
    assert study["00201206"]["Value"] == [3]  # NumberOfStudyRelatedSeries
    assert study["00201208"]["Value"] == [4]  # NumberOfStudyRelatedInstances
    assert sorted(study["00080061"]["Value"]) == ["CT", "MR", "OT"]
    assert study["00081190"]["Value"] == [f"{archive.server.url}/studies/{MUELLER}"]
    assert study["00100010"]["Value"] == [{"Alphabetic": "Müller^Hans"}]


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({"PatientName": "mul*"}, {MULLER}),  # wildcard, case-insensitive
        ({"PatientName": "MÜLLER*"}, {MUELLER}),
        ({"PatientName": "m?ller^anna"}, {MULLER}),
        ({"PatientID": "PID-3"}, {SMITH}),
        ({"00100020": "PID-3"}, {SMITH}),  # by tag
        ({"AccessionNumber": "ACC-1"}, {MUELLER}),
        ({"StudyDate": "20200101-20211231"}, {MUELLER, MULLER}),
        ({"StudyDate": "20220101-"}, {SMITH}),
        ({"StudyDate": "-20201231"}, {MUELLER}),
        ({"StudyDate": "20210610"}, {MULLER}),
        ({"StudyInstanceUID": f"{MUELLER},{SMITH}"}, {MUELLER, SMITH}),
        ({"ModalitiesInStudy": "MR"}, {MUELLER, MULLER}),
        ({"ModalitiesInStudy": "NM"}, {SMITH}),
        ({"ModalitiesInStudy": "M*"}, {MUELLER, MULLER}),  # CS values take wildcards (PS3.4 C.2.2.2.4)
        ({"ModalitiesInStudy": "N?"}, {SMITH}),
        ({"ModalitiesInStudy": "C*,N*"}, {MUELLER, SMITH}),
        ({"ModalitiesInStudy": "*T"}, {MUELLER}),
    ],
)
def test_study_matching(archive: Archive, filters: dict[str, str], expected: set[str]) -> None:
    client = archive.server.client(archive.server.facility_url("local"))
    assert _uids(client.search_for_studies(search_filters=filters)) == expected


def test_fuzzy_matching_is_accent_insensitive(archive: Archive) -> None:
    client = archive.server.client(archive.server.facility_url("local"))
    assert _uids(client.search_for_studies(search_filters={"PatientName": "muller"}, fuzzymatching=True)) == {
        MUELLER,
        MULLER,
    }
    assert _uids(client.search_for_studies(search_filters={"PatientName": "Müller"}, fuzzymatching=True)) == {
        MUELLER,
        MULLER,
    }
    assert client.search_for_studies(search_filters={"PatientName": "muller"}) == []


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("mul^ha", {MUELLER}),  # each component the start of a name component (Müller^Hans)
        ("MUL^A", {MULLER}),
        ("^hans", {MUELLER}),  # no family name given: the given name alone
        ("muller^hans", {MUELLER}),
        ("mul^x", set()),
        ("han^mul", set()),  # the components keep their order
    ],
)
def test_fuzzy_matching_takes_each_component_as_the_start_of_a_name_component(
    archive: Archive, name: str, expected: set[str]
) -> None:
    client = archive.server.client(archive.server.facility_url("local"))
    found = client.search_for_studies(search_filters={"PatientName": name}, fuzzymatching=True)
    assert _uids(found) == expected


def test_literal_and_percent_encoded_queries_mean_the_same(archive: Archive) -> None:
    pairs = [
        ("PatientName=mul*", "PatientName=mul%2A"),
        (f"StudyInstanceUID={MUELLER},{SMITH}", f"StudyInstanceUID={MUELLER}%2C{SMITH}"),
        ("includefield=StudyDescription,00100030", "includefield=StudyDescription%2C00100030"),
        ("PatientName=muller%5Eanna", "PatientName=muller^anna"),
    ]
    for literal, encoded in pairs:
        a = _get(archive, f"/facilities/local/dicom-web/studies?{literal}")
        b = _get(archive, f"/facilities/local/dicom-web/studies?{encoded}")
        assert a.status_code == b.status_code == 200, (literal, a.text, b.text)
        assert a.json() == b.json()


def test_includefield_by_keyword_tag_repeated_and_all(archive: Archive) -> None:
    base = f"/dicom-web/studies?StudyInstanceUID={MUELLER}"
    (default,) = _get(archive, base).json()
    assert "00081030" in default  # StudyDescription is a default attribute
    assert "00100030" not in default or "Value" not in default["00100030"]
    (one,) = _get(archive, base + "&includefield=PatientBirthDate").json()
    (two,) = _get(archive, base + "&includefield=00100030&includefield=PatientSex").json()
    (lst,) = _get(archive, base + "&includefield=00100030,PatientSex").json()
    assert "00100030" in one and "00100030" in two and two == lst
    (everything,) = _get(archive, base + "&includefield=all").json()
    assert set(default) <= set(everything)
    assert len(everything) > len(default)


def test_limit_offset_and_warning_header(archive: Archive) -> None:
    total = len(archive.server.client().search_for_studies())
    assert total == 6
    seen: list[str] = []
    for offset in range(0, total, 4):
        r = _get(archive, f"/dicom-web/studies?limit=4&offset={offset}")
        assert r.status_code == 200
        page = [m[STUDY_UID]["Value"][0] for m in r.json()]
        seen += page
        more = offset + 4 < total
        assert ("additional results" in r.headers.get("warning", "")) is more
    assert len(seen) == len(set(seen)) == total
    client = archive.server.client()
    assert len(client.search_for_studies(limit=2, offset=1)) == 2
    # Offsets past the end: nothing, and PS3.18 8.3.4.4.1 says 204.
    assert _get(archive, "/dicom-web/studies?offset=6").status_code == 204
    assert client.search_for_studies(offset=100) == []


@pytest.mark.parametrize(
    "query",
    [
        "limit=-1",
        "limit=abc",
        "limit=0",
        "offset=-5",
        "offset=1.5",
        "limit=1&limit=2",
        "fuzzymatching=maybe",
        "NotAnAttribute=1",
        "PatientNam=Smith",
        "0011ZZZZ=1",
        "includefield=NoSuchKeyword",
        "StudyDate=2020-01-05x",
        "StudyDate=20201301",
        "StudyInstanceUID=1.2.abc",
    ],
)
def test_bad_queries_are_400_with_a_message(archive: Archive, query: str) -> None:
    r = _get(archive, f"/dicom-web/studies?{query}")
    assert r.status_code == 400, (query, r.status_code, r.text)
    assert r.json()["detail"]
    assert _get(archive, "/dicom-web/studies?limit=1").status_code == 200  # still serving


def test_absurd_limit_and_offset_are_clamped(archive: Archive) -> None:
    r = _get(archive, "/dicom-web/studies?limit=" + "9" * 40)
    assert r.status_code == 200
    assert len(r.json()) == 6
    assert "maximum" in r.headers["warning"]
    assert _get(archive, "/dicom-web/studies?offset=" + "9" * 40).status_code == 204


def test_unsupported_optional_parameters_are_ignored_with_a_warning(archive: Archive) -> None:
    r = _get(archive, f"/dicom-web/studies?StudyInstanceUID={SMITH}&emptyvaluematching=true")
    assert r.status_code == 200
    assert len(r.json()) == 1
    assert r.headers["warning"].startswith("299 ")
    assert "emptyvaluematching" in r.headers["warning"]


def test_accept_negotiation(archive: Archive) -> None:
    assert _get(archive, "/dicom-web/studies", Accept="application/dicom+json").status_code == 200
    assert _get(archive, "/dicom-web/studies", Accept="application/json").status_code == 200
    assert _get(archive, "/dicom-web/studies", Accept="*/*").status_code == 200
    r = _get(archive, "/dicom-web/studies", Accept="multipart/related; type=application/dicom+xml")
    assert r.status_code == 406
    r = _get(archive, "/dicom-web/studies")
    assert r.headers["content-type"] == "application/dicom+json"


@pytest.mark.parametrize(
    "path",
    [
        f"/dicom-web/studies?StudyInstanceUID={MUELLER}&InstitutionName=X",  # 200, with a Warning
        "/dicom-web/studies?PatientID=NOBODY",  # 204
        f"/dicom-web/studies/{MUELLER}/series",
        f"/facilities/local/dicom-web/studies/{MUELLER}/series/{uid(1, 1)}/instances",
        "/dicom-web/instances?limit=abc",  # 400
    ],
)
def test_head_answers_a_search_as_get_would_without_a_body(archive: Archive, path: str) -> None:
    # RFC 9110 9.1 and 9.3.2: a server supports HEAD wherever it supports GET.
    with archive.server.http() as http:
        got, head = http.get(path), http.head(path)
    assert head.status_code == got.status_code, (path, head.status_code, got.status_code)
    for header in ("content-type", "content-length", "warning"):
        assert head.headers.get(header) == got.headers.get(header), header
    assert head.content == b""


def test_relational_and_other_levels(archive: Archive) -> None:
    client = archive.server.client()
    series = client.search_for_series(MUELLER)
    assert len(series) == 3
    assert {s["00080060"]["Value"][0] for s in series} == {"CT", "MR", "OT"}
    assert all(s[STUDY_UID]["Value"] == [MUELLER] for s in series)
    instances = client.search_for_instances(MUELLER, uid(1, 2))
    assert _uids(instances, "00080018") == {uid(1, 2, 1), uid(1, 2, 2)}
    assert len(client.search_for_instances(MUELLER)) == 4
    mr = client.search_for_series(search_filters={"Modality": "MR"})
    assert {s[STUDY_UID]["Value"][0] for s in mr} == {MUELLER, MULLER}
    everything = client.search_for_instances()
    assert len(everything) == len(archive.corpus.items)
    assert client.search_for_series("1.2.3.4.5.6") == []


@pytest.mark.parametrize(
    "path",
    [
        "/dicom-web/studies/not-a-uid/series",
        "/dicom-web/studies/1.2.03/instances",
        f"/dicom-web/studies/{MUELLER}/series/{'1' * 65}/instances",
        f"/facilities/local/dicom-web/studies/{MUELLER}/series/1..2/instances",
        # Decoded, this would be a search of another, existing series (and find its instances).
        f"/dicom-web/studies/{MUELLER}%2Fseries%2F{uid(1, 2)}/instances",
        f"/facilities/local/dicom-web/studies/{MUELLER}%2Fseries%2F{uid(1, 2)}/instances",
    ],
)
def test_a_path_uid_that_is_not_a_uid_is_400_as_it_is_in_the_query(archive: Archive, path: str) -> None:
    # A search's path UIDs are its keys (PS3.18 10.6.1): the same 400 as `?StudyInstanceUID=1.2.abc`.
    r = _get(archive, path)
    assert r.status_code == 400, (path, r.status_code, r.text)
    assert "UID" in r.json()["detail"]


def test_a_valid_path_uid_that_matches_nothing_is_204(archive: Archive) -> None:
    assert _get(archive, "/dicom-web/studies/1.2.3.4.5.6/series").status_code == 204
    assert _get(archive, f"/dicom-web/studies/{MUELLER}/series/1.2.3.4.5.6/instances").status_code == 204
    # An encoded slash whose decoded path is no search resource at all: 404, as for any such path.
    assert _get(archive, "/dicom-web/studies/1.2%2F3/series").status_code == 404


def test_names_come_back_as_utf8_whatever_the_input_charset(archive: Archive) -> None:
    client = archive.server.client(archive.server.facility_url(NORTH_FACILITY))
    names = {m["00100010"]["Value"][0].get("Ideographic") for m in client.search_for_studies()}
    assert "山田^太郎" in names
    assert "王^小東" in names
    german = client.search_for_studies(search_filters={"PatientName": "äneas*"})
    assert german and german[0]["00100010"]["Value"][0]["Alphabetic"] == "Äneas^Rüdiger"
    assert german[0]["00080005"]["Value"] == ["ISO_IR 192"]


@pytest.mark.parametrize(
    "name",
    [
        "山田*",
        "山田^太郎",
        "やまだ^たろう",
        "Yamada^Tarou=山田^太郎",
        "=山田*",
        "==やまだ*",
        "yamada^tarou=*",
    ],
)
def test_a_japanese_name_is_found_by_any_of_its_component_groups(archive: Archive, name: str) -> None:
    # chrH31.dcm, stored in ISO 2022 IR 87: Yamada^Tarou=山田^太郎=やまだ^たろう. A name given in
    # one group matches any group of the stored name; groups separated by '=' match group-wise.
    client = archive.server.client(archive.server.facility_url(NORTH_FACILITY))
    found = client.search_for_studies(search_filters={"PatientName": name})
    assert [m["00100010"]["Value"] for m in found] == [
        [{"Alphabetic": "Yamada^Tarou", "Ideographic": "山田^太郎", "Phonetic": "やまだ^たろう"}]
    ]


def test_names_given_in_another_group_than_the_stored_one_find_nothing(archive: Archive) -> None:
    client = archive.server.client(archive.server.facility_url(NORTH_FACILITY))
    assert (
        client.search_for_studies(search_filters={"PatientName": "=やまだ*"}) == []
    )  # Phonetic, not Ideographic
    assert client.search_for_studies(search_filters={"PatientName": "Wang*=山田*"}) == []


@pytest.mark.parametrize(
    ("referrer", "found"),
    [
        ("山田*", {"JP"}),
        ("やまだ^たろう", {"JP"}),
        ("=山田^太郎", {"JP"}),
        ("yamada*", {"JP"}),  # Latin as before: the Alphabetic group, case-insensitive
        ("SMITH^ANNE", {"LATIN"}),
        ("smith", set()),
    ],
)
def test_a_referring_physician_is_found_by_any_of_its_component_groups(
    live_server: LiveServer, referrer: str, found: set[str]
) -> None:
    """ReferringPhysicianName=山田* finds the study referred by Yamada^Tarou=山田^太郎=やまだ^たろう,
    as PatientName=山田* finds its patient (before: the Alphabetic group alone, so nothing)."""
    parts = []
    referred = {"JP": "Yamada^Tarou=山田^太郎=やまだ^たろう", "LATIN": "Smith^Anne"}
    for n, (pid, name) in enumerate(referred.items()):
        ds = make_ds(sop=f"1.6.{n}.1.1", study=f"1.6.{n}", series=f"1.6.{n}.1", pid=pid)
        ds.ReferringPhysicianName = name
        parts.append(to_bytes(ds))
    body, content_type = multipart_body(parts)
    with live_server.http() as http:
        stored = http.post("/dicom-web/studies", content=body, headers={"Content-Type": content_type})
        assert stored.status_code == 200, stored.text
        r = http.get("/dicom-web/studies", params={"ReferringPhysicianName": referrer})
    assert r.status_code == (200 if found else 204), r.text
    matches = r.json() if found else []
    assert {m["00100020"]["Value"][0] for m in matches} == found
    if "JP" in found:
        assert matches[0]["00080090"]["Value"] == [
            {"Alphabetic": "Yamada^Tarou", "Ideographic": "山田^太郎", "Phonetic": "やまだ^たろう"}
        ]


def test_keys_not_supported_for_matching_are_ignored_with_a_warning(archive: Archive) -> None:
    for query, name in (
        ("InstitutionName=NOWHERE", "InstitutionName"),
        ("RequestAttributesSequence.ScheduledProcedureStepID=1", "RequestAttributesSequence"),
    ):
        r = _get(archive, f"/facilities/local/dicom-web/studies?{query}")
        assert r.status_code == 200, query
        assert len(r.json()) == 3  # ignored, not matched against
        assert r.headers["warning"].startswith(f"299 {archive.server.facility_url('local')}: ")
        assert name in r.headers["warning"]
