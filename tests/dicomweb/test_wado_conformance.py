"""WADO-RS conformance details (issue 12): UIDs in paths, mixed transfer syntaxes, metadata as
PS3.19 XML, Range and HEAD, CORS.

One broker per module (SQLite + local folder: negotiation does not depend on the backend) holds
one study whose instances are stored in four transfer syntaxes, two of them lossy.
"""

from __future__ import annotations

import hashlib
import io
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from broker.settings import Settings
from tests.dicomweb.conftest import LiveServer, serve
from tests.dicomweb.data import multipart_body, relabel, split_multipart, uid
from tests.support import TEST_FILES

EXPLICIT_LE = "1.2.840.10008.1.2.1"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
J2K = "1.2.840.10008.1.2.4.91"
J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"
NS = "{http://dicom.nema.org/PS3.19/models/NativeDICOM}"

STUDY = uid(20)
NATIVE = (uid(20, 1), uid(20, 1, 1))  # (series, sop): CT, Explicit VR Little Endian
LOSSLESS = (uid(20, 1), uid(20, 1, 2))  # MR, JPEG 2000 lossless
BASELINE = (uid(20, 2), uid(20, 2, 1))  # SC, JPEG baseline (lossy)
LOSSY_J2K = (uid(20, 2), uid(20, 2, 2))  # SC, JPEG 2000 (lossy)
ECG_STUDY = uid(21)
ECG = (uid(21, 1), uid(21, 1, 1))  # 12-lead ECG: bulk data inside a sequence


@dataclass
class Mixed:
    server: LiveServer
    files: dict[str, Path]  # SOP Instance UID -> the file as sent

    def get(self, path: str, **headers: str) -> httpx.Response:
        with self.server.http() as http:
            return http.get(path, headers=headers)

    def request(self, method: str, path: str, **headers: str) -> httpx.Response:
        with self.server.http() as http:
            return http.request(method, path, headers=headers)


def _instance(series_sop: tuple[str, str]) -> str:
    series, sop = series_sop
    return f"/dicom-web/studies/{STUDY}/series/{series}/instances/{sop}"


def _build(folder: Path) -> dict[str, Path]:
    common = dict(
        PatientName="Müller^Hans^Peter^Dr^III=ミュラー^ハンス",
        PatientID="PID-20",
        SpecificCharacterSet="ISO_IR 192",
        StudyDate="20230301",
        AccessionNumber="ACC-20",
    )
    referenced = Dataset()
    referenced.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    referenced.ReferencedSOPInstanceUID = uid(20, 99)
    sources: list[tuple[str, tuple[str, str], dict[str, Any]]] = [
        ("CT_small.dcm", NATIVE, {"ReferencedStudySequence": Sequence([referenced])}),
        ("MR_small_jp2klossless.dcm", LOSSLESS, {"InstanceNumber": 2}),
        ("SC_rgb_jpeg_dcmtk.dcm", BASELINE, {"InstanceNumber": 1}),
        ("JPEG2000.dcm", LOSSY_J2K, {"InstanceNumber": 2}),
    ]
    out = {}
    for name, (series, sop), extra in sources:
        dst = folder / f"{sop}.dcm"
        relabel(
            TEST_FILES / name,
            dst,
            StudyInstanceUID=STUDY,
            SeriesInstanceUID=series,
            SOPInstanceUID=sop,
            **common,
            **extra,
        )
        out[sop] = dst
    ecg = folder / "ecg.dcm"
    relabel(
        TEST_FILES / "waveform_ecg.dcm",
        ecg,
        StudyInstanceUID=ECG_STUDY,
        SeriesInstanceUID=ECG[0],
        SOPInstanceUID=ECG[1],
        PatientName="Ecg^Test",
        PatientID="PID-21",
    )
    out[ECG[1]] = ecg
    return out


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mixed]:
    tmp = tmp_path_factory.mktemp("mixed")
    files = _build(tmp)
    settings = Settings(
        data_dir=tmp / "data",
        database_url=f"sqlite:///{tmp / 'index.sqlite3'}",
        storage_url=(tmp / "objects").as_uri(),
        cors_origins=["https://viewer.example"],
    )
    with serve(settings) as server:
        body, ctype = multipart_body([p.read_bytes() for p in files.values()])
        with server.http() as http:
            r = http.post("/dicom-web/studies", content=body, headers={"Content-Type": ctype})
            assert r.status_code == 200, r.text
        yield Mixed(server, files)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------ 1. UIDs in paths


