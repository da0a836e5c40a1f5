"""STOW-RS of DICOM JSON metadata with bulk data parts (PS3.18 10.5.1.2: multipart/related;
type="application/dicom+json"): stored as a Part 10 instance, answered like the Part 10 path."""

from __future__ import annotations

import io
import secrets
from typing import Any

import httpx
import orjson
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from broker.dicom import status
from tests.dicomweb.conftest import LiveServer
from tests.dicomweb.data import multipart_body, split_multipart
from tests.support import TEST_FILES

FAILED_SOP_SEQ = "00081198"
REFERENCED_SOP_SEQ = "00081199"


def _dataset() -> Dataset:
    ds = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = (generate_uid() for _ in range(3))
    ds.PatientName = "Jsön^Bülk"
    ds.PatientID = "JSON-1"
    return ds


def _metadata(ds: Dataset, uri: str) -> dict[str, Any]:
    """The dataset as DICOM JSON, its pixel data by reference to a bulk data part."""
    return ds.to_json_dict(bulk_data_threshold=1024, bulk_data_element_handler=lambda _elem: uri)


def _body(metadata: Any, bulk: dict[str, bytes], *, raw: bytes | None = None) -> tuple[bytes, str]:
    boundary = f"j-{secrets.token_hex(6)}"
    out = [f"--{boundary}\r\nContent-Type: application/dicom+json\r\n\r\n".encode()]
    out.append((raw if raw is not None else orjson.dumps(metadata)) + b"\r\n")
    for location, data in bulk.items():
        head = (
            f"--{boundary}\r\nContent-Type: application/octet-stream\r\nContent-Location: {location}\r\n\r\n"
        )
        out.append(head.encode())
        out.append(data + b"\r\n")
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out), f'multipart/related; type="application/dicom+json"; boundary={boundary}'


def _post(server: LiveServer, body: bytes, ctype: str, path: str = "/dicom-web/studies") -> httpx.Response:
    with server.http() as http:
        return http.post(
            path, content=body, headers={"Content-Type": ctype, "Accept": "application/dicom+json"}
        )


def _retrieve(server: LiveServer, ds: Dataset) -> Dataset:
    with server.http() as http:
        r = http.get(
            f"/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}",
            headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
        )
    assert r.status_code == 200, r.text
    ((_headers, data),) = split_multipart(r.headers["content-type"], r.content)
    return pydicom.dcmread(io.BytesIO(data))


def test_json_metadata_with_bulk_pixel_data_is_stored_as_a_part10_instance(live_server: LiveServer) -> None:
    ds = _dataset()
    uri = f"http://client.example/bulk/{secrets.token_hex(4)}"
    body, ctype = _body([_metadata(ds, uri)], {uri: ds.PixelData})
    r = _post(live_server, body, ctype)
    assert r.status_code == 200, r.text
    (ref,) = r.json()[REFERENCED_SOP_SEQ]["Value"]
    assert ref["00081155"]["Value"] == [ds.SOPInstanceUID]
    assert ref["00081150"]["Value"] == [ds.SOPClassUID]
    assert ref["00081190"]["Value"] == [
        f"{live_server.url}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
    ]

    back = _retrieve(live_server, ds)
    assert back.PixelData == ds.PixelData
    assert str(back.PatientName) == "Jsön^Bülk"
    assert back.Rows == ds.Rows and back.SOPClassUID == ds.SOPClassUID
    assert back.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert back.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"  # octet-stream bulk: native
    found = live_server.client().search_for_studies(search_filters={"PatientID": "JSON-1"})
    assert [f["0020000D"]["Value"][0] for f in found] == [ds.StudyInstanceUID]

    # The same request again is the same object: a duplicate, which is a success.
    r = _post(live_server, body, ctype)
    assert r.status_code == 200, r.text
    assert not list((live_server.settings.data_dir / "spool").iterdir())  # parts and made files gone


def test_a_missing_bulk_part_fails_that_instance_alone(live_server: LiveServer) -> None:
    good, orphan = _dataset(), _dataset()
    body, ctype = _body(
        [_metadata(good, "bulk/1"), _metadata(orphan, "bulk/missing")], {"bulk/1": good.PixelData}
    )
    r = _post(live_server, body, ctype)
    assert r.status_code == 202, r.text
    (failed,) = r.json()[FAILED_SOP_SEQ]["Value"]
    assert failed["00081155"]["Value"] == [orphan.SOPInstanceUID]
    assert failed["00081197"]["Value"] == [status.CANNOT_UNDERSTAND]
    assert "bulk" in r.headers["warning"]
    (stored,) = r.json()[REFERENCED_SOP_SEQ]["Value"]
    assert stored["00081155"]["Value"] == [good.SOPInstanceUID]
    instances = live_server.client().search_for_instances()
    assert [i["00080018"]["Value"][0] for i in instances] == [good.SOPInstanceUID]


