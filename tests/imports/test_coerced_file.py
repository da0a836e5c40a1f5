"""The coerced file the import job writes and sends, checked on its own (no PACS needed): the same
bytes a full parse and re-encode would give, pixel data untouched, and no new errors from David
Clunie's dciodvfy (dicom3tools) against its source."""

from __future__ import annotations

import io
import re
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian, generate_uid

from broker.imports import reconcile
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


def _plan(sources: list[Dataset]) -> reconcile.Plan:
    """Every coercion at once: identifiers, new accession and StudyID from it, institution, and
    renamed UIDs (so the SR's references are rewritten too)."""
    known = {str(u) for ds in sources for u in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)}
    return reconcile.Plan(
        destination="mine", source_issuer=OUTSIDE_ISSUER, source_patient_id="P1",
        patient={"PatientID": "M-123", "IssuerOfPatientID": MINE_ISSUER, "PatientName": "SMITH^ANNA^JANE",
                 "PatientBirthDate": "19800101", "PatientSex": "F"},
        accession_policy="new", accession="SO0123456789ABCD", rename_uids=True,
        study_uid=reconcile.new_uid(destination="mine", uid=str(sources[0].StudyInstanceUID)),
        study_id_policy="from-accession", institution={"InstitutionName": "My Hospital"},
        known_uids=sorted(known),
    )  # fmt: skip


def _bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_coerced_file_is_the_full_re_encode_with_pixels_copied(monkeypatch: pytest.MonkeyPatch) -> None:
    ct, sr = _sources()
    implicit = make_ds(sop=generate_uid(), study=str(ct.StudyInstanceUID), series=generate_uid())
    implicit.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    implicit.PixelData = b"\x01\x02" * 64
    plan = _plan([ct, sr, implicit])
    apply = reconcile.apply
    monkeypatch.setattr(reconcile, "apply", lambda ds, p: apply(ds, p, now=NOW))
    for source in (ct, sr, implicit):
        raw = _bytes(source)
        full = pydicom.dcmread(io.BytesIO(raw))
        reconcile.apply(full, plan)
        out = io.BytesIO()
        reconcile.coerce_file(io.BytesIO(raw), out, plan)
        assert out.getvalue() == _bytes(full)
        if "PixelData" in source:
            assert pydicom.dcmread(io.BytesIO(out.getvalue())).PixelData == source.PixelData


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


def test_dciodvfy_finds_no_new_error_in_a_coerced_file(tmp_path: Path) -> None:
    sources = _sources()
    plan = _plan(list(sources))
    for k, source in enumerate(sources):
        src, dst = tmp_path / f"source{k}.dcm", tmp_path / f"coerced{k}.dcm"
        src.write_bytes(_bytes(source))
        with src.open("rb") as fp, dst.open("wb") as out:
            reconcile.coerce_file(fp, out, plan)
        coerced = pydicom.dcmread(dst, stop_before_pixels=True)
        assert coerced.PatientID == "M-123" and coerced.OriginalAttributesSequence  # it was coerced
        assert _errors(dst) - _errors(src) == set()
