"""An archive that answers QIDO-RS with something that is not a DICOM JSON match list (an HTML
error page with 200, a JSON object, a list of non-objects, malformed attributes): the sync fails
with an error naming the facility and what it sent, and the index keeps what it had. A real HTTP
server on a loopback port stands in for the broken archive."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast

import pytest
from fastapi.testclient import TestClient
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pynetdicom import AE, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]
from sqlmodel import Session

from broker.app import create_app
from broker.deps import AppState
from broker.errors import Unavailable
from broker.facilities import service as facilities
from broker.federation import service
from broker.index.schemas import Query
from broker.index.service import remote_holders, search
from tests.federation.conftest import WEB_FILES, study_uid_of
from tests.support import ADMIN, auth_headers

WEB_STUDIES = {study_uid_of(n) for n in WEB_FILES}


class Garbage:
    """What the fake archive answers every GET with: (content type, body)."""

    answer: tuple[str, bytes] = ("text/html", b"<html>Service temporarily down</html>")


@pytest.fixture
def garbage_archive() -> Iterator[tuple[str, type[Garbage]]]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            ctype, body = Garbage.answer
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/dicom-web", Garbage
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _studies(state: AppState) -> set[str]:
    with Session(state.engine) as session:
        result = search(session=session, query=Query(level="study", filters={}, limit=1000))
    return {m["0020000D"]["Value"][0] for m in result.matches}


@pytest.mark.parametrize(
    "answer",
    [
        ("text/html", b"<html>Service temporarily down</html>"),
        ("application/dicom+json", b'{"error": "license expired"}'),
        ("application/dicom+json", b'["1.2.3", 4]'),
        ("application/dicom+json", b'[{"0020000D": {"vr": "UI", "Value": "1.2.3"}}]'),
        # Matches without a study UID, to the listing and to the follow-up check by UID alike.
        ("application/dicom+json", b'[{}, {"00100020": {"vr": "LO", "Value": ["P1"]}}]'),
    ],
    ids=["html", "object", "not-objects", "value-not-a-list", "no-unique-key"],
)
def test_a_facility_answering_garbage_fails_clearly_and_the_index_keeps_its_studies(
    federated: AppState, garbage_archive: tuple[str, type[Garbage]], answer: tuple[str, bytes]
) -> None:
    service.sync_facility(engine=federated.engine, store=federated.store, facility_id="web")
    assert _studies(federated) == WEB_STUDIES
    url, archive = garbage_archive
    archive.answer = answer
    with Session(federated.engine) as session:
        facilities.update_facility(session=session, principal=ADMIN, facility_id="web", dicomweb_url=url)

    with pytest.raises(Unavailable, match="'web'.*(not a DICOM JSON|no unique key)") as raised:
        service.sync_facility(engine=federated.engine, store=federated.store, facility_id="web")
    assert "Service temporarily down" not in raised.value.message and "license" not in raised.value.message

    assert _studies(federated) == WEB_STUDIES
    client = TestClient(create_app(state=federated), headers=auth_headers())
    sync = client.get("/api/facilities/web").json()["sync"]
    assert sync["last_status"] == "failed" and "'web'" in sync["last_error"]


def _raw(tag: int, vr: str, value: bytes) -> RawDataElement:
    return RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)


@pytest.fixture
def sloppy_cfind_archive() -> Iterator[int]:
    """A C-FIND SCP (pynetdicom, real association on a loopback port) whose archive holds two
    studies, one of them with a count that is not an integer string (IS 'abcd'), as archives
    with hand-edited databases send."""

    def identifier(uid: str, count: bytes, level: str) -> Dataset:
        ds = Dataset()
        ds.QueryRetrieveLevel = level
        ds[0x0020000D] = _raw(0x0020000D, "UI", uid.encode() + (b"\0" if len(uid) % 2 else b""))
        ds.PatientID, ds.IssuerOfPatientID, ds.ModalitiesInStudy = "P1", "SLOPPY", "CT"
        if level == "SERIES":
            ds.SeriesInstanceUID, ds.Modality = uid + ".1", "CT"
            ds[0x00201209] = _raw(0x00201209, "IS", count)
        else:
            ds[0x00201206] = _raw(0x00201206, "IS", b"1 ")
            ds[0x00201208] = _raw(0x00201208, "IS", count)
        return ds

    def on_find(event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        level = event.identifier.QueryRetrieveLevel
        yield 0xFF00, identifier("1.2.826.0.1.3680043.99.1", b"3 ", level)
        yield 0xFF00, identifier("1.2.826.0.1.3680043.99.2", b"abcd", level)

    ae = AE(ae_title="SLOPPY")
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    handlers: list[Any] = [(evt.EVT_C_FIND, on_find)]
    server = cast(Any, ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers))
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()


def test_a_c_find_answer_with_a_malformed_value_is_indexed_without_that_value(
    federated: AppState, sloppy_cfind_archive: int
) -> None:
    """One bad count in one study's C-FIND answer must not stop the facility's sync with a bare
    'invalid literal for int()': the value is left out (as a QIDO-RS one that is not a number)
    and both studies are indexed."""
    with Session(federated.engine) as session:
        facilities.add_facility(
            session=session,
            principal=ADMIN,
            facility_id="sloppy",
            issuer="SLOPPY",
            ae_title="SLOPPY",
            host="127.0.0.1",
            port=sloppy_cfind_archive,
            sharing_policy="index_only",
        )
    result = service.sync_facility(engine=federated.engine, store=federated.store, facility_id="sloppy")
    assert result.studies_seen == 2
    assert {"1.2.826.0.1.3680043.99.1", "1.2.826.0.1.3680043.99.2"} <= _studies(federated)


def test_a_retrieve_answered_with_an_html_page_names_the_facility_and_keeps_the_study_nearline(
    federated: AppState, garbage_archive: tuple[str, type[Garbage]]
) -> None:
    service.sync_facility(engine=federated.engine, store=federated.store, facility_id="web")
    url, archive = garbage_archive
    archive.answer = ("text/html", b"<html>Please log in</html>")
    with Session(federated.engine) as session:
        facilities.update_facility(session=session, principal=ADMIN, facility_id="web", dicomweb_url=url)
    study = study_uid_of("CT_small.dcm")
    with pytest.raises(Unavailable, match="'web'.*not multipart"):
        service.ensure_local(engine=federated.engine, store=federated.store, study_uid=study)
    with Session(federated.engine) as session:
        assert remote_holders(session=session, study_uid=study) == ["web"]
