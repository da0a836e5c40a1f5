"""Retrieve on demand of a study its facility cannot send whole, against real Orthanc archives
(one by DICOMweb, one by DIMSE only). What the broker received is kept, but the study is not
taken as held: it stays NEARLINE, the caller is told how many instances are missing and from
where, and a later request fetches what is missing once the facility can send it."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from broker.app import create_app
from broker.deps import AppState
from broker.errors import Unavailable
from broker.facilities.models import Facility
from broker.federation import fetch as fetch_module
from broker.federation import service
from broker.index.models import Instance, Study
from broker.index.schemas import Query
from broker.index.service import ingest_files, search
from tests.federation.conftest import TEST_FILES, Archives, delete_study, upload
from tests.peers import OrthancPeer
from tests.support import ADMIN, auth_headers, to_bytes, write


def _study(n: int) -> list[Dataset]:
    """A CT study of n instances in one series, new UIDs, as a facility would hold it."""
    study_uid, series_uid = generate_uid(), generate_uid()
    out: list[Dataset] = []
    for i in range(n):
        ds = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study_uid, series_uid, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        ds.PatientID = "PARTIAL-1"
        out.append(ds)
    return out


def _delete_instance(peer: OrthancPeer, sop_uid: str) -> None:
    found = httpx.post(f"{peer.url}/tools/lookup", content=sop_uid, timeout=10, trust_env=False).json()
    for item in found:
        if item["Type"] == "Instance":
            httpx.delete(f"{peer.url}/instances/{item['ID']}", timeout=10, trust_env=False).raise_for_status()


def _held(state: AppState, study_uid: str) -> set[str]:
    with Session(state.engine) as session:
        study = session.exec(select(Study).where(Study.study_uid == study_uid)).one()
        return set(session.exec(select(Instance.sop_uid).where(col(Instance.study_pk) == study.pk)))


def _answer(state: AppState, study_uid: str) -> dict:
    with Session(state.engine) as session:
        result = search(
            session=session, query=Query(level="study", filters={"StudyInstanceUID": study_uid}, limit=10)
        )
    (match,) = result.matches
    return match


def _remote_only(state: AppState, study_uid: str) -> bool:
    with Session(state.engine) as session:
        return service.is_remote_only(session=session, study_uid=study_uid)


def _ensure(state: AppState, study_uid: str, **kwargs: object) -> None:
    service.ensure_local(engine=state.engine, store=state.store, study_uid=study_uid, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def fetches(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The facilities the broker fetched from, in order (the real fetch runs)."""
    calls: list[str] = []
    real = fetch_module._fetch_from

    def counting(engine: Engine, store: Any, facility: Facility, study_uid: str, calling_ae: str) -> None:
        calls.append(facility.id)
        real(engine, store, facility, study_uid, calling_ae)

    monkeypatch.setattr(fetch_module, "_fetch_from", counting)
    yield calls


