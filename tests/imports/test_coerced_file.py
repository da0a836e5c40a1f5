"""The coerced file the import job writes and sends, checked on its own (no PACS needed): the same
bytes a full parse and re-encode would give, pixel data untouched, and no new errors from David
Clunie's dciodvfy (dicom3tools) against its source."""

from __future__ import annotations

import copy
import dataclasses
import io
import re
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pydicom
import pytest
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from broker.imports import delivery, reconcile, splice
from tests.imports.conftest import MINE_ISSUER, OUTSIDE_ISSUER, _sr
from tests.support import make_ds

NOW = datetime(2026, 12, 6, 7, 0, tzinfo=UTC)


def _sources() -> tuple[Dataset, Dataset]:
    """An outside CT slice (frame of reference, institution) and an SR whose evidence names it."""
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    ct = make_ds(sop=sop, study=study, series=series, pid="P1", issuer=OUTSIDE_ISSUER,
                 name="SMITH^ANNA", accession="OUT-77")  # fmt: skip
    ct.FrameOfReferenceUID = generate_uid()
    ct.StudyID = "S-OUT-1"
    ct.InstitutionName = "Outside General"
    ct.PixelData = bytes(range(256)) * 2
    sr = _sr(study, [(series, sop)])
    sr.AccessionNumber = "OUT-77"
    return ct, sr


def _plan(sources: list[Dataset], *, rename: bool = True) -> reconcile.Plan:
    """Every coercion at once: identifiers, new accession and StudyID from it, institution, and
    (`rename`) renamed UIDs, so the SR's references are rewritten too."""
    known = {str(u) for ds in sources for u in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)}
    study = str(sources[0].StudyInstanceUID)
    return reconcile.Plan(
        destination="mine", source_issuer=OUTSIDE_ISSUER, source_patient_id="P1",
        patient={"PatientID": "M-123", "IssuerOfPatientID": MINE_ISSUER, "PatientName": "SMITH^ANNA^JANE",
                 "PatientBirthDate": "19800101", "PatientSex": "F"},
        accession_policy="new", accession="SO0123456789ABCD", rename_uids=rename,
        study_uid=reconcile.new_uid(destination="mine", uid=study) if rename else study,
        study_id_policy="from-accession", institution={"InstitutionName": "My Hospital"},
        known_uids=sorted(known),
    )  # fmt: skip


def _bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _awkward() -> Dataset:
    """What the splice must walk past or replace: sequences of undefined length (items of both
    kinds, one nested), a private element, a sequence the coercion removes
    (IssuerOfPatientIDQualifiersSequence) and ones it appends to (OtherPatientIDsSequence,
    OriginalAttributesSequence), in implicit VR, elements after Pixel Data."""
    ds = make_ds(sop=generate_uid(), study=generate_uid(), series=generate_uid(), pid="P1",
                 issuer=OUTSIDE_ISSUER, name="ÖZ^ÄDA", accession="")  # fmt: skip
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ref = Dataset()
    ref.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ref.ReferencedSOPInstanceUID = generate_uid()
    inner = Dataset()
    inner.CodeValue, inner.CodingSchemeDesignator, inner.CodeMeaning = "121311", "DCM", "Localizer"
    ref.PurposeOfReferenceCodeSequence = DicomSequence([inner])
    ref.PurposeOfReferenceCodeSequence.is_undefined_length = True
    inner.is_undefined_length_sequence_item = True
    ref2 = Dataset()
    ref2.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ref2.ReferencedSOPInstanceUID = generate_uid()
    ds.ReferencedImageSequence = DicomSequence([ref, ref2])
    ds.ReferencedImageSequence.is_undefined_length = True
    ref.is_undefined_length_sequence_item = True
    qualifiers = Dataset()
    qualifiers.UniversalEntityID = "1.2.3.4"
    ds.IssuerOfPatientIDQualifiersSequence = DicomSequence([qualifiers])
    other = Dataset()
    other.PatientID, other.TypeOfPatientID = "OLD-9", "TEXT"
    ds.OtherPatientIDsSequence = DicomSequence([other])
    earlier = Dataset()
    earlier.ModifyingSystem, earlier.ReasonForTheAttributeModification = "ELSEWHERE", "CORRECT"
    ds.OriginalAttributesSequence = DicomSequence([earlier])
    ds.OriginalAttributesSequence.is_undefined_length = True
    block = ds.private_block(0x0029, "SCANONCE TEST", create=True)
    block.add_new(0x10, "LO", "private value")
    ds.PixelData = b"\x01\x02" * 64
    ds.add_new(0xFFFCFFFC, "OB", b"\x00" * 8)  # data set trailing padding, after Pixel Data
    return ds


