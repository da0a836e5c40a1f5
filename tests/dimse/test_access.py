"""Who may talk DIMSE to the broker (calling AE title *and* peer address), what the policy lets a
DIMSE peer do, open mode only on loopback, and DICOM TLS: against dcmtk's tools as real peers."""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from sqlmodel import Session

from broker.demo import synth
from broker.dimse.scp import start_scp
from broker.errors import BadRequest
from broker.facilities import service as facilities
from broker.index.schemas import Query
from broker.index.service import search
from broker.peers import dimse as scu
from broker.security import policy, tls
from broker.security.schemas import Principal, Role
from broker.security.service import principal_for_dimse
from broker.settings import Settings
from tests.dimse.conftest import Node, _start, synthetic_studies
from tests.peers import dcmtk
from tests.pki import make_pki
from tests.support import ADMIN

SCANONCE = str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "scanonce")


def _register(node: Node, facility: str, issuer: str, calling: list[Any]) -> None:
    with Session(node.state.engine) as session:
        facilities.add_facility(
            session=session, principal=ADMIN, facility_id=facility, issuer=issuer, calling_ae_titles=calling
        )


def _echo(node: Node, aet: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return dcmtk("echoscu", *extra, "-aet", aet, "-aec", node.aet, "127.0.0.1", str(node.port), check=False)


def _associate(
    node: Node,
    aet: str,
    *,
    source: str = "127.0.0.1",
    contexts: Any = (Verification,),
    tls_args: tuple[ssl.SSLContext, str] | None = None,
) -> Any:
    ae = AE(ae_title=aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    for cx in contexts:
        ae.add_requested_context(cx)
    return ae.associate(
        "127.0.0.1", node.port, ae_title=node.aet, bind_address=(source, 0), tls_args=tls_args
    )


def _rejected_calling_ae_not_recognised(assoc: Any) -> bool:
    rj = cast(Any, assoc.acceptor.primitive)
    # A-ASSOCIATE-RJ: rejected-permanent (1), by the service user (1), calling AE title not
    # recognised (3).
    return bool(assoc.is_rejected) and (rj.result, rj.result_source, rj.diagnostic) == (1, 1, 3)


def _studies_of(node: Node, facility: str) -> list[str]:
    with Session(node.state.engine) as session:
        result = search(session=session, query=Query(level="study", facility_id=facility))
    return [m["0020000D"]["Value"][0] for m in result.matches]


# -- the allow-list: calling AE title and peer address ----------------------------------------


def test_a_registered_ae_is_let_in_only_from_its_network(closed_node: Node, tmp_path: Path) -> None:
    _register(
        closed_node,
        "northgen",
        "NORTH-GENERAL",
        [("NG_PACS", "127.0.0.1/32"), ("NG_CT", "127.0.0.2"), ("NG_FAR", "10.20.0.0/16"), "NG_LOCAL"],
    )
    with Session(closed_node.state.engine) as session:
        nets = {
            a.ae_title: a.network for a in facilities.calling_aes(session=session, facility_id="northgen")
        }
    assert nets == {
        "NG_PACS": "127.0.0.1/32",
        "NG_CT": "127.0.0.2/32",
        "NG_FAR": "10.20.0.0/16",
        "NG_LOCAL": None,
    }

    # From its network: echo, store (into its own facility's partition), find.
    assert _echo(closed_node, "NG_PACS").returncode == 0
    study = synthetic_studies()[:2]
    paths = synth.write_files(study, tmp_path / "send")
    dcmtk("storescu", "-aet", "NG_PACS", "-aec", closed_node.aet, "127.0.0.1", str(closed_node.port), *paths)
    assert _studies_of(closed_node, "northgen") == [study[0].StudyInstanceUID]
    found = dcmtk(
        "findscu", "-S", "-aet", "NG_PACS", "-aec", closed_node.aet, "-k", "QueryRetrieveLevel=STUDY",
        "-k", f"StudyInstanceUID={study[0].StudyInstanceUID}", "127.0.0.1", str(closed_node.port),
    )  # fmt: skip
    assert study[0].StudyInstanceUID in found.stdout + found.stderr

    # A known AE title from an address outside its network is no one: refused at association.
    for aet in ("NG_CT", "NG_FAR"):
        done = _echo(closed_node, aet)
        assert done.returncode != 0 and "Rejected" in done.stdout + done.stderr, aet
        assert _rejected_calling_ae_not_recognised(_associate(closed_node, aet)), aet
    stored = dcmtk(
        "storescu", "-aet", "NG_FAR", "-aec", closed_node.aet, "127.0.0.1", str(closed_node.port),
        *synth.write_files(synthetic_studies(seed=8)[:1], tmp_path / "far"), check=False,
    )  # fmt: skip
    assert stored.returncode != 0 and len(_studies_of(closed_node, "northgen")) == 1
    refused = dcmtk(
        "findscu", "-S", "-aet", "NG_FAR", "-aec", closed_node.aet, "-k", "QueryRetrieveLevel=STUDY",
        "-k", "StudyInstanceUID=", "127.0.0.1", str(closed_node.port), check=False,
    )  # fmt: skip
    assert refused.returncode != 0 and "Rejected" in refused.stdout + refused.stderr
    assert study[0].StudyInstanceUID not in refused.stdout + refused.stderr
    # ... and let in from its own (127.0.0.2 is loopback too, so the test can call from it).
    assoc = _associate(closed_node, "NG_CT", source="127.0.0.2")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()
    # Registered without a network: loopback only (the broker's own host).
    assert _echo(closed_node, "NG_LOCAL").returncode == 0
    # An AE title no facility registered, from anywhere.
    assert _rejected_calling_ae_not_recognised(_associate(closed_node, "STRANGER"))
    assert _echo(closed_node, "STRANGER").returncode != 0


def test_networks_are_validated_and_shown_by_the_api(closed_node: Node) -> None:
    with Session(closed_node.state.engine) as session:
        with pytest.raises(BadRequest, match="not a network"):
            facilities.add_facility(
                session=session, principal=ADMIN, facility_id="x", issuer="X",
                calling_ae_titles=[("X_PACS", "10.0.0.0/33")],
            )  # fmt: skip
        assert facilities.facility_for_calling_ae(session=session, ae_title="X_PACS") is None


# -- open mode --------------------------------------------------------------------------------


def test_open_mode_serves_loopback_only(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "d", host="0.0.0.0", dimse_port=0)
    from broker.app import build_state

    state = build_state(settings)
    try:
        with pytest.raises(BadRequest, match="SCANONCE_DIMSE_OPEN_MODE=false"):
            start_scp(state=state, port=0)
    finally:
        state.engine.dispose()


def test_serve_beyond_loopback_in_open_mode_refuses_to_start_and_says_how(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "SCANONCE_DATA_DIR": str(tmp_path),
        "SCANONCE_HOST": "0.0.0.0",
        "SCANONCE_PORT": "0",
        "SCANONCE_DIMSE_PORT": "11112",
        "SCANONCE_MLLP_PORT": "0",
        "COLUMNS": "300",
    }
    env.pop("SCANONCE_DIMSE_OPEN_MODE", None)
    done = subprocess.run(
        [SCANONCE, "serve"], env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
    )
    assert done.returncode == 1 and done.stdout == ""
    assert "SCANONCE_DIMSE_OPEN_MODE=false" in done.stderr and "--calling-ae TITLE@CIDR" in done.stderr


def test_open_mode_on_loopback_takes_any_ae_as_the_default_facility(node: Node) -> None:
    assert _echo(node, "ANYONE").returncode == 0


# -- authorization: the same policy as HTTP ---------------------------------------------------


def test_a_dimse_peer_is_a_facility_node_of_its_facility() -> None:
    settings = Settings()
    peer = principal_for_dimse(settings=settings, calling_ae="NG_PACS", facility="northgen")
    assert (peer.role, peer.facility, peer.via, peer.who) == (
        Role.facility,
        "northgen",
        "dimse",
        "ae:NG_PACS",
    )
    # C-STORE only into its own facility's partition; queries and retrieves as QIDO/WADO.
    assert policy.decide_dimse(peer, "C-STORE", facility="northgen").allowed
    assert not policy.decide_dimse(peer, "C-STORE", facility="local").allowed
    for op in ("C-ECHO", "C-FIND", "C-MOVE", "C-GET"):
        assert policy.decide_dimse(peer, op).allowed, op
    assert not policy.decide_dimse(peer, "N-DELETE").allowed  # unknown: admin only
    # The HTTP rule for the same write gives the same answer.
    assert policy.decide(peer, "POST", "/facilities/northgen/dicom-web/studies").allowed
    assert not policy.decide(peer, "POST", "/facilities/local/dicom-web/studies").allowed
    clinician = Principal(who="c", role=Role.clinician, facility="local")
    assert not policy.decide_dimse(clinician, "C-STORE", facility="local").allowed


@pytest.fixture
def loaded(node: Node, tmp_path: Path) -> Iterator[tuple[Node, Dataset]]:
    study = synthetic_studies()[:2]
    paths = synth.write_files(study, tmp_path / "load")
    dcmtk("storescu", "-aet", "LOADER", "-aec", node.aet, "127.0.0.1", str(node.port), *paths)
    yield node, study[0]


def test_every_dimse_operation_asks_the_policy(
    loaded: tuple[Node, Dataset], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node, instance = loaded
    # An administrator's policy in which facility nodes hold no image permission at all.
    monkeypatch.setitem(policy.ROLE_PERMISSIONS, Role.facility, frozenset({policy.Permission.authenticated}))
    before = _studies_of(node, "local")
    assoc = _associate(
        node,
        "PEER",
        contexts=(
            Verification,
            CTImageStorage,
            StudyRootQueryRetrieveInformationModelFind,
            StudyRootQueryRetrieveInformationModelGet,
        ),
    )
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000  # C-ECHO needs only a known caller
    fresh = synthetic_studies(seed=9)[0]
    fresh.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    assert assoc.send_c_store(fresh).Status == 0x0124
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = instance.StudyInstanceUID
    answers = list(assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind))
    assert [a[0].Status for a in answers] == [0x0124]  # no match sent, only the refusal
    got = list(assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet))
    assert got[-1][0].Status == 0x0124
    assoc.release()
    assert _studies_of(node, "local") == before

    # C-MOVE: the refusal, and no sub-association to the destination.
    with socket.socket() as destination:
        destination.bind(("127.0.0.1", 0))
        destination.listen()
        destination.setblocking(False)
        node.peers.add_destination("DEST", "127.0.0.1", destination.getsockname()[1])
        mover = _associate(node, "PEER", contexts=(StudyRootQueryRetrieveInformationModelMove,))
        moved = list(mover.send_c_move(query, "DEST", StudyRootQueryRetrieveInformationModelMove))
        assert moved[0][0].Status == 0x0124
        mover.join(timeout=30)  # the association ends: aborted after the refusal
        assert not mover.is_established
        with pytest.raises(BlockingIOError):
            destination.accept()  # the broker never connected to the destination

    # dcmtk sees the same refusals.
    found = dcmtk(
        "findscu", "-v", "-S", "-aet", "PEER", "-aec", node.aet, "-k", "QueryRetrieveLevel=STUDY",
        "-k", f"StudyInstanceUID={instance.StudyInstanceUID}", "127.0.0.1", str(node.port), check=False,
    )  # fmt: skip
    assert "Final Find Response (Unknown Status: 0x124)" in found.stdout + found.stderr
    path = synth.write_files([fresh], tmp_path / "fresh")[0]
    stored = dcmtk(
        "storescu", "-v", "-aet", "PEER", "-aec", node.aet, "127.0.0.1", str(node.port), path, check=False
    )
    assert "Received Store Response (Unknown Status: 0x124)" in stored.stdout + stored.stderr
    assert _studies_of(node, "local") == before


# -- DICOM TLS --------------------------------------------------------------------------------


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    """A CA, the broker's server certificate, a client certificate it signed, and a rogue client
    certificate (self-signed) - generated here, nothing shipped."""
    return make_pki(
        tmp_path / "pki",
        {
            "server": (True, True),
            "client": (True, False),
            "rogue": (False, False),
            "sm_pacs": (True, False),  # two facilities' PACS, for binding certificates to AE titles
            "kids_pacs": (True, False),
        },
    )


@pytest.fixture
def tls_node(tmp_path: Path, pki: dict[str, Path]) -> Iterator[Node]:
    yield from _start(
        tmp_path,
        dimse_tls_cert_file=pki["server_crt"],
        dimse_tls_key_file=pki["server_key"],
        dimse_tls_ca_file=pki["ca"],
    )


def test_dimse_over_tls_with_dcmtk_and_a_client_without_a_valid_certificate_is_refused(
    tls_node: Node, pki: dict[str, Path], tmp_path: Path
) -> None:
    node = tls_node
    with_cert = ["+tls", str(pki["client_key"]), str(pki["client_crt"]), "+cf", str(pki["ca"])]
    assert _echo(node, "TLSPEER", *with_cert).returncode == 0
    study = synthetic_studies()[:2]
    paths = synth.write_files(study, tmp_path / "tls")
    dcmtk("storescu", *with_cert, "-aet", "TLSPEER", "-aec", node.aet, "127.0.0.1", str(node.port), *paths)
    assert _studies_of(node, "local") == [study[0].StudyInstanceUID]

    # Refused: no TLS at all, TLS without a client certificate, a certificate no trusted CA signed.
    assert _echo(node, "TLSPEER").returncode != 0
    assert _echo(node, "TLSPEER", "+tla", "+cf", str(pki["ca"])).returncode != 0
    rogue = ["+tls", str(pki["rogue_key"]), str(pki["rogue_crt"]), "+cf", str(pki["ca"])]
    assert _echo(node, "TLSPEER", *rogue).returncode != 0
    # ... and the listener keeps serving the good peer afterwards, even while a connection that
    # never starts its handshake is open (the handshake is not done in the accepting thread).
    with socket.create_connection(("127.0.0.1", node.port)):
        assert _echo(node, "TLSPEER", *with_cert).returncode == 0


def test_the_broker_calls_archives_over_tls_when_configured(tls_node: Node, pki: dict[str, Path]) -> None:
    node = tls_node
    client = Settings(
        dimse_tls_outbound=True,
        dimse_tls_cert_file=pki["client_crt"],
        dimse_tls_key_file=pki["client_key"],
        dimse_tls_ca_file=pki["ca"],
    )
    try:
        tls.configure(client)
        scu.echo(host="127.0.0.1", port=node.port, called_ae=node.aet, calling_ae="BROKER2")
        # Without its client certificate the same call is refused by the archive.
        tls.configure(Settings(dimse_tls_outbound=True, dimse_tls_ca_file=pki["ca"]))
        with pytest.raises(Exception):  # noqa: B017, PT011 - refused during the TLS handshake
            scu.echo(host="127.0.0.1", port=node.port, called_ae=node.aet, calling_ae="BROKER2", timeout=5)
    finally:
        tls.configure(Settings())


def test_a_client_certificate_bound_to_an_ae_title_cannot_associate_as_another(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    started = _start(
        tmp_path,
        dimse_open_mode=False,
        dimse_tls_cert_file=pki["server_crt"],
        dimse_tls_key_file=pki["server_key"],
        dimse_tls_ca_file=pki["ca"],
    )
    node = next(started)
    sm_der = x509.load_pem_x509_certificate(pki["sm_pacs_crt"].read_bytes()).public_bytes(
        serialization.Encoding.DER
    )
    fingerprint = ":".join(f"{b:02X}" for b in hashlib.sha256(sm_der).digest())  # as openssl prints it
    # St Mary's PACS by fingerprint, the children's hospital's by subject; LEGACY with none bound.
    _register(node, "stmarys", "ST-MARYS", [("SM_PACS", "127.0.0.1", f"sha256:{fingerprint}")])
    _register(node, "kids", "CHILDRENS", [("KIDS_PACS", "127.0.0.1", "subject:CN=kids_pacs")])
    _register(node, "legacy", "LEGACY", [("LEGACY", "127.0.0.1")])

    def cert(name: str) -> list[str]:
        return ["+tls", str(pki[f"{name}_key"]), str(pki[f"{name}_crt"]), "+cf", str(pki["ca"])]

    def context(name: str) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca"]))
        ctx.load_cert_chain(str(pki[f"{name}_crt"]), str(pki[f"{name}_key"]))
        return ctx

    try:
        # Each PACS with its own certificate (dcmtk): let in.
        assert _echo(node, "SM_PACS", *cert("sm_pacs")).returncode == 0
        assert _echo(node, "KIDS_PACS", *cert("kids_pacs")).returncode == 0
        # A valid certificate for one AE title calling as another, either way: A-ASSOCIATE-RJ,
        # calling AE title not recognised (dcmtk, and pynetdicom to read the reason).
        for aet, name in (("KIDS_PACS", "sm_pacs"), ("SM_PACS", "kids_pacs"), ("SM_PACS", "client")):
            done = _echo(node, aet, *cert(name))
            assert done.returncode != 0 and "Rejected" in done.stdout + done.stderr, (aet, name)
            assoc = _associate(node, aet, tls_args=(context(name), "localhost"))
            if assoc.is_aborted and assoc.acceptor.primitive is None:
                # Seen once in ~50 runs on a machine loaded far past its cores: the connection
                # closed before the A-ASSOCIATE-RJ reached pynetdicom (refused all the same, but
                # without the reason this test reads). pynetdicom's acceptor closed right behind
                # the RJ; the reactor now leaves the close to the peer (tests/dimse/test_reactor.py),
                # which should end it. Kept until CI has shown that: asked once more, the answer
                # must be the rejection.
                assoc = _associate(node, aet, tls_args=(context(name), "localhost"))
            assert _rejected_calling_ae_not_recognised(assoc), (aet, name)
        # An AE title with no certificate bound takes any the CA signed, except one bound to
        # another AE title.
        assert _echo(node, "LEGACY", *cert("client")).returncode == 0
        assert _rejected_calling_ae_not_recognised(
            _associate(node, "LEGACY", tls_args=(context("sm_pacs"), "localhost"))
        )
        # The bindings are shown as stored, and a malformed one is refused.
        with Session(node.state.engine) as session:
            shown = {
                a.ae_title: a.certificate for a in facilities.calling_aes(session=session, facility_id="kids")
            }
            assert shown == {"KIDS_PACS": "subject:CN=kids_pacs"}
            sm = facilities.calling_aes(session=session, facility_id="stmarys")[0].certificate
            assert sm == "sha256:" + hashlib.sha256(sm_der).hexdigest()
            for bad in ("sha256:1234", "subject:not a name", "CN=kids_pacs"):
                with pytest.raises(BadRequest):
                    facilities.update_facility(
                        session=session,
                        principal=ADMIN,
                        facility_id="kids",
                        calling_ae_titles=[("KIDS_PACS", "127.0.0.1", bad)],
                    )
    finally:
        started.close()  # stops the SCP
