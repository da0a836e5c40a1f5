"""An archive that answers QIDO-RS with something that is not a DICOM JSON match list (an HTML
error page with 200, a JSON object, a list of non-objects, malformed attributes): the sync fails
with an error naming the facility and what it sent, and the index keeps what it had. A real HTTP
server on a loopback port stands in for the broken archive."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session

from broker.app import create_app
from broker.deps import AppState
from broker.errors import Unavailable
from broker.facilities import service as facilities
from broker.federation import service
from broker.index.schemas import Query
from broker.index.service import search
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
    ],
    ids=["html", "object", "not-objects", "value-not-a-list"],
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

    with pytest.raises(Unavailable, match="'web'.*not a DICOM JSON") as raised:
        service.sync_facility(engine=federated.engine, store=federated.store, facility_id="web")
    assert "Service temporarily down" not in raised.value.message and "license" not in raised.value.message

    assert _studies(federated) == WEB_STUDIES
    client = TestClient(create_app(state=federated), headers=auth_headers())
    sync = client.get("/api/facilities/web").json()["sync"]
    assert sync["last_status"] == "failed" and "not a DICOM JSON" in sync["last_error"]
