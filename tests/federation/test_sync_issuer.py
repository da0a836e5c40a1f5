"""Index sync qualifies Patient IDs the way ingest does: IssuerOfPatientID in the archive's data
is honoured when it names a registered facility's issuer, else the syncing facility's issuer
applies. Against real Orthanc archives, by QIDO-RS (`web`) and by C-FIND (`dimse`)."""

from __future__ import annotations

from collections.abc import Iterator

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlmodel import Session, select

from broker.deps import AppState
from broker.federation import service
from broker.index.models import Patient, Study
from tests.federation.conftest import TEST_FILES, Archives, delete_study, upload
from tests.support import to_bytes

ISSUERS = {"web": "WEBHOSP", "dimse": "DIMSEHOSP"}


def _study(patient_id: str, issuer: str | None) -> pydicom.Dataset:
    ds = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = (generate_uid() for _ in range(3))
    ds.PatientID = patient_id
    if issuer is None:
        if "IssuerOfPatientID" in ds:
            del ds.IssuerOfPatientID
    else:
        ds.IssuerOfPatientID = issuer
    return ds


@pytest.fixture
def uploaded(archives: Archives) -> Iterator[list[tuple[str, str]]]:
    """(facility id, study UID) of what a test adds to the archives; removed afterwards, so the
    module's archives hold only their starting studies for the next test."""
    added: list[tuple[str, str]] = []
    yield added
    peers = {"web": archives.web, "dimse": archives.dimse}
    for facility_id, uid in added:
        delete_study(peers[facility_id], uid)


def _issuer_and_patient(state: AppState, study_uid: str) -> tuple[str, int]:
    with Session(state.engine) as session:
        study = session.exec(select(Study).where(Study.study_uid == study_uid)).one()
        patient = session.get(Patient, study.patient_pk)
        assert patient is not None and patient.issuer == study.issuer
        return study.issuer, study.patient_pk


@pytest.mark.parametrize(
    ("syncing", "other"), [("web", "dimse"), ("dimse", "web")], ids=["qido-rs", "c-find"]
)
def test_sync_honours_a_registered_issuer_of_patient_id_and_ignores_an_unknown_one(
    federated: AppState, archives: Archives, uploaded: list[tuple[str, str]], syncing: str, other: str
) -> None:
    peers = {"web": archives.web, "dimse": archives.dimse}
    pid = f"SHARED-{generate_uid()[-8:]}"
    # The other facility's own record of the patient: no issuer in its data, so its issuer.
    theirs = _study(pid, None)
    # The syncing facility's archive holds a study that says it is the other facility's patient,
    # and one that names an issuer nobody registered (with the same ID: it must not link).
    named = _study(pid, ISSUERS[other])
    unknown = _study(pid, "NOBODY-REGISTERED-THIS")
    for facility_id, ds in ((other, theirs), (syncing, named), (syncing, unknown)):
        upload(peers[facility_id], to_bytes(ds))
        uploaded.append((facility_id, ds.StudyInstanceUID))

    service.sync_facility(engine=federated.engine, store=federated.store, facility_id=other)
    service.sync_facility(engine=federated.engine, store=federated.store, facility_id=syncing)

    their_issuer, their_patient = _issuer_and_patient(federated, theirs.StudyInstanceUID)
    assert their_issuer == ISSUERS[other]
    # Indexed under the named facility's patient: one patient, both facilities' studies.
    assert _issuer_and_patient(federated, named.StudyInstanceUID) == (ISSUERS[other], their_patient)
    # An unregistered issuer is not trusted: the syncing facility's issuer qualifies the ID.
    unknown_issuer, unknown_patient = _issuer_and_patient(federated, unknown.StudyInstanceUID)
    assert unknown_issuer == ISSUERS[syncing] and unknown_patient != their_patient
    with Session(federated.engine) as session:
        patients = session.exec(select(Patient).where(Patient.patient_id == pid)).all()
        assert sorted(p.issuer for p in patients) == sorted([ISSUERS[other], ISSUERS[syncing]])

    # A study added later is found by an incremental sync (by C-FIND: a STUDY listing without
    # the issuer, then SERIES queries for what changed, which carry it): the same rule applies.
    later = _study(pid, ISSUERS[other])
    upload(peers[syncing], to_bytes(later))
    uploaded.append((syncing, later.StudyInstanceUID))
    again = service.sync_facility(engine=federated.engine, store=federated.store, facility_id=syncing)
    assert again.studies_written == 1
    assert _issuer_and_patient(federated, later.StudyInstanceUID) == (ISSUERS[other], their_patient)


def test_synced_patients_are_linked_to_persons_as_ingested_ones_are(federated: AppState) -> None:
    """A patient known only from a facility's archive is linked to a person all the same, so
    the person index (PIXm, `scanonce person`) finds it before any pixels are fetched."""
    service.sync_facility(engine=federated.engine, store=federated.store, facility_id="web")
    with Session(federated.engine) as session:
        patients = session.exec(select(Patient).where(Patient.facility_id == "web")).all()
    assert patients and all(p.person_id is not None for p in patients)
