"""The peers other tests rely on really start, answer, and stop."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.peers import PeerError, dcmtk, free_port, orthanc, storescp
from tests.support import TEST_FILES

CT = TEST_FILES / "CT_small.dcm"


def test_orthanc_starts_answers_dicomweb_and_dimse_then_stops(tmp_path: Path) -> None:
    with orthanc(tmp_path / "orthanc", aet="PEERTEST") as peer:
        system = httpx.get(f"{peer.url}/system", timeout=5).json()
        assert system["DicomAet"] == "PEERTEST"
        assert system["DicomPort"] == peer.dicom_port
        assert "dicom-web" in httpx.get(f"{peer.url}/plugins", timeout=5).json()

        # An instance stored by DIMSE is found by DICOMweb QIDO-RS.
        dcmtk("storescu", "-aec", peer.aet, peer.host, str(peer.dicom_port), str(CT), timeout=20)
        studies = httpx.get(f"{peer.dicomweb_url}/studies", params={"PatientID": "1CT1"}, timeout=5)
        assert studies.status_code == 200
        assert [s["0020000D"]["Value"][0] for s in studies.json()] == [
            "1.3.6.1.4.1.5962.1.2.1.20040119072730.12322"
        ]
        assert studies.headers["content-type"].startswith("application/dicom+json")
        # Its data lives in the test's folder, not in /var/lib/orthanc.
        assert any(peer.storage_dir.rglob("*"))
        proc = peer.process
    assert proc.poll() is not None, "Orthanc still running after the context exited"
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{peer.url}/system", timeout=2)


def test_orthanc_without_dicomweb_has_no_dicomweb_routes(tmp_path: Path) -> None:
    with orthanc(tmp_path, dicomweb=False, modalities={"sink": ["SINK", "127.0.0.1", 1]}) as peer:
        assert "dicom-web" not in httpx.get(f"{peer.url}/plugins", timeout=5).json()
        assert httpx.get(f"{peer.dicomweb_url}/studies", timeout=5).status_code == 404
        assert httpx.get(f"{peer.url}/modalities", timeout=5).json() == ["sink"]


def test_storescp_receives_what_storescu_sends(tmp_path: Path) -> None:
    with storescp(tmp_path / "in", aet="SINK") as sink:
        dcmtk("echoscu", "-aec", "SINK", sink.host, str(sink.port), timeout=10)
        dcmtk("storescu", "-aec", "SINK", sink.host, str(sink.port), str(CT), timeout=20)
        assert len(sink.files()) == 1
        proc = sink.process
    assert proc.poll() is not None


def test_dcmtk_failure_is_reported_with_output(tmp_path: Path) -> None:
    # Nothing listens on a fresh free port: echoscu fails and the error says so.
    with pytest.raises(PeerError, match="echoscu"):
        dcmtk("echoscu", "127.0.0.1", str(free_port()), timeout=10)
