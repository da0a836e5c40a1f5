"""DIMSE accesses in the audit trail, against dcmtk as the SCU: C-STORE recorded with the stored
rows, C-FIND and C-GET recorded before they answer, each with the calling AE as the agent."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import text
from sqlmodel import Session

from broker.audit import service
from broker.audit.service import AuditQuery
from broker.security import policy
from broker.security.schemas import Role
from tests.dimse.conftest import Node, _start
from tests.peers import dcmtk
from tests.support import make_ds, write


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    yield from _start(tmp_path)


def _events(node: Node, **kw: Any) -> list[dict[str, object]]:
    with Session(node.state.engine) as session:
        return service.search(session=session, query=AuditQuery(**kw))[1]


def test_store_find_and_get_are_recorded_with_the_calling_ae(node: Node, tmp_path: Path) -> None:
    study = generate_uid()
    path = write(
        tmp_path, "one.dcm", make_ds(sop=generate_uid(), study=study, series=generate_uid(), pid="DIM-1")
    )
    dcmtk("storescu", "-aet", "MODALITY1", "-aec", node.aet, "127.0.0.1", str(node.port), path)
    out = tmp_path / "find"
    out.mkdir()
    dcmtk(
        "findscu", "-aet", "VIEWER1", "-aec", node.aet, "-S", "-X", "-od", str(out),
        "-k", "QueryRetrieveLevel=STUDY", "-k", "PatientID=DIM-1", "-k", "StudyInstanceUID",
        "127.0.0.1", str(node.port),
    )  # fmt: skip
    assert len(list(out.glob("rsp*.dcm"))) == 1
    got = tmp_path / "got"
    got.mkdir()
    dcmtk(
        "getscu", "-aet", "VIEWER2", "-aec", node.aet, "-S", "-od", str(got),
        "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}", "127.0.0.1", str(node.port),
    )  # fmt: skip
    assert len(list(got.iterdir())) == 1

    (store,) = _events(node, subtype="store")
    assert store["agent_who"] == "ae:MODALITY1" and store["source_interface"] == "dimse"
    assert store["patient_id"] == "DIM-1" and store["study_uid"] == study
    assert store["client_address"] == "127.0.0.1" and store["outcome"] == "0"
    (query,) = _events(node, subtype="query")
    assert query["agent_who"] == "ae:VIEWER1" and query["patient_id"] == "DIM-1"
    assert "C-FIND" in str(query["entity"]) and "PatientID=DIM-1" in str(query["entity"])
    (retrieve,) = _events(node, subtype="retrieve")
    assert retrieve["agent_who"] == "ae:VIEWER2" and retrieve["action"] == "R"
    # Named by study only: the patient comes from the index.
    assert retrieve["study_uid"] == study and retrieve["patient_id"] == "DIM-1"
    assert service.verify(engine=node.state.engine).ok


def test_without_an_audit_trail_dimse_refuses_and_stores_nothing(node: Node, tmp_path: Path) -> None:
    engine = node.state.engine
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE audit_event RENAME TO audit_event_away"))
    path = write(
        tmp_path,
        "one.dcm",
        make_ds(sop=generate_uid(), study=generate_uid(), series=generate_uid(), pid="DIM-2"),
    )
    store = dcmtk(
        "storescu",
        "-v",
        "-aet",
        "MODALITY1",
        "-aec",
        node.aet,
        "127.0.0.1",
        str(node.port),
        path,
        check=False,
    )
    assert store.returncode != 0
    assert "Refused: OutOfResources" in store.stderr, store.stderr
    out = tmp_path / "find"
    out.mkdir()
    found = dcmtk(
        "findscu", "-v", "-aet", "VIEWER1", "-aec", node.aet, "-S", "-X", "-od", str(out),
        "-k", "QueryRetrieveLevel=STUDY", "-k", "PatientID=DIM-1", "127.0.0.1", str(node.port),
        check=False,
    )  # fmt: skip
    assert "Refused: OutOfResources" in found.stderr, found.stderr
    assert list(out.glob("rsp*.dcm")) == []
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE audit_event_away RENAME TO audit_event"))
        assert conn.execute(text("SELECT count(*) FROM instance")).scalar_one() == 0


def test_a_refused_dimse_query_is_recorded_as_a_failure(
    node: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A policy in which facility nodes (every DIMSE peer) hold no image permission.
    monkeypatch.setitem(policy.ROLE_PERMISSIONS, Role.facility, frozenset({policy.Permission.authenticated}))
    found = dcmtk(
        "findscu", "-v", "-aet", "VIEWER9", "-aec", node.aet, "-S",
        "-k", "QueryRetrieveLevel=STUDY", "-k", "PatientID=DIM-3", "127.0.0.1", str(node.port),
        check=False,
    )  # fmt: skip
    assert "Status: 0x124" in found.stderr, found.stderr
    (event,) = _events(node, agent="ae:VIEWER9")
    assert event["subtype"] == "query" and event["outcome"] == "4"
    assert event["patient_id"] == "DIM-3" and "refused" in str(event["outcome_desc"])
