"""A real destination PACS (Orthanc, Debian package) answering both C-STORE and STOW-RS, started
once per module; a broker holding an outside study of a patient the destination also knows."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from sqlmodel import Session

from broker.app import build_state
from broker.db import session_scope
from broker.deps import AppState
from broker.facilities import service as facilities
from broker.identity import matching
from broker.identity import service as identity
from broker.identity.schemas import Identifier
from broker.index import service as index
from broker.settings import Settings
from tests.peers import OrthancPeer, orthanc
from tests.support import ADMIN, make_ds, write

BROKER_AE = "SCANONCE"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
OUTSIDE, OUTSIDE_ISSUER = "outside", "OUTHOSP"
MINE, MINE_ISSUER = "mine", "MYPACS"
LOCAL_MRN = "M-123"


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancPeer]:
    base = tmp_path_factory.mktemp("pacs")
    # The broker is a known modality, so the PACS answers its C-FIND (post-send verification).
    with orthanc(base, aet="MYPACS", modalities={"scanonce": [BROKER_AE, "127.0.0.1", 104]}) as peer:
        yield peer


def pacs_clear(peer: OrthancPeer) -> None:
    for sid in httpx.get(f"{peer.url}/studies", timeout=10, trust_env=False).json():
        httpx.delete(f"{peer.url}/studies/{sid}", timeout=10, trust_env=False).raise_for_status()


def pacs_instances(peer: OrthancPeer) -> list[Dataset]:
    """Every instance the PACS holds, read back as stored."""
    out: list[Dataset] = []
    for iid in httpx.get(f"{peer.url}/instances", timeout=10, trust_env=False).json():
        raw = httpx.get(f"{peer.url}/instances/{iid}/file", timeout=30, trust_env=False).content
        out.append(pydicom.dcmread(io.BytesIO(raw)))
    return out


def pacs_upload(peer: OrthancPeer, data: bytes) -> None:
    httpx.post(f"{peer.url}/instances", content=data, timeout=30, trust_env=False).raise_for_status()


@dataclass
class Outside:
    study_uid: str
    series_uids: list[str]
    ct_uids: list[str]  # the CT instances
    sr_uid: str
    frame_of_reference: str
    files: dict[str, bytes]  # source SOP UID -> the Part 10 bytes ingested


def _sr(study: str, refs: list[tuple[str, str]]) -> Dataset:
    """A Basic Text SR whose evidence names the CT instances (references to rename consistently)."""
    ds = make_ds(sop=generate_uid(), study=study, series=generate_uid(), modality="SR", pid="P1",
                 issuer=OUTSIDE_ISSUER, name="SMITH^ANNA", instance_number=1)  # fmt: skip
    for keyword in ("Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
                    "SamplesPerPixel", "PhotometricInterpretation", "PixelData"):  # fmt: skip
        delattr(ds, keyword)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID(BASIC_TEXT_SR)
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    series: dict[str, list[str]] = {}
    for series_uid, sop in refs:
        series.setdefault(series_uid, []).append(sop)
    evidence = Dataset()
    evidence.StudyInstanceUID = study
    items = []
    for series_uid, sops in series.items():
        item = Dataset()
        item.SeriesInstanceUID = series_uid
        item.ReferencedSOPSequence = DicomSequence([_ref(s) for s in sops])
        items.append(item)
    evidence.ReferencedSeriesSequence = DicomSequence(items)
    ds.CurrentRequestedProcedureEvidenceSequence = DicomSequence([evidence])
    return ds


def _ref(sop: str) -> Dataset:
    ref = Dataset()
    ref.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ref.ReferencedSOPInstanceUID = sop
    return ref


@pytest.fixture
def state(settings: Settings) -> Iterator[AppState]:
    st = build_state(settings)
    try:
        yield st
    finally:
        st.engine.dispose()


def add_destination(state: AppState, pacs: OrthancPeer) -> None:
    with Session(state.engine) as session:
        facilities.add_facility(
            session=session, principal=ADMIN, facility_id=MINE, issuer=MINE_ISSUER, name="My hospital",
            dicomweb_url=pacs.dicomweb_url, ae_title=pacs.aet, host=pacs.host, port=pacs.dicom_port,
        )  # fmt: skip
        facilities.add_facility(
            session=session, principal=ADMIN, facility_id=OUTSIDE, issuer=OUTSIDE_ISSUER, name="Outside"
        )


def ingest_outside(state: AppState, tmp: Path, *, n_ct: int = 4) -> Outside:
    """An outside study: two CT series with a frame of reference, and an SR referencing them."""
    study = str(generate_uid())
    series = [str(generate_uid()), str(generate_uid())]
    frame = str(generate_uid())
    files: dict[str, bytes] = {}
    paths, refs = [], []
    for i in range(n_ct):
        sop = str(generate_uid())
        ds = make_ds(sop=sop, study=study, series=series[i % 2], pid="P1", issuer=OUTSIDE_ISSUER,
                     name="SMITH^ANNA", accession="OUT-77", instance_number=i + 1)  # fmt: skip
        ds.FrameOfReferenceUID = frame
        ds.StudyID = "S-OUT-1"
        ds.InstitutionName = "Outside General"
        ds.InstitutionAddress = "1 Far Road"
        ds.PixelData = bytes((i * 7 + k) % 256 for k in range(32))
        paths.append(write(tmp, f"ct{i}.dcm", ds))
        refs.append((series[i % 2], sop))
    sr = _sr(study, refs)
    sr.AccessionNumber = "OUT-77"
    paths.append(write(tmp, "sr.dcm", sr))
    for p in paths:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        files[str(ds.SOPInstanceUID)] = Path(p).read_bytes()
    outcomes = index.ingest_files(
        engine=state.engine, store=state.store, principal=ADMIN, facility_id=OUTSIDE, paths=paths
    )
    assert all(o.status != "failed" for o in outcomes), outcomes
    return Outside(study, series, [s for _, s in refs], str(sr.SOPInstanceUID), frame, files)


def register_local_patient(state: AppState, *, mrn: str = LOCAL_MRN) -> None:
    """The destination's own record of the person (its registration feed), naming the outside ID."""
    with session_scope(state.engine) as session:
        identity.upsert_record(
            session=session,
            identifier=Identifier(MINE_ISSUER, mrn),
            demographics=matching.Demographics(
                family="SMITH", given="ANNA", birth_date="19800101", sex="M", middle="JANE"
            ),
            identifiers=[Identifier(OUTSIDE_ISSUER, "P1")],
            facility_id=MINE,
            source="hl7",
        )


def part10(ds: Dataset) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