def test_bad_json_is_a_failure_and_stores_nothing(live_server: LiveServer) -> None:
    for raw in (b"[{not json", b'{"00100010": 5}', b'[{"00080018": {"vr": "UI", "Value": [1, 2]}, "x": 1}]'):
        body, ctype = _body(None, {}, raw=raw)
        r = _post(live_server, body, ctype)
        assert r.status_code == 409, (raw, r.text)
        failed = r.json()[FAILED_SOP_SEQ]["Value"]
        assert [f["00081197"]["Value"] for f in failed] == [[status.CANNOT_UNDERSTAND]]
    with live_server.http() as http:
        assert http.get("/dicom-web/studies").status_code == 204


def test_a_dataset_without_its_uids_fails_like_a_part10_one(live_server: LiveServer) -> None:
    ds = _dataset()
    meta = _metadata(ds, "b")
    del meta["00080018"]  # SOPInstanceUID
    body, ctype = _body([meta], {"b": ds.PixelData})
    r = _post(live_server, body, ctype)
    assert r.status_code == 409, r.text
    (failed,) = r.json()[FAILED_SOP_SEQ]["Value"]
    assert failed["00081197"]["Value"] == [status.DATASET_DOES_NOT_MATCH_SOP_CLASS]


def test_the_study_in_the_url_is_checked_as_for_part10(live_server: LiveServer) -> None:
    ds = _dataset()
    body, ctype = _body([_metadata(ds, "b")], {"b": ds.PixelData})
    r = _post(live_server, body, ctype, path=f"/dicom-web/studies/{generate_uid()}")
    assert r.status_code == 409, r.text
    (failed,) = r.json()[FAILED_SOP_SEQ]["Value"]
    assert failed["00081197"]["Value"] == [status.STUDY_UID_MISMATCH]


def test_dicom_xml_is_not_accepted(live_server: LiveServer) -> None:
    body, _ = multipart_body([b"<NativeDicomModel/>"], part_type="application/dicom+xml")
    r = _post(live_server, body, 'multipart/related; type="application/dicom+xml"; boundary=x')
    assert r.status_code == 415, r.text


def test_compressed_pixel_data_is_encapsulated_under_its_declared_transfer_syntax(
    live_server: LiveServer,
) -> None:
    from pydicom.encaps import generate_frames

    src = pydicom.dcmread(TEST_FILES / "SC_rgb_jpeg_dcmtk.dcm")
    ts = str(src.file_meta.TransferSyntaxUID)
    (frame,) = list(generate_frames(src.PixelData, number_of_frames=1))
    src.StudyInstanceUID, src.SeriesInstanceUID, src.SOPInstanceUID = (generate_uid() for _ in range(3))
    meta = src.to_json_dict(bulk_data_threshold=1024, bulk_data_element_handler=lambda _e: "px")

    def body(content_type: str) -> tuple[bytes, str]:
        boundary = f"c-{secrets.token_hex(6)}"
        data = b"".join(
            [
                f"--{boundary}\r\nContent-Type: application/dicom+json\r\n\r\n".encode(),
                orjson.dumps([meta]) + b"\r\n",
                f"--{boundary}\r\nContent-Type: {content_type}\r\nContent-Location: px\r\n\r\n".encode(),
                frame + b"\r\n",
                f"--{boundary}--\r\n".encode(),
            ]
        )
        return data, f'multipart/related; type="application/dicom+json"; boundary={boundary}'

    r = _post(live_server, *body("image/jpeg"))  # no transfer-syntax: which one is unknown
    assert r.status_code == 409, r.text
    (failed,) = r.json()[FAILED_SOP_SEQ]["Value"]
    assert failed["00081197"]["Value"] == [status.TRANSFER_SYNTAX_NOT_SUPPORTED]

    r = _post(live_server, *body(f"image/jpeg; transfer-syntax={ts}"))
    assert r.status_code == 200, r.text
    back = _retrieve(live_server, src)
    assert back.file_meta.TransferSyntaxUID == ts
    assert list(generate_frames(back.PixelData, number_of_frames=1)) == [frame]
