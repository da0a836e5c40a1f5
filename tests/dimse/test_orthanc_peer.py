"""A real PACS (Orthanc) using the broker's SCP the way a facility would: it pushes a study by
C-STORE (its AE title registered to the facility, open mode off), queries by C-FIND and pulls
the study back by C-MOVE."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
from sqlmodel import Session

from broker.demo import synth
from broker.facilities import service as facilities
from broker.index.schemas import Query
from broker.index.service import search
from tests.dimse.conftest import Node, synthetic_studies
from tests.peers import orthanc
from tests.support import ADMIN


def _rest(method: str, url: str, **kwargs: Any) -> Any:
    response = httpx.request(method, url, timeout=60, trust_env=False, **kwargs)
    response.raise_for_status()
    return response.json() if response.content else None


def test_orthanc_pushes_queries_and_pulls_back(closed_node: Node, tmp_path: Path) -> None:
    node = closed_node
    mr = [ds for ds in synthetic_studies() if ds.Modality == "MR"]
    study_uid = mr[0].StudyInstanceUID
    modalities = {"scanonce": [node.aet, "127.0.0.1", node.port]}
    with orthanc(tmp_path / "pacs", aet="ORTHPACS", dicomweb=False, modalities=modalities) as pacs:
        with Session(node.state.engine) as session:
            facilities.add_facility(
                session=session, principal=ADMIN,
                facility_id="orth", issuer="ORTH", ae_title=pacs.aet, host=pacs.host,
                port=pacs.dicom_port, calling_ae_titles=[pacs.aet],
            )  # fmt: skip
        ids = [
            _rest("POST", f"{pacs.url}/instances", content=synth.write_part10(ds))["ParentStudy"] for ds in mr
        ]

        # C-STORE from the facility's PACS: indexed under that facility.
        _rest(
            "POST", f"{pacs.url}/modalities/scanonce/store", json={"Resources": [ids[0]], "Synchronous": True}
        )
        with Session(node.state.engine) as session:
            found = search(session=session, query=Query(level="instance", facility_id="orth", limit=100))
        assert {m["00080018"]["Value"][0] for m in found.matches} == {ds.SOPInstanceUID for ds in mr}

        # C-FIND from the PACS.
        query = _rest(
            "POST", f"{pacs.url}/modalities/scanonce/query",
            json={"Level": "Study", "Query": {"PatientID": mr[0].PatientID, "StudyInstanceUID": "",
                                               "ModalitiesInStudy": ""}},
        )  # fmt: skip
        answers = _rest("GET", f"{pacs.url}/queries/{query['ID']}/answers?expand&simplify")
        assert [a["StudyInstanceUID"] for a in answers] == [study_uid]
        assert answers[0]["ModalitiesInStudy"] == "MR"

        # The PACS loses the study and pulls it back from the broker by C-MOVE.
        _rest("DELETE", f"{pacs.url}/studies/{ids[0]}")
        assert _rest("GET", f"{pacs.url}/studies") == []
        _rest(
            "POST", f"{pacs.url}/modalities/scanonce/move",
            json={"Level": "Study", "Resources": [{"StudyInstanceUID": study_uid}], "TargetAet": pacs.aet,
                  "Synchronous": True},
        )  # fmt: skip
        back = _rest("GET", f"{pacs.url}/instances?expand")
        assert {i["MainDicomTags"]["SOPInstanceUID"] for i in back} == {ds.SOPInstanceUID for ds in mr}
