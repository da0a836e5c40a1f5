"""C-FIND, C-MOVE and C-GET while the database is away (PostgreSQL behind a TCP relay the test
cuts): a real peer (pynetdicom) gets the standard failure status with an ErrorComment that names
no internals, on an association that stays up, never a hang, an abort or pynetdicom's 0xC211
("unhandled exception"); a new association meanwhile gets a status too. Once the database is
back, the same association is answered again."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, build_context
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from sqlmodel import Session

from broker.app import build_state
from broker.dimse.scp import start_scp, stop_scp
from broker.facilities import service as facilities
from broker.settings import Settings
from tests.conftest import CuttablePg, s3_storage_url
from tests.ops.proxy import TcpProxy
from tests.support import ADMIN

pytestmark = pytest.mark.postgres

# What a failure comment may not carry: the database's address, driver names, SQL, exceptions.
LEAKS = ("127.0.0.1", "psycopg", "sqlalchemy", "SELECT", "Error", "postgres", "connection")


@pytest.fixture
def cut_node(
    cuttable_pg: CuttablePg, tmp_path: Path, moto_server: str, s3_bucket: str
) -> Iterator[tuple[int, str, TcpProxy]]:
    settings = Settings(
        data_dir=tmp_path,
        host="127.0.0.1",
        dimse_port=0,
        mllp_port=0,
        database_url=cuttable_pg.database_url,
        storage_url=s3_storage_url(moto_server, s3_bucket),
        db_connect_timeout_seconds=2,
        dimse_open_mode=False,  # as in production: only registered calling AEs
    )
    state = build_state(settings)
    with Session(state.engine) as session:
        facilities.add_facility(
            session=session,
            principal=ADMIN,
            facility_id="outage",
            issuer="OUTAGE",
            calling_ae_titles=[("OUTAGE", "127.0.0.1/32")],
        )
    scp = start_scp(state=state, port=0)
    try:
        yield scp.port, settings.ae_title, cuttable_pg.proxy
    finally:
        stop_scp(scp)
        state.engine.dispose()


def _associate(port: int, aet: str, calling: str = "OUTAGE") -> Any:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    contexts = [
        build_context(uid)
        for uid in (
            Verification,
            StudyRootQueryRetrieveInformationModelFind,
            StudyRootQueryRetrieveInformationModelMove,
            StudyRootQueryRetrieveInformationModelGet,
            CTImageStorage,
        )
    ]
    ae.requested_contexts = contexts
    assoc = ae.associate("127.0.0.1", port, ae_title=aet)
    assert assoc.is_established
    return assoc


def _identifier() -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.PatientID = ""
    return ds


def _final(responses: Any) -> Dataset:
    answers = [status for status, _identifier in responses]
    assert answers and answers[-1] is not None, "no final response (association dropped?)"
    return answers[-1]


def _assert_failure(status: Dataset, allowed: set[int]) -> None:
    assert status.Status in allowed, hex(status.Status)
    comment = str(status.get("ErrorComment", ""))
    assert comment, "a failure says why"
    assert not any(leak.lower() in comment.lower() for leak in LEAKS), comment


FIND = {0xA700, 0xC001}
RETRIEVE = {0xA700, 0xA702, 0xC001}


def test_query_retrieve_answer_a_failure_status_while_the_database_is_away(
    cut_node: tuple[int, str, TcpProxy],
) -> None:
    port, aet, proxy = cut_node
    assoc = _associate(port, aet)  # established while the database answers
    try:
        assert (
            _final(assoc.send_c_find(_identifier(), StudyRootQueryRetrieveInformationModelFind)).Status == 0
        )
        proxy.stop()  # refused, and the pooled connections dropped
        _assert_failure(
            _final(assoc.send_c_find(_identifier(), StudyRootQueryRetrieveInformationModelFind)), FIND
        )
        _assert_failure(
            _final(assoc.send_c_get(_identifier(), StudyRootQueryRetrieveInformationModelGet)), RETRIEVE
        )
        _assert_failure(
            _final(assoc.send_c_move(_identifier(), "OUTAGE", StudyRootQueryRetrieveInformationModelMove)),
            RETRIEVE,
        )
        assert assoc.is_established  # answered, not aborted
        assert assoc.send_c_echo().Status == 0
        proxy.start()
        assert (
            _final(assoc.send_c_find(_identifier(), StudyRootQueryRetrieveInformationModelFind)).Status == 0
        )
    finally:
        assoc.release()


def test_an_association_while_the_database_is_away_gets_a_status(cut_node: tuple[int, str, TcpProxy]) -> None:
    """The calling AE cannot be looked up at negotiation: let in (a registered peer must not be
    told "not recognised"), answered "unavailable" meanwhile, and refused once the registry can
    be read again if it is not registered after all."""
    port, aet, proxy = cut_node
    proxy.stop()
    known, stranger = _associate(port, aet), _associate(port, aet, calling="STRANGER")
    try:
        for assoc in (known, stranger):
            _assert_failure(
                _final(assoc.send_c_find(_identifier(), StudyRootQueryRetrieveInformationModelFind)), FIND
            )
            assert assoc.is_established
        proxy.start()
        assert (
            _final(known.send_c_find(_identifier(), StudyRootQueryRetrieveInformationModelFind)).Status == 0
        )
        refused = _final(stranger.send_c_find(_identifier(), StudyRootQueryRetrieveInformationModelFind))
        assert refused.Status == 0x0124
    finally:
        known.release()
        stranger.release()
    # Back: a stranger's new association is rejected at negotiation as before.
    ae = AE(ae_title="STRANGER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=aet)
    assert assoc.is_rejected