@pytest.mark.parametrize(
    "path",
    [
        # Decoded, these would name other, existing resources (the series, the instance's frames).
        f"/dicom-web/studies/{STUDY}%2Fseries%2F{NATIVE[0]}",
        f"/dicom-web/studies/{STUDY}/series/{NATIVE[0]}%2Finstances%2F{NATIVE[1]}/metadata",
        f"/dicom-web/studies/{STUDY}/series/{NATIVE[0]}/instances/{NATIVE[1]}%2Fframes%2F1/rendered",
        "/dicom-web/studies/abc/metadata",
        "/dicom-web/studies/1.2.03",
        f"/dicom-web/studies/{'1' * 65}/rendered",
        f"/dicom-web/studies/{STUDY}/series/{NATIVE[0]}/instances/1..2/frames/1",
    ],
)
def test_a_uid_that_cannot_exist_is_a_resource_that_does_not_exist(mixed: Mixed, path: str) -> None:
    for method in ("GET", "HEAD"):
        r = mixed.request(method, path)
        assert r.status_code == 404, (method, path, r.status_code, r.text)
    assert "UID" in mixed.get(path).json()["detail"]


@pytest.mark.parametrize(
    "path",
    [
        "/dicom-web/studies/1.2%2F3",
        "/dicom-web/studies/1.2%2F3/metadata",
        f"/dicom-web/studies/{STUDY}/series/..%2F..%2Fetc/metadata",
        f"/dicom-web/studies/{STUDY}/series/{NATIVE[0]}/instances/1.2%2F3/frames/1",
    ],
)
def test_an_encoded_slash_that_names_no_route_is_404(mixed: Mixed, path: str) -> None:
    assert mixed.get(path).status_code == 404


# ---------------------------------------------------------------- 2. mixed transfer syntaxes


def test_default_retrieve_of_a_mixed_study_sends_lossy_instances_as_stored(mixed: Mixed) -> None:
    for accept in ('multipart/related; type="application/dicom"', "*/*", None):
        headers = {"Accept": accept} if accept else {}
        r = mixed.get(f"/dicom-web/studies/{STUDY}", **headers)
        assert r.status_code == 200, (accept, r.status_code, r.text)
        parts = split_multipart(r.headers["content-type"], r.content)
        got = {pydicom.dcmread(io.BytesIO(d)).SOPInstanceUID: (h, d) for h, d in parts}
        assert set(got) == set(mixed.files) - {ECG[1]}
        # Lossless instances become Explicit VR Little Endian (the default) without changing a pixel.
        for series_sop in (NATIVE, LOSSLESS):
            headers_, data = got[series_sop[1]]
            assert headers_["content-type"] == f"application/dicom; transfer-syntax={EXPLICIT_LE}"
            sent = pydicom.dcmread(io.BytesIO(data))
            assert str(sent.file_meta.TransferSyntaxUID) == EXPLICIT_LE
            original = pydicom.dcmread(mixed.files[series_sop[1]])
            assert np.array_equal(sent.pixel_array, original.pixel_array)
        # Lossy instances come as they were received (PS3.18 8.7.3.4), byte for byte.
        for series_sop, ts in ((BASELINE, JPEG_BASELINE), (LOSSY_J2K, J2K)):
            headers_, data = got[series_sop[1]]
            assert headers_["content-type"] == f"application/dicom; transfer-syntax={ts}"
            assert _sha(data) == _sha(mixed.files[series_sop[1]].read_bytes())
        assert "warning" not in r.headers