def _as_is(ds: Dataset) -> bytes:
    """`ds` with its file meta written as it is (pydicom adds nothing to it)."""
    ds.preamble = b"\0" * 128
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=False)
    return buf.getvalue()


@pytest.mark.parametrize("rename", [True, False], ids=["renamed-uids", "spliced"])
def test_coerced_file_is_the_full_re_encode_with_pixels_copied(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, rename: bool
) -> None:
    ct, sr = _sources()
    implicit = make_ds(sop=generate_uid(), study=str(ct.StudyInstanceUID), series=generate_uid())
    implicit.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    implicit.PixelData = b"\x01\x02" * 64
    awkward = _awkward()
    explicit_awkward = copy.deepcopy(awkward)
    explicit_awkward.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sources = [_bytes(ds) for ds in (ct, sr, implicit, awkward, explicit_awkward)]
    # File meta pydicom's writer changes: no group length nor ImplementationVersionName (it adds
    # them), a MediaStorageSOPInstanceUID not the data set's (it takes the data set's).
    sources.append(_as_is(copy.deepcopy(implicit)))
    other = copy.deepcopy(ct)
    other.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    other.file_meta.FileMetaInformationGroupLength = 0
    sources.append(_as_is(other))
    plan = _plan([ct, sr, implicit, awkward], rename=rename)
    apply = reconcile.apply
    monkeypatch.setattr(reconcile, "apply", lambda ds, p: apply(ds, p, now=NOW))
    expected = []
    for source in sources:
        full = pydicom.dcmread(io.BytesIO(source))
        reconcile.apply(full, plan)
        expected.append(_bytes(full))
    if not rename:
        # The splice itself made these files, not pydicom's header path behind it.
        monkeypatch.setattr(reconcile, "dcmread", None)
    coercer = reconcile.Coercer(plan)  # one per import: the second time round, from its memo
    for k, (source, want) in enumerate([*zip(sources, expected, strict=True)] * 2):
        if k == len(sources):
            # The second time round, the walk's read-ahead smaller than an element header: every
            # header and sequence item is found across a refill, as a header past the first
            # block would be.
            monkeypatch.setattr(splice.Window, "BLOCK", 5)
        out = io.BytesIO()
        coercer.coerce_file(io.BytesIO(source), out)
        assert out.getvalue() == want
        # What STOW-RS streams from the stored file, unwritten: the same bytes.
        stored = tmp_path / f"{k}.dcm"
        stored.write_bytes(source)
        with stored.open("rb") as fp:
            parts = coercer.splice(fp)
        assert (parts is None) == rename
        if parts is not None:
            spliced = delivery.Spliced(str(stored), tuple(parts))
            assert b"".join(spliced.chunks()) == want and spliced.size == len(want)
    assert pydicom.dcmread(io.BytesIO(out.getvalue())).PixelData == ct.PixelData


def test_splice_drops_a_retired_group_length_and_refuses_what_it_cannot_follow() -> None:
    """A retired group length (0008,0000) is left out as pydicom's writer leaves it out; a UN of
    undefined length (pydicom writes it back as SQ) goes to pydicom's path, as does a file cut
    short before its Pixel Data."""
    ct, _ = _sources()
    plan = _plan([ct], rename=False)
    raw = _bytes(ct)
    start = 132 + 12 + int.from_bytes(raw[140:144], "little")
    grouped = raw[:start] + b"\x08\x00\x00\x00UL\x04\x00" + (1234).to_bytes(4, "little") + raw[start:]
    assert pydicom.dcmread(io.BytesIO(grouped))[0x00080000].value == 1234
    out = io.BytesIO()
    reconcile.coerce_file(io.BytesIO(grouped), out, plan)
    coerced = pydicom.dcmread(io.BytesIO(out.getvalue()))
    assert 0x00080000 not in coerced and coerced.PatientID == "M-123"
    assert coerced.PixelData == ct.PixelData
    un = copy.deepcopy(ct)
    item = (
        b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
        + b"\x08\x00\x00\x01\x02\x00\x00\x00AB"
        + b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
    )
    un.private_block(0x0029, "SCANONCE TEST", create=True)
    un[0x00291010] = DataElement(0x00291010, "UN", item, is_undefined_length=True)
    raw_un = _bytes(un)
    with pytest.raises(splice.Unsupported):
        reconcile.Coercer(plan)._spliced(io.BytesIO(raw_un))
    full = pydicom.dcmread(io.BytesIO(raw_un))
    reconcile.apply(full, plan)
    out = io.BytesIO()
    reconcile.coerce_file(io.BytesIO(raw_un), out, plan)
    assert pydicom.dcmread(io.BytesIO(out.getvalue()))[0x00291010].VR == full[0x00291010].VR == "SQ"
    with pytest.raises(splice.Unsupported):
        reconcile.Coercer(plan)._spliced(io.BytesIO(raw[: start + 40]))