@pytest.mark.parametrize("facility", ["web", "dimse"])
def test_an_instance_the_broker_refuses_leaves_the_study_remote_until_the_facility_sends_it(
    federated: AppState, archives: Archives, facility: str, fetches: list[str], tmp_path: Path
) -> None:
    peer = archives.web if facility == "web" else archives.dimse
    study = _study(3)
    uid = study[0].StudyInstanceUID
    # The broker already holds a different object under the third instance's SOP Instance UID
    # (in a study of its own): the facility's copy is a conflict, which ingest refuses.
    other = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    other.StudyInstanceUID, other.SeriesInstanceUID = generate_uid(), generate_uid()
    other.SOPInstanceUID = study[2].SOPInstanceUID
    other.file_meta.MediaStorageSOPInstanceUID = other.SOPInstanceUID
    other.SeriesDescription = "another object under the same UID"
    (outcome,) = ingest_files(
        engine=federated.engine,
        store=federated.store,
        principal=ADMIN,
        facility_id="local",
        paths=[write(tmp_path, "other.dcm", other)],
    )
    assert outcome.status == "stored"
    for ds in study:
        upload(peer, to_bytes(ds))
    try:
        service.sync_facility(engine=federated.engine, store=federated.store, facility_id=facility)
        with pytest.raises(Unavailable, match=rf"1 of 3 instances .*facility '{facility}'") as refused:
            _ensure(federated, uid)
        assert "PARTIAL-1" not in refused.value.message  # no patient data in what the caller sees

        # What arrived is kept; the study is not taken as held: still NEARLINE, the facility's
        # counts (not the facility's plus what arrived), and the next request tries again.
        assert _held(federated, uid) == {study[0].SOPInstanceUID, study[1].SOPInstanceUID}
        assert _remote_only(federated, uid)
        answer = _answer(federated, uid)
        assert answer["00080056"]["Value"] == ["NEARLINE"] and answer["00201208"]["Value"] == [3]

        # Asked again at once, it is not fetched again (a broken instance does not make every
        # open fetch the whole study): the same clear answer, from what the broker knows.
        with pytest.raises(Unavailable, match=rf"1 of 3 instances .*facility '{facility}'"):
            _ensure(federated, uid)
        assert fetches == [facility]

        # The study changes at the facility (an instance added) and a sync sees it: the broker
        # holding part of it does not make the sync take it as held.
        added = copy.deepcopy(study[0])
        added.SOPInstanceUID = added.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        upload(peer, to_bytes(added))
        synced = service.sync_facility(engine=federated.engine, store=federated.store, facility_id=facility)
        assert synced.studies_written == 1
        assert _remote_only(federated, uid)

        # The facility replaces the broken instance; the next try fetches the rest.
        _delete_instance(peer, study[2].SOPInstanceUID)
        fixed = copy.deepcopy(study[2])
        fixed.SOPInstanceUID = fixed.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        upload(peer, to_bytes(fixed))
        _ensure(federated, uid, retry_after=timedelta(0))
        assert fetches == [facility, facility]
        whole = {study[0].SOPInstanceUID, study[1].SOPInstanceUID, fixed.SOPInstanceUID, added.SOPInstanceUID}
        assert _held(federated, uid) == whole
        assert not _remote_only(federated, uid)
        answer = _answer(federated, uid)
        assert answer["00080056"]["Value"] == ["ONLINE"] and answer["00201208"]["Value"] == [4]
    finally:
        delete_study(peer, uid)


@pytest.mark.parametrize("facility", ["web", "dimse"])
def test_a_facility_that_sends_fewer_instances_than_it_listed_leaves_the_study_remote(
    federated: AppState, archives: Archives, facility: str, fetches: list[str]
) -> None:
    peer = archives.web if facility == "web" else archives.dimse
    study = _study(3)
    uid = study[0].StudyInstanceUID
    for ds in study:
        upload(peer, to_bytes(ds))
    try:
        service.sync_facility(engine=federated.engine, store=federated.store, facility_id=facility)
        # One instance is gone from the facility's archive after the sync listed three (a
        # facility that lost it, or an archive that sends what it can).
        _delete_instance(peer, study[1].SOPInstanceUID)
        with pytest.raises(Unavailable, match=rf"1 of 3 instances .*facility '{facility}'"):
            _ensure(federated, uid)
        assert _held(federated, uid) == {study[0].SOPInstanceUID, study[2].SOPInstanceUID}
        assert _remote_only(federated, uid)

        if facility == "web":
            # A viewer asking for the study gets the reason, not a silent partial study.
            client = TestClient(create_app(state=federated), headers=auth_headers())
            meta = client.get(
                f"/dicom-web/studies/{uid}/metadata", headers={"Accept": "application/dicom+json"}
            )
            assert meta.status_code == 503 and "1 of 3 instances" in meta.json()["detail"]
            # An instance the broker holds is served whole all the same.
            sop = study[0].SOPInstanceUID
            one = client.get(
                f"/dicom-web/studies/{uid}/series/{study[0].SeriesInstanceUID}/instances/{sop}/metadata",
                headers={"Accept": "application/dicom+json"},
            )
            assert one.status_code == 200 and one.json()[0]["00080018"]["Value"] == [sop]
        assert fetches == [facility]

        # The facility has it again: the next try after the wait stores only what was missing.
        upload(peer, to_bytes(study[1]))
        _ensure(federated, uid, retry_after=timedelta(0))
        assert _held(federated, uid) == {ds.SOPInstanceUID for ds in study}
        assert not _remote_only(federated, uid)
        assert _answer(federated, uid)["00201208"]["Value"] == [3]
    finally:
        delete_study(peer, uid)