def test_a_transfer_syntax_some_instances_cannot_have_returns_the_others_with_a_warning(
    mixed: Mixed,
) -> None:
    accept = f'multipart/related; type="application/dicom"; transfer-syntax={EXPLICIT_LE}'
    r = mixed.get(f"/dicom-web/studies/{STUDY}", Accept=accept)
    assert r.status_code == 206, r.text
    parts = split_multipart(r.headers["content-type"], r.content)
    sent = {pydicom.dcmread(io.BytesIO(d)).SOPInstanceUID for _, d in parts}
    assert sent == {NATIVE[1], LOSSLESS[1]}
    assert all(h["content-type"].endswith(EXPLICIT_LE) for h, _ in parts)
    warning = r.headers["warning"]
    assert warning.startswith("299 ")
    assert BASELINE[1] in warning and LOSSY_J2K[1] in warning
    # Only the JPEG baseline instance is stored in JPEG baseline: that one alone, 206.
    accept = f'multipart/related; type="application/dicom"; transfer-syntax={JPEG_BASELINE}'
    r = mixed.get(f"/dicom-web/studies/{STUDY}", Accept=accept)
    assert r.status_code == 206
    ((_, data),) = split_multipart(r.headers["content-type"], r.content)
    assert _sha(data) == _sha(mixed.files[BASELINE[1]].read_bytes())
    # A series that has it all is a plain 200; one that has none of it is 406.
    r = mixed.get(
        f"/dicom-web/studies/{STUDY}/series/{NATIVE[0]}", Accept=accept.replace(JPEG_BASELINE, EXPLICIT_LE)
    )
    assert r.status_code == 200
    assert "warning" not in r.headers
    r = mixed.get(f"/dicom-web/studies/{STUDY}/series/{NATIVE[0]}", Accept=accept)
    assert r.status_code == 406
    # A better alternative later in the Accept header wins over a partial first choice.
    r = mixed.get(
        f"/dicom-web/studies/{STUDY}", Accept=f"{accept}, {accept.replace(JPEG_BASELINE, '*')}; q=0.5"
    )
    assert r.status_code == 200
    assert len(split_multipart(r.headers["content-type"], r.content)) == 4


# ------------------------------------------------------------------- 3. metadata as PS3.19 XML


def _xml_parts(r: httpx.Response) -> list[ET.Element]:
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith('multipart/related; type="application/dicom+xml"')
    parts = split_multipart(r.headers["content-type"], r.content)
    for headers, _ in parts:
        assert headers["content-type"] == "application/dicom+xml"
    return [ET.fromstring(data) for _, data in parts]


def _attr(root: ET.Element, tag: str) -> ET.Element:
    (found,) = [a for a in root.findall(f"{NS}DicomAttribute") if a.get("tag") == tag]
    return found


def test_metadata_as_native_dicom_model_xml(mixed: Mixed) -> None:
    accept = 'multipart/related; type="application/dicom+xml"'
    roots = _xml_parts(mixed.get(f"/dicom-web/studies/{STUDY}/metadata", Accept=accept))
    assert len(roots) == 4
    assert all(root.tag == f"{NS}NativeDicomModel" for root in roots)
    sops = {_attr(root, "00080018").find(f"{NS}Value").text for root in roots}  # type: ignore[union-attr]
    assert sops == set(mixed.files) - {ECG[1]}

    (ct,) = _xml_parts(mixed.get(_instance(NATIVE) + "/metadata", Accept=accept))
    tags = [a.get("tag", "") for a in ct.findall(f"{NS}DicomAttribute")]
    assert tags == sorted(tags)  # PS3.19: attributes in ascending tag order
    sop = _attr(ct, "00080018")
    assert (sop.get("vr"), sop.get("keyword")) == ("UI", "SOPInstanceUID")
    assert [(v.get("number"), v.text) for v in sop.findall(f"{NS}Value")] == [("1", NATIVE[1])]
    # Multi-valued numbers, numbered from 1.
    spacing = _attr(ct, "00280030")
    assert spacing.get("vr") == "DS"
    original = pydicom.dcmread(mixed.files[NATIVE[1]])
    values = spacing.findall(f"{NS}Value")
    assert [v.get("number") for v in values] == ["1", "2"]
    assert [float(v.text or "") for v in values] == [float(x) for x in original.PixelSpacing]
    # Person name: component groups and components (PS3.19 A.1.5).
    name = _attr(ct, "00100010")
    assert (name.get("vr"), name.get("keyword")) == ("PN", "PatientName")
    (pn,) = name.findall(f"{NS}PersonName")
    assert pn.get("number") == "1"
    alphabetic = pn.find(f"{NS}Alphabetic")
    assert alphabetic is not None
    assert [(c.tag.removeprefix(NS), c.text) for c in alphabetic] == [
        ("FamilyName", "Müller"),
        ("GivenName", "Hans"),
        ("MiddleName", "Peter"),
        ("NamePrefix", "Dr"),
        ("NameSuffix", "III"),
    ]
    ideographic = pn.find(f"{NS}Ideographic")
    assert ideographic is not None
    assert ideographic.findtext(f"{NS}FamilyName") == "ミュラー"
    # Sequences: numbered items holding attributes.
    seq = _attr(ct, "00081110")
    assert seq.get("vr") == "SQ"
    (item,) = seq.findall(f"{NS}Item")
    assert item.get("number") == "1"
    assert _attr(item, "00081155").findtext(f"{NS}Value") == uid(20, 99)
    # Bulk data by reference, to the same URI as in the JSON model.
    pixel = _attr(ct, "7FE00010")
    bulk = pixel.find(f"{NS}BulkData")
    assert bulk is not None
    as_json = mixed.get(_instance(NATIVE) + "/metadata").json()[0]
    assert bulk.get("uri") == as_json["7FE00010"]["BulkDataURI"]
    # Private attributes carry their creator and no keyword.
    private = [a for a in ct.findall(f"{NS}DicomAttribute") if a.get("tag", "").startswith("00091")]
    assert private
    assert all(a.get("privateCreator") and a.get("keyword") is None for a in private)
    # And the XML agrees with the JSON model on every top-level attribute present.
    assert set(tags) == set(as_json)


