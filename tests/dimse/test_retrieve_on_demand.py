"""C-MOVE of a study the broker knows only from a facility's archive (a real Orthanc, DIMSE only):
the broker fetches it, then sends it; with the facility down, the C-MOVE fails naming it."""

from __future__ import annotations

from pathlib import Path

import httpx
import pydicom
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove  # type: ignore[attr-defined]
from sqlmodel import Session

from broker.demo import synth
from broker.facilities import service as facilities
from broker.federation import service as federation
from tests.dimse.conftest import TEST_FILES, Node, synthetic_studies
from tests.peers import dcmtk, orthanc, storescp
from tests.support import ADMIN


def _upload(url: str, data: bytes) -> None:
    httpx.post(f"{url}/instances", content=data, timeout=30, trust_env=False).raise_for_status()


def test_move_fetches_a_remote_only_study_then_fails_clearly_when_its_facility_is_down(
    node: Node, tmp_path: Path
) -> None:
    mr = [ds for ds in synthetic_studies() if ds.Modality == "MR"]
    rtplan = pydicom.dcmread(TEST_FILES / "rtplan.dcm", stop_before_pixels=True)
    broker = {"scanonce": [node.aet, "127.0.0.1", node.port]}
    with storescp(tmp_path / "sink", aet="VIEWER") as sink:
        node.peers.add_destination("VIEWER", "127.0.0.1", sink.port)
        with orthanc(tmp_path / "pacs", aet="FARPACS", dicomweb=False, modalities=broker) as pacs:
            for ds in mr:
                _upload(pacs.url, synth.write_part10(ds))
            _upload(pacs.url, (TEST_FILES / "rtplan.dcm").read_bytes())
            with Session(node.state.engine) as session:
                facilities.add_facility(
                    session=session, principal=ADMIN,
                    facility_id="far", issuer="FAR", ae_title=pacs.aet, host=pacs.host,
                    port=pacs.dicom_port, sharing_policy="index_only",
                )  # fmt: skip
            federation.sync_facility(engine=node.state.engine, store=node.state.store, facility_id="far")
            assert list(node.state.store.list()) == []  # indexed only: the pixels stayed at the facility

            dcmtk(
                "movescu", "-aet", "PACS1", "-aec", node.aet, "-aem", "VIEWER", "-S",
                "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={mr[0].StudyInstanceUID}",
                "127.0.0.1", str(node.port),
            )  # fmt: skip
            received = {pydicom.dcmread(p).SOPInstanceUID for p in sink.files()}
            assert received == {ds.SOPInstanceUID for ds in mr}
            assert len(list(node.state.store.list())) == len(mr)  # fetched once, now held here

        # The facility is gone: a study held only there cannot be retrieved; the peer is told why.
        ae = AE(ae_title="PACS1")
        model = StudyRootQueryRetrieveInformationModelMove
        ae.add_requested_context(model)
        assoc = ae.associate("127.0.0.1", node.port, ae_title=node.aet)
        try:
            identifier = pydicom.Dataset()
            identifier.QueryRetrieveLevel = "STUDY"
            identifier.StudyInstanceUID = rtplan.StudyInstanceUID
            responses = list(assoc.send_c_move(identifier, "VIEWER", model))
        finally:
            assoc.release()
        final, _ = responses[-1]
        assert final.Status == 0xA702
        assert "far" in final.ErrorComment
        assert {pydicom.dcmread(p).SOPInstanceUID for p in sink.files()} == received  # nothing else sent


def test_move_of_a_study_its_facility_sends_in_part_fails_saying_what_is_missing(
    node: Node, tmp_path: Path
) -> None:
    """C-MOVE of a study whose fetch left an instance missing: nothing is sent (the destination
    would take part of the study for all of it), and the peer is told how many are missing and
    from which facility."""
    mr = [ds for ds in synthetic_studies() if ds.Modality == "MR"]
    broker = {"scanonce": [node.aet, "127.0.0.1", node.port]}
    with (
        storescp(tmp_path / "sink", aet="VIEWER") as sink,
        orthanc(tmp_path / "pacs", aet="FARPACS", dicomweb=False, modalities=broker) as pacs,
    ):
        node.peers.add_destination("VIEWER", "127.0.0.1", sink.port)
        for ds in mr:
            _upload(pacs.url, synth.write_part10(ds))
        with Session(node.state.engine) as session:
            facilities.add_facility(
                session=session, principal=ADMIN,
                facility_id="far", issuer="FAR", ae_title=pacs.aet, host=pacs.host,
                port=pacs.dicom_port, sharing_policy="index_only",
            )  # fmt: skip
        federation.sync_facility(engine=node.state.engine, store=node.state.store, facility_id="far")
        # The facility lost an instance after its index listed it.
        lost = mr[-1].SOPInstanceUID
        (item,) = httpx.post(f"{pacs.url}/tools/lookup", content=lost, timeout=10, trust_env=False).json()
        httpx.delete(f"{pacs.url}/instances/{item['ID']}", timeout=10, trust_env=False).raise_for_status()

        ae = AE(ae_title="PACS1")
        model = StudyRootQueryRetrieveInformationModelMove
        ae.add_requested_context(model)
        assoc = ae.associate("127.0.0.1", node.port, ae_title=node.aet)
        try:
            identifier = pydicom.Dataset()
            identifier.QueryRetrieveLevel = "STUDY"
            identifier.StudyInstanceUID = mr[0].StudyInstanceUID
            responses = list(assoc.send_c_move(identifier, "VIEWER", model))
        finally:
            assoc.release()
        final, _ = responses[-1]
        assert final.Status == 0xA702
        assert f"1 of {len(mr)} instances of the study are missing from facility 'far'" in final.ErrorComment
        assert sink.files() == []
        assert len(list(node.state.store.list())) == len(mr) - 1  # what arrived is kept
