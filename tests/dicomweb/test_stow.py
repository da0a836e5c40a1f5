"""STOW-RS against the live broker: dicomweb-client for the happy paths, raw httpx for bad input."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.dataset import Dataset

from broker.dicom import status
from broker.settings import Settings
from tests.conftest import Backend
from tests.dicomweb.conftest import LiveServer, serve
from tests.dicomweb.data import MUELLER, Corpus, multipart_body, split_multipart
from tests.support import TEST_FILES

FAILED_SOP_SEQ = "00081198"
REFERENCED_SOP_SEQ = "00081199"


def _local(corpus: Corpus) -> list:
    return corpus.by_facility()["local"]


def _stored_bytes(server: LiveServer, study: str, series: str, sop: str) -> bytes:
    with server.http() as http:
        r = http.get(
            f"/dicom-web/studies/{study}/series/{series}/instances/{sop}",
            headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
        )
    assert r.status_code == 200, r.text
    ((_headers, data),) = split_multipart(r.headers["content-type"], r.content)
    return data


def _study_count(server: LiveServer) -> int:
    return len(server.client().search_for_studies())


def test_store_through_dicomweb_client_then_retrieve_identical_bytes(
    live_server: LiveServer, corpus: Corpus
) -> None:
    items = _local(corpus)
    client = live_server.client()
    response = client.store_instances([pydicom.dcmread(i.path) for i in items])
    assert isinstance(response, Dataset)
    referenced = response.ReferencedSOPSequence
    assert {r.ReferencedSOPInstanceUID for r in referenced} == {i.sop for i in items}
    assert "FailedSOPSequence" not in response
    for ref in referenced:
        item = corpus.sop(ref.ReferencedSOPInstanceUID)
        assert ref.ReferencedSOPClassUID == item.sop_class
        assert (
            ref.RetrieveURL
            == f"{live_server.url}/studies/{item.study}/series/{item.series}/instances/{item.sop}"
        )
    item = items[0]
    back = client.retrieve_instance(
        item.study, item.series, item.sop, media_types=(("application/dicom", "*"),)
    )
    assert back.SOPInstanceUID == item.sop
    assert back.PixelData == pydicom.dcmread(item.path).PixelData


def test_status_codes_200_202_409_and_failure_reasons(
    live_server: LiveServer, corpus: Corpus, tmp_path: Path
) -> None:
    items = _local(corpus)
    good = items[0].read_bytes()
    not_dicom = b"this is a text file, not a DICOM instance\n" * 10
    with live_server.http() as http:
        body, ctype = multipart_body([good])
        r = http.post("/dicom-web/studies", content=body, headers={"Content-Type": ctype})
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/dicom+json"

        # Some stored, some failed -> 202, each failure reported alone with a PS3.18 reason.
        body, ctype = multipart_body(
            [items[1].read_bytes(), not_dicom, (TEST_FILES / "no_meta.dcm").read_bytes()]
        )
        r = http.post("/dicom-web/studies", content=body, headers={"Content-Type": ctype})
        assert r.status_code == 202, r.text
        payload = r.json()
        assert len(payload[REFERENCED_SOP_SEQ]["Value"]) == 1
        failed = payload[FAILED_SOP_SEQ]["Value"]
        assert len(failed) == 2
        assert [f["00081197"]["Value"] for f in failed] == [[status.CANNOT_UNDERSTAND]] * 2
        assert "instance 2" in r.headers.get("warning", "")

        # None stored -> 409.
        body, ctype = multipart_body([not_dicom])
        r = http.post("/dicom-web/studies", content=body, headers={"Content-Type": ctype})
        assert r.status_code == 409, r.text
        assert r.json()[FAILED_SOP_SEQ]["Value"][0]["00081197"]["Value"] == [status.CANNOT_UNDERSTAND]

        # A part that announces another media type fails alone.
        body, ctype = multipart_body([good], part_type="text/plain")
        r = http.post("/dicom-web/studies", content=body, headers={"Content-Type": ctype})
        assert r.status_code == 409
    assert _study_count(live_server) == 1


def test_duplicate_is_success_and_conflicting_copy_fails_leaving_original(
    live_server: LiveServer, corpus: Corpus, tmp_path: Path
) -> None:
    item = _local(corpus)[0]
    original = item.read_bytes()
    with live_server.http() as http:
        body, ctype = multipart_body([original])
        assert (
            http.post("/dicom-web/studies", content=body, headers={"Content-Type": ctype}).status_code == 200
        )
        before = hashlib.sha256(_stored_bytes(live_server, item.study, item.series, item.sop)).hexdigest()
        assert before == hashlib.sha256(original).hexdigest()  # stored byte for byte
        # The same instance again: stored once, reported as success.
        r = http.post("/dicom-web/studies", content=body, headers={"Content-Type": ctype})
        assert r.status_code == 200
        assert r.json()[REFERENCED_SOP_SEQ]["Value"][0]["00081155"]["Value"] == [item.sop]
        # Same SOP Instance UID, different content: fails, original untouched.
        ds = pydicom.dcmread(item.path)
        ds.StudyDescription = "A different object under the same UID"
        ds.save_as(tmp_path / "conflict.dcm")
        body, ctype = multipart_body([(tmp_path / "conflict.dcm").read_bytes()])
        r = http.post("/dicom-web/studies", content=body, headers={"Content-Type": ctype})
        assert r.status_code == 409, r.text
        assert r.json()[FAILED_SOP_SEQ]["Value"][0]["00081197"]["Value"] == [status.DUPLICATE_SOP_INSTANCE]
    after = hashlib.sha256(_stored_bytes(live_server, item.study, item.series, item.sop)).hexdigest()
    assert after == before
    (match,) = live_server.client().search_for_instances(search_filters={"SOPInstanceUID": item.sop})
    assert match["00080018"]["Value"] == [item.sop]


def test_study_uid_in_url_mismatch_fails_alone(live_server: LiveServer, corpus: Corpus) -> None:
    in_study = [i for i in _local(corpus) if i.study == MUELLER][0]
    other = [i for i in _local(corpus) if i.study != MUELLER][0]
    client = live_server.client()
    with pytest.raises(requests.HTTPError) as err:
        client.store_instances([pydicom.dcmread(other.path)], study_instance_uid=MUELLER)
    assert err.value.response is not None and err.value.response.status_code == 409
    response = client.store_instances(
        [pydicom.dcmread(in_study.path), pydicom.dcmread(other.path)], study_instance_uid=MUELLER
    )
    assert [r.ReferencedSOPInstanceUID for r in response.ReferencedSOPSequence] == [in_study.sop]
    assert [f.ReferencedSOPInstanceUID for f in response.FailedSOPSequence] == [other.sop]
    assert response.FailedSOPSequence[0].FailureReason == status.STUDY_UID_MISMATCH
    assert response.RetrieveURL == f"{live_server.url}/studies/{MUELLER}"
    assert [s["0020000D"]["Value"][0] for s in client.search_for_studies()] == [MUELLER]


def test_wrong_content_type_is_refused_and_nothing_changes(live_server: LiveServer, corpus: Corpus) -> None:
    body, _ = multipart_body([_local(corpus)[0].read_bytes()], boundary="x")
    cases = [
        ("application/dicom", 415),
        ("multipart/form-data; boundary=x", 415),
        ('multipart/related; type="application/dicom+xml"; boundary=x', 415),  # not supported
        ('multipart/related; type="application/dicom"', 400),  # no boundary
        (None, 415),
    ]
    with live_server.http() as http:
        for content_type, code in cases:
            headers = {"Content-Type": content_type} if content_type else {}
            r = http.post("/dicom-web/studies", content=body, headers=headers)
            assert r.status_code == code, (content_type, r.text)
            assert r.json()["detail"]
        assert http.get("/dicom-web/studies").status_code == 204  # still serving, still empty


def test_type_parameter_quoted_or_unquoted_and_any_boundary(live_server: LiveServer, corpus: Corpus) -> None:
    items = _local(corpus)[:2]
    with live_server.http() as http:
        body, _ = multipart_body([items[0].read_bytes()], boundary="a'b()+_,-./:=? odd")
        r = http.post(
            "/dicom-web/studies",
            content=body,
            headers={
                "Content-Type": 'multipart/related; type=application/dicom; boundary="a\'b()+_,-./:=? odd"'
            },
        )
        assert r.status_code == 200, r.text
        body, _ = multipart_body([items[1].read_bytes()], boundary="plain123")
        r = http.post(
            "/dicom-web/studies",
            content=body,
            headers={"Content-Type": 'Multipart/Related; boundary=plain123; TYPE="application/dicom"'},
        )
        assert r.status_code == 200, r.text


def test_broken_multipart_is_400_and_server_keeps_serving(live_server: LiveServer, corpus: Corpus) -> None:
    good = _local(corpus)[0].read_bytes()
    ctype = 'multipart/related; type="application/dicom"; boundary=zz'
    bodies = [
        b"",  # no parts at all
        b"no boundary anywhere in this body",
        b"--zz\r\nContent-Type: application/dicom\r\n\r\n" + good,  # never closed
        b"--zz\r\nContent-Type application/dicom\r\n\r\n" + good + b"\r\n--zz--\r\n",  # bad header line
    ]
    with live_server.http() as http:
        for body in bodies:
            r = http.post("/dicom-web/studies", content=body, headers={"Content-Type": ctype})
            assert r.status_code == 400, (body[:40], r.status_code, r.text)
            assert "multipart" in r.json()["detail"]
        assert http.get("/dicom-web/studies").status_code == 204
        body, ctype = multipart_body([good])
        assert (
            http.post("/dicom-web/studies", content=body, headers={"Content-Type": ctype}).status_code == 200
        )


def test_invalid_study_uid_in_url_is_400(live_server: LiveServer, corpus: Corpus) -> None:
    # The URL's study is a key every instance is checked against; one that is not a UID is bad
    # syntax (PS3.18 Table 10.5.3-1: 400), refused before anything is read or stored.
    body, ctype = multipart_body([_local(corpus)[0].read_bytes()])
    with live_server.http() as http:
        for bad in ("1.2.03", "abc", "1." + "1" * 70, "1..2"):
            r = http.post(f"/dicom-web/studies/{bad}", content=body, headers={"Content-Type": ctype})
            assert r.status_code == 400, (bad, r.status_code, r.text)
            assert "StudyInstanceUID" in r.json()["detail"]
        # Decoded, this is `studies/1.2.3`: an encoded slash is refused, not read as a separator.
        r = http.post("/dicom-web/studies%2F1.2.3", content=body, headers={"Content-Type": ctype})
        assert r.status_code == 400, r.text
        assert "UID" in r.json()["detail"]
        # Decoded, this is no store resource at all: 404, as for any path the service does not have.
        r = http.post(
            "/dicom-web/studies/1.2.3%2F..%2F..%2Fetc", content=body, headers={"Content-Type": ctype}
        )
        assert r.status_code == 404, r.text
        assert http.get("/dicom-web/studies").status_code == 204


def test_facility_partition_and_default_facility(live_server: LiveServer, corpus: Corpus) -> None:
    local_item, other = _local(corpus)[0], corpus.by_facility()["north"][0]
    with live_server.http() as http:
        body, ctype = multipart_body([other.read_bytes()])
        r = http.post("/facilities/north/dicom-web/studies", content=body, headers={"Content-Type": ctype})
        assert r.status_code == 404  # no such facility yet
        assert http.post("/api/facilities", json={"id": "north", "issuer": "NORTH"}).status_code == 201
        r = http.post("/facilities/north/dicom-web/studies", content=body, headers={"Content-Type": ctype})
        assert r.status_code == 200, r.text
        assert r.json()[REFERENCED_SOP_SEQ]["Value"][0]["00081190"]["Value"][0].startswith(
            f"{live_server.origin}/facilities/north/dicom-web/studies/"
        )
        body, ctype = multipart_body([local_item.read_bytes()])
        assert (
            http.post("/dicom-web/studies", content=body, headers={"Content-Type": ctype}).status_code == 200
        )
    fed = {s["0020000D"]["Value"][0] for s in live_server.client().search_for_studies()}
    north = {
        s["0020000D"]["Value"][0]
        for s in live_server.client(live_server.facility_url("north")).search_for_studies()
    }
    local = {
        s["0020000D"]["Value"][0]
        for s in live_server.client(live_server.facility_url("local")).search_for_studies()
    }
    assert fed == {other.study, local_item.study}
    assert north == {other.study}
    assert local == {local_item.study}  # /dicom-web stores into the default facility


def test_part_above_the_limit_is_413(backend: Backend, tmp_path: Path, corpus: Corpus) -> None:
    settings = Settings(
        data_dir=tmp_path / "d",
        database_url=backend.database_url,
        storage_url=backend.storage_url,
        max_part_bytes=4096,
    )
    big = _local(corpus)[0].read_bytes()
    assert len(big) > 4096
    with serve(settings) as server, server.http() as http:
        body, ctype = multipart_body([big])
        r = http.post("/dicom-web/studies", content=body, headers={"Content-Type": ctype})
        assert r.status_code == 413
        assert "4096" in r.json()["detail"]
        assert http.get("/dicom-web/studies").status_code == 204


def test_truncated_files_fail_alone(live_server: LiveServer, corpus: Corpus) -> None:
    good = _local(corpus)[0].read_bytes()
    parts = [good[: len(good) // 2], (TEST_FILES / "MR_truncated.dcm").read_bytes()]
    with live_server.http() as http:
        body, ctype = multipart_body(parts)
        r = http.post("/dicom-web/studies", content=body, headers={"Content-Type": ctype})
        assert r.status_code == 409, r.text
        failed = r.json()[FAILED_SOP_SEQ]["Value"]
        assert [f["00081197"]["Value"] for f in failed] == [[status.CANNOT_UNDERSTAND]] * 2
        assert http.get("/dicom-web/studies").status_code == 204


def test_concurrent_stores_of_the_same_and_different_instances(
    live_server: LiveServer, corpus: Corpus
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    items = _local(corpus)
    bodies = [multipart_body([i.read_bytes()]) for i in items] * 2  # every instance sent twice at once

    def post(body_ctype: tuple[bytes, str]) -> int:
        with live_server.http() as http:
            body, ctype = body_ctype
            return http.post("/dicom-web/studies", content=body, headers={"Content-Type": ctype}).status_code

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(post, bodies))
    assert codes == [200] * len(bodies)
    assert len(live_server.client().search_for_instances()) == len(items)


def test_hash_taken_while_receiving_does_not_depend_on_how_the_body_is_split(
    live_server: LiveServer, corpus: Corpus
) -> None:
    """Each part is hashed while it is written to disk (never read back to hash it): a body
    sent in small uneven pieces and the same body in one piece give the same content address,
    so the second store is a duplicate (success), not a conflicting copy; a part of another
    study than the URL's still fails alone."""
    items = _local(corpus)
    in_study = [i for i in items if i.study == MUELLER]
    other = [i for i in items if i.study != MUELLER][0]
    body, ctype = multipart_body([i.read_bytes() for i in in_study] + [other.read_bytes()])

    def pieces() -> Iterator[bytes]:
        at, step = 0, 1
        while at < len(body):
            yield body[at : at + step]
            at += step
            step = step * 3 % 4093 + 1  # 1, 4, 13, 40, ...: splits land anywhere, boundaries too

    url = f"/dicom-web/studies/{MUELLER}"
    with live_server.http() as http:
        first = http.post(url, content=pieces(), headers={"Content-Type": ctype})
        assert first.status_code == 202, first.text
        again = http.post(url, content=body, headers={"Content-Type": ctype})
        assert again.status_code == 202, again.text
    for r in (first, again):
        assert [f["00081155"]["Value"][0] for f in r.json()[FAILED_SOP_SEQ]["Value"]] == [other.sop]
        stored = r.json()[REFERENCED_SOP_SEQ]["Value"]
        assert sorted(s["00081155"]["Value"][0] for s in stored) == sorted(i.sop for i in in_study)
    for i in in_study:
        stored_bytes = _stored_bytes(live_server, i.study, i.series, i.sop)
        assert hashlib.sha256(stored_bytes).digest() == hashlib.sha256(i.read_bytes()).digest()
    (match,) = live_server.client().search_for_studies()
    assert match["00201208"]["Value"] == [len(in_study)]  # stored once each