def test_metadata_xml_unacceptable_and_json_still_default(mixed: Mixed) -> None:
    path = f"/dicom-web/studies/{STUDY}/metadata"
    assert mixed.get(path, Accept="application/dicom+xml").status_code == 406  # single part is not defined
    assert mixed.get(path, Accept="text/html").status_code == 406
    r = mixed.get(path, Accept="application/dicom+json")
    assert r.headers["content-type"] == "application/dicom+json"
    assert len(r.json()) == 4


def test_bulk_data_inside_a_sequence_is_served_from_its_uri(mixed: Mixed) -> None:
    original = pydicom.dcmread(mixed.files[ECG[1]])
    (meta,) = mixed.get(f"/dicom-web/studies/{ECG_STUDY}/metadata").json()
    uris = [item["54001010"]["BulkDataURI"] for item in meta["54000100"]["Value"]]
    assert len(uris) == len(original.WaveformSequence) == 2
    for uri, item in zip(uris, original.WaveformSequence, strict=True):
        r = mixed.get(uri.removeprefix(mixed.server.origin), Accept="application/octet-stream")
        assert r.status_code == 200, r.text
        assert r.content == item.WaveformData
        client_parts = mixed.server.client().retrieve_bulkdata(uri)
        assert client_parts == [item.WaveformData]
    # The same reference in the XML model.
    (root,) = _xml_parts(
        mixed.get(
            f"/dicom-web/studies/{ECG_STUDY}/metadata",
            Accept='multipart/related; type="application/dicom+xml"',
        )
    )
    items = _attr(root, "54000100").findall(f"{NS}Item")
    assert [i.get("number") for i in items] == ["1", "2"]
    bulk = _attr(items[1], "54001010").find(f"{NS}BulkData")
    assert bulk is not None and bulk.get("uri") == uris[1]
    # Paths that name no value: an item past the end, a tag that is not a sequence.
    base = _instance(ECG).replace(STUDY, ECG_STUDY) + "/bulk"
    for path in ("54000100/3/54001010", "00100010/1/54001010", "54000100/1/00091234"):
        assert mixed.get(f"{base}/{path}").status_code == 404, path
    # Malformed paths, item 0 among them: items are numbered from 1, as frames are.
    for path in ("54000100/x/54001010", "54000100/1", "54000100//54001010", "54000100/1/5400101"):
        assert mixed.get(f"{base}/{path}").status_code == 400, path
    assert mixed.get(f"{base}/54000100/0/54001010").status_code == 400


# ------------------------------------------------------------------------------- 4. Range, HEAD


