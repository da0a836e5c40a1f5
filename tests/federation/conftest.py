"""Two real facility archives (Orthanc, Debian package), started once per test module: one
federated by DICOMweb, one by DIMSE only (its DICOMweb plugin is not even loaded)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pydicom
import pytest
from sqlmodel import Session

from broker.app import build_state
from broker.deps import AppState
from broker.facilities import service as facilities
from broker.settings import Settings
from tests.peers import OrthancPeer, orthanc
from tests.support import ADMIN, TEST_FILES

BROKER_AE = "SCANONCE"
# (study UID, modality) of what each archive holds at the start of every test.
WEB_FILES = ("CT_small.dcm", "MR_small.dcm")
DIMSE_FILES = ("rtplan.dcm", "rtdose.dcm")


def study_uid_of(name: str) -> str:
    return str(pydicom.dcmread(TEST_FILES / name, stop_before_pixels=True).StudyInstanceUID)


def upload(peer: OrthancPeer, data: bytes) -> None:
    httpx.post(f"{peer.url}/instances", content=data, timeout=30, trust_env=False).raise_for_status()


def delete_study(peer: OrthancPeer, study_uid: str) -> None:
    found = httpx.post(f"{peer.url}/tools/lookup", content=study_uid, timeout=10, trust_env=False).json()
    for item in found:
        if item["Type"] == "Study":
            httpx.delete(f"{peer.url}/studies/{item['ID']}", timeout=10, trust_env=False).raise_for_status()


def delete_series(peer: OrthancPeer, series_uid: str) -> None:
    found = httpx.post(f"{peer.url}/tools/lookup", content=series_uid, timeout=10, trust_env=False).json()
    for item in found:
        if item["Type"] == "Series":
            httpx.delete(f"{peer.url}/series/{item['ID']}", timeout=10, trust_env=False).raise_for_status()


@dataclass
class Archives:
    web: OrthancPeer
    dimse: OrthancPeer


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archives]:
    base = tmp_path_factory.mktemp("archives")
    # The broker is a registered modality of both archives, as a facility would set it up.
    broker = {"scanonce": [BROKER_AE, "127.0.0.1", 104]}
    with (
        orthanc(base / "web", aet="WEBPACS", modalities=broker) as web,
        orthanc(base / "dimse", aet="DIMSEPACS", dicomweb=False, modalities=broker) as dimse,
    ):
        for peer, names in ((web, WEB_FILES), (dimse, DIMSE_FILES)):
            for name in names:
                upload(peer, (TEST_FILES / name).read_bytes())
        yield Archives(web=web, dimse=dimse)


@pytest.fixture
def state(settings: Settings) -> Iterator[AppState]:
    st = build_state(settings)
    try:
        yield st
    finally:
        st.engine.dispose()


@pytest.fixture
def federated(state: AppState, archives: Archives) -> AppState:
    """The broker with both archives registered: `web` (DICOMweb) and `dimse` (DIMSE only)."""
    with Session(state.engine) as session:
        facilities.add_facility(
            session=session,
            principal=ADMIN,
            facility_id="web",
            issuer="WEBHOSP",
            name="Web General",
            dicomweb_url=archives.web.dicomweb_url,
            sharing_policy="index_only",
        )
        facilities.add_facility(
            session=session,
            principal=ADMIN,
            facility_id="dimse",
            issuer="DIMSEHOSP",
            name="DIMSE County",
            ae_title=archives.dimse.aet,
            host=archives.dimse.host,
            port=archives.dimse.dicom_port,
            calling_ae_titles=["DIMSEPACS"],
            sharing_policy="index_only",
        )
    return state