def _errors(path: Path) -> set[str]:
    """dciodvfy's "Error -" lines (it reports on stderr), UIDs and values of the file left out."""
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    lines = (run.stdout + run.stderr).splitlines()
    assert lines, run  # it ran and said something (it names the IOD it checked against)
    return {
        re.sub(r"\d+(\.\d+){3,}", "<uid>", re.sub(r"\s+", " ", line.strip()))
        for line in lines
        if line.startswith("Error - ")
    }


@pytest.mark.parametrize("rename", [True, False], ids=["renamed-uids", "spliced"])
def test_dciodvfy_finds_no_new_error_in_a_coerced_file(tmp_path: Path, rename: bool) -> None:
    sources = _sources()
    plan = _plan(list(sources), rename=rename)
    for k, source in enumerate(sources):
        src, dst = tmp_path / f"source{k}.dcm", tmp_path / f"coerced{k}.dcm"
        src.write_bytes(_bytes(source))
        with src.open("rb") as fp, dst.open("wb") as out:
            reconcile.coerce_file(fp, out, plan)
        coerced = pydicom.dcmread(dst, stop_before_pixels=True)
        assert coerced.PatientID == "M-123" and coerced.OriginalAttributesSequence  # it was coerced
        assert _errors(dst) - _errors(src) == set()


def test_an_outside_value_pydicom_finds_invalid_is_coerced_without_reaching_the_log(
    caplog: pytest.LogCaptureFixture, recwarn: pytest.WarningsRecorder
) -> None:
    """An outside facility's malformed birth date and age are kept in OriginalAttributesSequence
    as sent, and neither is quoted by a log line or a warning (pydicom's value checks quote what
    they find invalid)."""
    ct, _sr_ds = _sources()
    ct.PatientBirthDate, ct.PatientAge = "19xx0101", "12 years"
    src = _bytes(ct)
    caplog.clear()
    recwarn.clear()
    out = io.BytesIO()
    reconcile.coerce_file(io.BytesIO(src), out, _plan([ct]))
    said = caplog.text + " ".join(str(w.message) for w in recwarn)
    assert "19xx0101" not in said and "12 years" not in said
    coerced = pydicom.dcmread(io.BytesIO(out.getvalue()))
    (modified,) = coerced.OriginalAttributesSequence[0].ModifiedAttributesSequence
    assert modified.PatientBirthDate == "19xx0101"
    assert str(coerced.PatientAge) == "12 years"


@pytest.mark.parametrize("charset", ["ISO_IR 100", None])
def test_a_destination_name_the_file_cannot_encode_is_written_in_utf8(charset: str | None) -> None:
    """The destination knows the patient as 王^小東 (identity keeps names in any script) and the
    outside file is Latin-1 (or says nothing): the coerced file says ISO_IR 192 and holds the name,
    and its other text (Tête) is re-encoded, not left in Latin-1 bytes nor written as '?'."""
    ds = make_ds(sop=generate_uid(), study=generate_uid(), series=generate_uid(), pid="P1",
                 issuer=OUTSIDE_ISSUER, name="Müller^Zoë", description="Tête")  # fmt: skip
    if charset is None:
        del ds.SpecificCharacterSet
    else:
        ds.SpecificCharacterSet = charset
    plan = reconcile.Plan(
        destination="mine", source_issuer=OUTSIDE_ISSUER, source_patient_id="P1",
        patient={"PatientID": "M-9", "IssuerOfPatientID": MINE_ISSUER, "PatientName": "王^小東",
                 "PatientBirthDate": "19800101", "PatientSex": "M"},
        accession_policy="keep", accession=None, rename_uids=False, study_uid=str(ds.StudyInstanceUID),
        study_id_policy="keep", institution={}, known_uids=[],
    )  # fmt: skip
    coercer = reconcile.Coercer(plan)
    assert coercer.splice(io.BytesIO(_bytes(ds))) is None  # the header is re-encoded whole
    out = io.BytesIO()
    coercer.coerce_file(io.BytesIO(_bytes(ds)), out)
    coerced = pydicom.dcmread(io.BytesIO(out.getvalue()))
    assert coerced.SpecificCharacterSet == "ISO_IR 192"
    assert str(coerced.PatientName) == "王^小東"
    assert coerced.StudyDescription == "Tête"
    assert coerced.PixelData == ds.PixelData
    # A name the file can hold leaves its character set alone (and the splice applies).
    latin = reconcile.Coercer(
        dataclasses.replace(plan, patient={**plan.patient, "PatientName": "MULLER^ZOE"})
    )
    assert latin.splice(io.BytesIO(_bytes(ds))) is not None