def test_single_part_bulk_data_serves_byte_ranges(mixed: Mixed) -> None:
    pixels = pydicom.dcmread(mixed.files[NATIVE[1]]).PixelData
    path = _instance(NATIVE) + "/bulk/7FE00010"
    whole = mixed.get(path, Accept="application/octet-stream")
    assert whole.status_code == 200
    assert whole.headers["content-type"] == "application/octet-stream"
    assert whole.headers["accept-ranges"] == "bytes"
    assert whole.content == pixels
    r = mixed.get(path, Accept="application/octet-stream", Range="bytes=10-19")
    assert r.status_code == 206
    assert r.headers["content-range"] == f"bytes 10-19/{len(pixels)}"
    assert r.content == pixels[10:20]
    r = mixed.get(path, Accept="application/octet-stream", Range="bytes=-5")
    assert (r.status_code, r.content) == (206, pixels[-5:])
    r = mixed.get(path, Accept="application/octet-stream", Range=f"bytes={len(pixels) - 3}-")
    assert (r.status_code, r.content) == (206, pixels[-3:])
    r = mixed.get(path, Accept="application/octet-stream", Range=f"bytes={len(pixels)}-")
    assert r.status_code == 416
    assert r.headers["content-range"] == f"bytes */{len(pixels)}"
    # Several ranges, or a unit we do not know: the whole body (a server may ignore Range).
    for value in ("bytes=0-1,5-6", "pages=1-2", "bytes=x-y", "bytes=9-3", "bytes=-"):
        r = mixed.get(path, Accept="application/octet-stream", Range=value)
        assert (r.status_code, r.content) == (200, pixels), value
    # HEAD ignores Range (RFC 9110 14.2), and so does a Range under If-Range (no validator here).
    head = mixed.request("HEAD", path, Accept="application/octet-stream", Range="bytes=0-9")
    assert (head.status_code, head.headers["content-length"]) == (200, str(len(pixels)))
    r = mixed.get(path, Accept="application/octet-stream", Range="bytes=0-9", **{"If-Range": '"x"'})
    assert (r.status_code, r.content) == (200, pixels)
    # The multipart form ignores Range: its body is not a single representation of the value.
    r = mixed.get(path, Range="bytes=0-9")
    assert r.status_code == 200
    ((_, data),) = split_multipart(r.headers["content-type"], r.content)
    assert data == pixels


def test_single_part_instance_and_rendered_serve_byte_ranges(mixed: Mixed) -> None:
    stored = mixed.files[BASELINE[1]].read_bytes()
    r = mixed.get(_instance(BASELINE), Accept="application/dicom; transfer-syntax=*")
    assert r.status_code == 200
    assert r.headers["content-type"] == f"application/dicom; transfer-syntax={JPEG_BASELINE}"
    assert r.content == stored
    r = mixed.get(_instance(BASELINE), Accept="application/dicom; transfer-syntax=*", Range="bytes=128-131")
    assert (r.status_code, r.content) == (206, b"DICM")
    assert r.headers["content-range"] == f"bytes 128-131/{len(stored)}"
    rendered = mixed.get(_instance(NATIVE) + "/rendered", Accept="image/png")
    part = mixed.get(_instance(NATIVE) + "/rendered", Accept="image/png", Range="bytes=0-7")
    assert (part.status_code, part.content) == (206, rendered.content[:8])
    assert part.content == b"\x89PNG\r\n\x1a\n"
    assert Image.open(io.BytesIO(rendered.content)).format == "PNG"


