"""The fast DICOM JSON path must say what pydicom says, for every real file pydicom ships."""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import pydicom
import pytest

from broker.dicom.json_model import BULK_BASE, instance_json
from tests.support import make_ds, to_bytes

DATA = Path(pydicom.__file__).parent / "data"
FILES = sorted((DATA / "test_files").glob("*.dcm")) + sorted((DATA / "charset_files").glob("*.dcm"))


def _reference(path: Path) -> dict[str, Any] | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(path)
        except Exception:  # noqa: BLE001 - unreadable files are covered by the ingest tests
            return None
        out = {}
        for elem in ds:
            if elem.tag.group == 2 or elem.tag.element == 0 or elem.VR == "SQ":
                continue
            try:
                out[f"{elem.tag:08X}"] = elem.to_json_dict(lambda _e: "BULK", 1024)
            except Exception:  # noqa: BLE001
                continue
        return out


def _normal(v: dict[str, Any]) -> dict[str, Any]:
    # Differences on purpose: values trimmed of padding, empty values of a multi-valued
    # attribute as null (PS3.18 F.2.5).
    if "Value" in v:
        vals = [x.strip() if isinstance(x, str) else x for x in v["Value"]]
        vals = [None if x == "" else x for x in vals]
        return {"vr": str(v["vr"]), "Value": vals}
    return {k: str(x) for k, x in v.items()}


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_fast_json_matches_pydicom(path: Path) -> None:
    ref = _reference(path)
    if ref is None:
        pytest.skip("pydicom cannot read this file at all")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = instance_json(
            pydicom.dcmread(path, defer_size=1024), bulk_prefix="studies/1/series/2/instances/3"
        )
    compared = 0
    for tag, expected in ref.items():
        if tag == "00080005" or "BulkDataURI" in expected:
            continue
        got = fast[tag]
        if "BulkDataURI" in got:
            assert got["BulkDataURI"].startswith(BULK_BASE + "/studies/1/series/2/instances/3/bulk/")
            compared += 1
            continue
        assert _normal(got) == _normal(expected), tag
        compared += 1
    assert compared > 0 or not ref


def test_text_is_utf8_whatever_the_input_charset() -> None:
    fast = instance_json(pydicom.dcmread(DATA / "charset_files" / "chrRuss.dcm"), bulk_prefix="x")
    assert fast["00080005"]["Value"] == ["ISO_IR 192"]
    assert fast["00100010"]["Value"][0]["Alphabetic"] == "Люкceмбypг"


def _bulk_uris(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [u for k, v in value.items() for u in ([v] if k == "BulkDataURI" else _bulk_uris(v))]
    if isinstance(value, list):
        return [u for v in value for u in _bulk_uris(v)]
    return []


def test_bulk_data_inside_sequences_is_referenced_not_inlined() -> None:
    # An ECG's samples (WaveformData, 5400,1010) sit inside WaveformSequence; inlined they made one
    # instance's metadata 378 KB of base64 (Orthanc: 20 KB, by reference).
    ds = pydicom.dcmread(DATA / "test_files" / "waveform_ecg.dcm")
    out = instance_json(ds, bulk_prefix="studies/1/series/2/instances/3")
    waveform = out["54000100"]
    assert waveform["vr"] == "SQ"
    items = waveform["Value"]
    assert len(items) == len(ds.WaveformSequence) == 2
    for number, item in enumerate(items, start=1):
        assert "InlineBinary" not in item["54001010"]
        assert item["54001010"] == {
            "vr": "OW",
            "BulkDataURI": f"{BULK_BASE}/studies/1/series/2/instances/3/bulk/54000100/{number}/54001010",
        }
        # Small values in the same item stay inline.
        assert item["003A0005"]["Value"] == [ds.WaveformSequence[number - 1].NumberOfWaveformChannels]
    assert len(orjson_dumps(waveform)) < 20_000  # was 378 KB
    assert all(u.startswith(BULK_BASE) for u in _bulk_uris(out))


def test_an_empty_sequence_has_no_value() -> None:
    # PS3.18 F.2.2 / PS3.19 A.1.5: one Value per item, so none for no items (pydicom writes []).
    ds = pydicom.Dataset()
    ds.ReferencedPerformedProcedureStepSequence = pydicom.Sequence([])
    item = pydicom.Dataset()
    item.ReferencedImageSequence = pydicom.Sequence([])
    ds.ReferencedStudySequence = pydicom.Sequence([item])
    out = instance_json(ds, bulk_prefix="p")
    assert out["00081111"] == {"vr": "SQ"}
    assert out["00081110"] == {"vr": "SQ", "Value": [{"00081140": {"vr": "SQ"}}]}


def orjson_dumps(value: Any) -> bytes:
    import orjson

    return orjson.dumps(value)


@pytest.mark.parametrize("read", ["raw", "converted"])
def test_pixel_data_is_referenced_however_small(read: str) -> None:
    # A 16x16 image's pixels inlined were ~700 bytes of base64 in each metadata response and index
    # row; a viewer reads pixels as frames. Other small binary values stay inline.
    ds = pydicom.dcmread(io.BytesIO(to_bytes(make_ds(sop="1.2.3.4", study="1.2.3", series="1.2.3.9"))))
    ds.Rows = ds.Columns = 16
    ds.BitsAllocated, ds.SamplesPerPixel = 16, 1
    ds.PixelData = bytes(range(256)) * 2
    ds.EncapsulatedDocument = b"%PDF-1.4 small"
    if read == "raw":
        ds = pydicom.dcmread(io.BytesIO(to_bytes(ds)), defer_size=1024)
    out = instance_json(ds, bulk_prefix="studies/1.2.3/series/1.2.3.9/instances/1.2.3.4")
    assert out["7FE00010"] == {
        "vr": "OW",
        "BulkDataURI": f"{BULK_BASE}/studies/1.2.3/series/1.2.3.9/instances/1.2.3.4/bulk/7FE00010",
    }
    assert "InlineBinary" in out["00420011"]
