"""IssuerOfPatientID over the wire: an object stored with its own issuer through a facility whose
issuer differs is answered, by QIDO-RS and by C-FIND alike, with its own issuer and found by it."""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from broker.dimse.scp import start_scp, stop_scp
from tests.dicomweb.conftest import LiveServer
from tests.dicomweb.data import multipart_body
from tests.peers import dcmtk
from tests.support import TEST_FILES, to_bytes


def _object(pid: str, issuer: str | None) -> tuple[str, bytes]:
    ds = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = (generate_uid() for _ in range(3))
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientID = pid
    if issuer is None:
        if "IssuerOfPatientID" in ds:
            del ds.IssuerOfPatientID
    else:
        ds.IssuerOfPatientID = issuer
    return str(ds.StudyInstanceUID), to_bytes(ds)


def test_qido_rs_and_c_find_answer_and_match_the_objects_own_issuer(
    live_server: LiveServer, tmp_path: Path
) -> None:
    own, own_bytes = _object("X", "HOSP-A")
    bare, bare_bytes = _object("X", None)
    with live_server.http() as http:
        body, ctype = multipart_body([own_bytes, bare_bytes])
        r = http.post("/facilities/local/dicom-web/studies", content=body, headers={"Content-Type": ctype})
        assert r.status_code == 200, r.text

        def qido(query: str) -> dict[str, str]:
            r = http.get(f"/dicom-web/studies?{query}")
            found = (
                {m["0020000D"]["Value"][0]: m["00100021"]["Value"][0] for m in r.json()} if r.content else {}
            )
            # PS3.18 8.3.4.4.1: matches are a 200, no match is a 204 (never an empty 200).
            assert r.status_code == (200 if found else 204), r.text
            return found

        assert qido("PatientID=X") == {own: "HOSP-A", bare: "LOCAL"}
        assert qido("PatientID=X&IssuerOfPatientID=HOSP-A") == {own: "HOSP-A"}
        assert qido("PatientID=X&IssuerOfPatientID=LOCAL") == {own: "HOSP-A", bare: "LOCAL"}
        r = http.get("/dicom-web/series?PatientID=X&IssuerOfPatientID=HOSP-A&includefield=IssuerOfPatientID")
        assert [m["00100021"]["Value"] for m in r.json()] == [["HOSP-A"]]

    state = live_server.app.state.scanonce  # type: ignore[attr-defined]
    scp = start_scp(state=state, port=0)
    try:
        out = tmp_path / "find"
        out.mkdir()
        dcmtk(
            "findscu", "-aet", "VIEWER", "-aec", state.settings.ae_title, "-S", "-X", "-od", str(out),
            "-k", "QueryRetrieveLevel=STUDY", "-k", "PatientID=X", "-k", "IssuerOfPatientID=HOSP-A",
            "-k", "StudyInstanceUID", "127.0.0.1", str(scp.port),
        )  # fmt: skip
        found = [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]
        assert [(f.StudyInstanceUID, f.IssuerOfPatientID) for f in found] == [(own, "HOSP-A")]
    finally:
        stop_scp(scp)