@pytest.mark.parametrize(
    "path",
    [
        f"/dicom-web/studies/{STUDY}",
        f"/dicom-web/studies/{STUDY}/metadata",
        _instance(NATIVE) + "/bulk/7FE00010",
        _instance(NATIVE) + "/frames/1",
        _instance(NATIVE) + "/rendered",
        f"/dicom-web/studies/{STUDY}/thumbnail",
    ],
)
def test_head_answers_the_headers_of_get_without_a_body(mixed: Mixed, path: str) -> None:
    got = mixed.get(path)
    head = mixed.request("HEAD", path)
    assert got.status_code == 200
    assert head.status_code == 200, head.text
    assert head.content == b""
    assert (
        head.headers["content-type"].split("boundary=")[0]
        == got.headers["content-type"].split("boundary=")[0]
    )
    if "content-length" in got.headers:
        assert head.headers["content-length"] == got.headers["content-length"]
    missing = path.replace(STUDY, uid(20, 404))
    assert mixed.request("HEAD", missing).status_code == 404


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", f"/dicom-web/studies/{STUDY}/bulkdata", 404),  # a resource the service does not have
        ("GET", "/dicom-web/no-such-thing", 404),
        ("DELETE", f"/dicom-web/studies/{STUDY}/metadata", 405),
        ("PUT", "/dicom-web/studies", 405),
    ],
)
def test_errors_of_paths_and_methods_carry_the_documented_body(
    mixed: Mixed, method: str, path: str, status: int
) -> None:
    # docs/conformance.md 2.9: errors carry {"error": title, "detail": message}.
    r = mixed.request(method, path)
    assert r.status_code == status
    body = r.json()
    assert set(body) == {"error", "detail"}, body
    assert body["error"] and body["detail"]
    if status == 405:
        assert "GET" in r.headers["allow"] or "POST" in r.headers["allow"]


# -------------------------------------------------------------------------------------- 5. CORS


def test_cors_for_the_configured_origin(mixed: Mixed) -> None:
    path = f"/dicom-web/studies/{STUDY}/metadata"
    pre = mixed.request(
        "OPTIONS",
        path,
        Origin="https://viewer.example",
        **{"Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "accept, range"},
    )
    assert pre.status_code == 200
    assert pre.headers["access-control-allow-origin"] == "https://viewer.example"
    assert "GET" in pre.headers["access-control-allow-methods"]
    assert "range" in pre.headers["access-control-allow-headers"].lower()
    r = mixed.get(path, Origin="https://viewer.example")
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "https://viewer.example"
    exposed = {h.strip().lower() for h in r.headers["access-control-expose-headers"].split(",")}
    assert {"content-type", "content-length", "content-range", "warning"} <= exposed
    other = mixed.get(path, Origin="https://elsewhere.example")
    assert "access-control-allow-origin" not in other.headers
    refused = mixed.request(
        "OPTIONS", path, Origin="https://elsewhere.example", **{"Access-Control-Request-Method": "GET"}
    )
    assert "access-control-allow-origin" not in refused.headers


def test_no_cors_headers_by_default(live_server: LiveServer) -> None:
    assert live_server.settings.cors_origins == []
    with live_server.http() as http:
        r = http.get("/dicom-web/studies", headers={"Origin": "https://viewer.example"})
        assert "access-control-allow-origin" not in r.headers
        pre = http.options(
            "/dicom-web/studies",
            headers={"Origin": "https://viewer.example", "Access-Control-Request-Method": "GET"},
        )
        assert "access-control-allow-origin" not in pre.headers


def test_cors_wildcard(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", cors_origins=["*"])
    with serve(settings) as server, server.http() as http:
        r = http.get("/dicom-web/studies", headers={"Origin": "https://any.example"})
        assert r.headers["access-control-allow-origin"] == "*"


def test_cors_origins_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCANONCE_CORS_ORIGINS", "https://a.example, https://b.example")
    assert Settings().cors_origins == ["https://a.example", "https://b.example"]
    monkeypatch.setenv("SCANONCE_CORS_ORIGINS", "*")
    assert Settings().cors_origins == ["*"]
    monkeypatch.setenv("SCANONCE_CORS_ORIGINS", "")
    assert Settings().cors_origins == []


def test_search_answers_carry_no_bulk_data_from_inside_sequences(mixed: Mixed) -> None:
    # Bulk data referenced inside sequences (the ECG's samples) is WADO-RS metadata only; a QIDO-RS
    # answer has no bulk data at any depth, and never the stored placeholder of the URI base.
    r = mixed.get(f"/dicom-web/studies/{ECG_STUDY}/instances?includefield=all")
    assert r.status_code == 200
    assert b"BulkDataURI" not in r.content
    assert b"@@" not in r.content
    (found,) = r.json()
    items = found["54000100"]["Value"]
    assert len(items) == 2
    assert all("54001010" not in item and item["003A0005"]["Value"] for item in items)
