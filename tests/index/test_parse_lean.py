"""The lean reader (broker/dicom/lean.py) changes nothing that is stored: for every file it takes,
parsing gives what the pydicom path (`parse._parse`, `dcmread` + `instance_json`) gives, the
same DICOM JSON byte for byte, the same index attributes, facts, UIDs, hash and transfer syntax,
or the same refusal. Ingest writes the index rows from that parse result alone, so equal
results mean equal rows."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Any

import orjson
import pydicom.data
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import JPEGBaseline8Bit

from broker.dicom.lean import FIRST_READ, NeedMore, read_lean
from broker.dicom.received import Received
from broker.index import parse
from broker.index.packing import unpack_metadata
from tests.support import make_ds, to_bytes

# The folder listed, not get_testdata_files(): every file pydicom ships, whatever it is.
_FOLDER = Path(pydicom.data.__file__).parent / "test_files"


def _both(path: Path, data: bytes, in_hand: bool, **expected: Any) -> tuple[object, object]:
    received = Received(str(path), hashlib.sha256(data).hexdigest(), len(data), data if in_hand else None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the odd files it is given
        new = parse.parse_instance(received, **expected)
        with open(path, "rb") as fp:
            old = parse._parse(
                fp, str(path), received, expected.get("expected_study_uid"), expected.get("expected_sop")
            )
    return new, old


def _takes(data: bytes) -> bool:
    try:
        return read_lean(data, len(data)) is not None
    except Exception:  # noqa: BLE001 - a file it cannot walk is one it does not take
        return False


def _same(new: object, old: object) -> None:
    assert type(new) is type(old)
    assert new == old
    if isinstance(new, parse._Parsed):
        assert isinstance(old, parse._Parsed)
        # byte for byte, member order included
        assert unpack_metadata(new.metadata_packed) == unpack_metadata(old.metadata_packed)


def test_every_pydicom_test_file_parses_as_through_pydicom() -> None:
    files = sorted(p for p in _FOLDER.rglob("*") if p.is_file())
    assert len(files) > 100
    lean = 0
    for path in files:
        data = path.read_bytes()
        lean += _takes(data)
        for in_hand in (False, True):
            new, old = _both(path, data, in_hand)
            _same(new, old)
    # Most of pydicom's files are explicit VR little endian: the lean path is what is compared.
    assert lean >= 100


def test_cut_padded_and_refused_copies_parse_as_through_pydicom(tmp_path: Path) -> None:
    """Files the lean reader must hand back to pydicom (cut short anywhere, bytes after the last
    element) and refusals (another study, another SOP instance than the request's)."""
    taken = [p for p in sorted(_FOLDER.glob("*.dcm")) if _takes(p.read_bytes())][:12]
    assert len(taken) == 12
    for source in taken:
        data = source.read_bytes()
        copies: list[tuple[bytes, dict[str, Any]]] = [
            (data[:cut], {}) for cut in sorted({131, 140, len(data) // 3, len(data) // 2, len(data) - 1})
        ]
        copies += [
            (data + b"\x00\x00", {}),
            (data + b"\x01\x02\x03\x04\x05\x06\x07\x08\x09", {}),
            (data, {"expected_study_uid": "1.2.3"}),
            (data, {"expected_sop": ("1.2", "1.3")}),
        ]
        for n, (copy, expected) in enumerate(copies):
            path = tmp_path / f"{source.stem}-{n}.dcm"
            path.write_bytes(copy)
            for in_hand in (False, True):
                _same(*_both(path, copy, in_hand, **expected))


def _rich() -> Dataset:
    """What pydicom's files have little of: values the lean path leaves to pydicom beside
    values it reads itself."""
    ds = make_ds(
        sop="1.2.3.4.1", study="1.2.3.4", series="1.2.3.4.2", name="Müller^Zoë", charset="ISO_IR 100"
    )
    item = Dataset()
    item.CodeValue = "T-A0100"
    item.CodeMeaning = "Gehirn"
    item.ImageComments = "Gehirn " * 300  # a sequence longer than the defer size
    ds.AnatomicRegionSequence = Sequence([item])
    ds.ReferencedImageSequence = Sequence([])
    # An undefined-length sequence (with an undefined-length item holding another one): read by
    # pydicom's read_sequence within the lean walk.
    inner = Dataset()
    inner.CodeValue = "113691"
    inner.CodeMeaning = "IEC Körperphantom"
    outer = Dataset()
    outer.PatientOrientationCodeSequence = Sequence([inner])
    outer["PatientOrientationCodeSequence"].is_undefined_length = True
    outer.is_undefined_length_sequence_item = True
    ds.RequestAttributesSequence = Sequence([outer])
    ds["RequestAttributesSequence"].is_undefined_length = True
    ds.add_new(0x00091010, "LO", "ACME 1.0")  # private creator
    ds.add_new(0x00091001, "LO", "private value")
    ds.add_new(0x00091002, "UN", b"\x01\x02\x03\x04")
    ds.ImageComments = "ä" * 1500  # text longer than the defer size
    ds.add_new(0x00281052, "DS", None)  # empty numbers go through pydicom's JSON
    ds.add_new(0x00280010, "US", None)
    ds.add_new(0x00186011, "SQ", Sequence())
    ds.RescaleSlope = "1.5"
    ds.WindowCenter = ["40", "50"]
    ds.PixelSpacing = [0.5, 0.5]
    ds.add_new(0x00189345, "FD", 3.94)
    ds.add_new(0x00209161, "UI", "")
    return ds


@pytest.mark.parametrize("charset", ["ISO_IR 100", "ISO_IR 192", "ISO 2022 IR 6\\ISO 2022 IR 100"])
def test_sequences_private_long_and_empty_values_parse_as_through_pydicom(
    tmp_path: Path, charset: str
) -> None:
    ds = _rich()
    ds.SpecificCharacterSet = charset
    data = to_bytes(ds)
    lean = read_lean(data, len(data))
    assert lean is not None
    assert list(lean.sequences) == [0x00400275]  # the undefined-length one
    path = tmp_path / "rich.dcm"
    path.write_bytes(data)
    for in_hand in (False, True):
        _same(*_both(path, data, in_hand))


# A frame past the first read (64 KiB) makes the walk read the whole file.
@pytest.mark.parametrize("second_frame", [3000, 100_000])
def test_encapsulated_pixel_data_parses_as_through_pydicom(tmp_path: Path, second_frame: int) -> None:
    ds = make_ds(sop="1.2.3.5.1", study="1.2.3.5", series="1.2.3.5.2")
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated = 8
    ds.PixelData = encapsulate(
        [b"\xff\xd8" + b"\x00" * 100 + b"\xff\xd9", b"\xff\xd8" + b"\x11" * second_frame + b"\xff\xd9"]
    )
    ds["PixelData"].VR = "OB"
    ds.NumberOfFrames = 2
    data = to_bytes(ds)
    assert _takes(data)
    path = tmp_path / "jpeg.dcm"
    path.write_bytes(data)
    for in_hand in (False, True):
        new, old = _both(path, data, in_hand)
        _same(new, old)
        assert isinstance(new, parse._Parsed)
        assert b'"7FE00010":{"vr":"OB","BulkDataURI":' in unpack_metadata(new.metadata_packed)
    if len(data) > FIRST_READ:
        with pytest.raises(NeedMore):
            read_lean(data[:FIRST_READ], len(data))


@pytest.mark.parametrize("first", ["ISO_IR 192", "ISO_IR 100"])
def test_a_value_seen_before_is_read_in_each_instances_own_character_set(tmp_path: Path, first: str) -> None:
    """Values already seen are remembered (json_model._KNOWN): the same bytes of a name in a
    UTF-8 instance and in a Latin-1 one are still two different names, in either order, and
    each parse equals the pydicom path's."""
    utf8_bytes = "MÜLLER^JÖRG".encode()
    names: dict[str, str] = {}
    order = [first, "ISO_IR 100" if first == "ISO_IR 192" else "ISO_IR 192"]
    for n, charset in enumerate(order * 2):
        sop = f"1.2.826.0.1.3680043.8.498.61.{n}"
        ds = make_ds(sop=sop, study="1.2.826.0.1.3680043.8.498.61", series="1.2.826.0.1.3680043.8.498.61.1")
        ds.SpecificCharacterSet = charset
        ds.PatientName = utf8_bytes.decode("latin-1") if charset == "ISO_IR 100" else utf8_bytes.decode()
        data = to_bytes(ds)
        assert utf8_bytes in data  # the same bytes on the wire, whatever the character set says
        path = tmp_path / f"{n}.dcm"
        path.write_bytes(data)
        assert _takes(data)
        new, old = _both(path, data, in_hand=True)
        _same(new, old)
        assert isinstance(new, parse._Parsed)
        name = orjson.loads(unpack_metadata(new.metadata_packed))["00100010"]["Value"][0]["Alphabetic"]
        assert names.setdefault(charset, name) == name  # the same answer the second time
    assert names == {"ISO_IR 192": "MÜLLER^JÖRG", "ISO_IR 100": "MÃ\x9cLLER^JÃ\x96RG"}
