"""Index sync writes its rows the way ingest does: values bounded by their VR (dicom.bounds), and
the archive's own IssuerOfPatientID answered and matched beside the broker's qualification.
Against real Orthanc archives, by QIDO-RS (`web`) and by C-FIND (`dimse`)."""

from __future__ import annotations

from collections.abc import Iterator

import pydicom
import pytest
from pydicom import config
from pydicom.uid import generate_uid
from sqlalchemy import func
from sqlmodel import Session, select

from broker.deps import AppState
from broker.federation import service
from broker.index import service as index_service
from broker.index.models import Series, Study
from broker.index.schemas import Query
from tests.federation.conftest import TEST_FILES, Archives, delete_study, upload
from tests.support import to_bytes

LONG_NAME = "Q" * 100 + "^" + "R" * 100


@pytest.fixture
def uploaded(archives: Archives) -> Iterator[list[tuple[str, str]]]:
    added: list[tuple[str, str]] = []
    yield added
    peers = {"web": archives.web, "dimse": archives.dimse}
    for facility_id, uid in added:
        delete_study(peers[facility_id], uid)


@pytest.mark.parametrize("facility", ["web", "dimse"], ids=["qido-rs", "c-find"])
def test_sync_bounds_values_and_keeps_the_archives_own_issuer(
    federated: AppState, archives: Archives, uploaded: list[tuple[str, str]], facility: str
) -> None:
    peer = {"web": archives.web, "dimse": archives.dimse}[facility]
    ds = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = (generate_uid() for _ in range(3))
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    with config.disable_value_validation():
        ds.PatientName = LONG_NAME
        ds.PatientID = "SYNC-X"
        ds.IssuerOfPatientID = "HOSP-A"
        ds.StudyDescription = "S" * 200
        ds.SeriesDescription = "T" * 200
        upload(peer, to_bytes(ds))
    uploaded.append((facility, ds.StudyInstanceUID))

    service.sync_facility(engine=federated.engine, store=federated.store, facility_id=facility)

    with Session(federated.engine) as s:
        study = s.exec(select(Study).where(Study.study_uid == ds.StudyInstanceUID)).one()
        assert (study.issuer, study.issuer_in_data) == (
            {"web": "WEBHOSP", "dimse": "DIMSEHOSP"}[facility],
            "HOSP-A",
        )
        assert len(study.patient_name) == len(study.name_norm) == 64
        assert study.study_description == "S" * 64
        assert len(study.study_json) < 2048
        longest_series = s.exec(select(func.max(func.length(Series.series_json)))).one()
        assert longest_series is not None and longest_series < 2048
        (match,) = index_service.search(
            session=s,
            query=Query(level="study", filters={"PatientID": "SYNC-X", "IssuerOfPatientID": "HOSP-A"}),
        ).matches
    assert match["00100021"]["Value"] == ["HOSP-A"]
    assert match["00100010"]["Value"] == [{"Alphabetic": "Q" * 64}]
