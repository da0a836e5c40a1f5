"""The DIMSE SCP: a pynetdicom Application Entity serving C-ECHO, C-STORE, C-FIND, C-MOVE and C-GET.

`start_scp(state=...)` binds settings.dimse_port with AE title settings.ae_title and returns a
handle; `stop_scp(handle)` shuts it down. Each association runs in its own thread (pynetdicom),
so the handlers below block freely: they call the same blocking services as the HTTP routes.

Every handler documents the statuses it can return, following pynetdicom's handler docs and
PS3.4 (Annex B for storage, Annex C for query/retrieve). Messages returned to a peer
(ErrorComment) and logs never carry patient data.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import selectors
import socket
import ssl
import struct
import tempfile
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

from pydicom import dcmread
from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag
from pydicom.uid import AllTransferSyntaxes, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom._handlers import standard_dimse_sent_handler, standard_pdu_sent_handler
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_FIND_RSP
from pynetdicom.dimse_primitives import C_FIND, C_STORE
from pynetdicom.dsutils import split_dataset
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session

from broker.consent import service as consent_service
from broker.deps import AppState
from broker.dicom import known_items, reactor
from broker.dicom.network import SpoolingAE, chunked_send, only_standard_listeners, received_file, uid_bytes
from broker.dicom.received import Received
from broker.dimse import access
from broker.dimse import audit as dimse_audit
from broker.dimse import service as ds
from broker.dimse.guards import SharedCounts
from broker.dimse.service import DimsePeers, IdentifierError, status_dataset
from broker.errors import BadRequest, NotFound, Unavailable
from broker.federation import service as federation
from broker.index.schemas import Query, StoreOutcome
from broker.index.service import IngestAudit, IngestBatcher, find_instances, search
from broker.metrics import observe_dimse
from broker.security import tls
from broker.security.schemas import Principal
from broker.security.service import principal_for_dimse
from broker.security.tls import server_context
from storage import StoreUnavailable

log = logging.getLogger("scanonce.dimse")


_PATIENT_ROOT = {
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelMove,
    PatientRootQueryRetrieveInformationModelGet,
}
_QR_CONTEXTS = (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelMove,
    PatientRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelGet,
)
_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
# Of the syntaxes a peer proposes, the acceptor takes the first of these it finds. Explicit VR
# Little Endian first: what most instances are stored in, so a C-GET sends them from their
# file as stored instead of loading them to convert (and it keeps each element's VR).
_STORAGE_SYNTAXES = [ExplicitVRLittleEndian] + [
    ts for ts in AllTransferSyntaxes if ts != ExplicitVRLittleEndian
]
_MAX_REQUESTED_CONTEXTS = 128  # PS3.8 9.3.2.2: presentation context IDs are odd numbers 1..255


class _ScanOnceAE(SpoolingAE):
    """pynetdicom checks `require_calling_aet` while negotiating each association, in that
    association's own thread (an `Association` is a Thread) after recording the calling AE
    title. Answering it for that one caller from the facility registry rejects an unknown calling
    AE with A-ASSOCIATE-RJ (rejected-permanent, service-user, "calling AE title not recognized")
    before anything else happens.

    Lock-out guards (see `reactor` for the PDU deadline): `maximum_associations` counts only
    associations whose A-ASSOCIATE-RQ has arrived, so connections still sending theirs (each
    bounded by the request timeout and the per-address cap) never take a slot from a real peer;
    `make_server` caps the connections one IP address may hold open."""

    def __init__(self, handle: ScpHandle, ae_title: str) -> None:
        super().__init__(ae_title=ae_title)
        self._scanonce = weakref.ref(handle)
        # Read by the reactor: seconds to complete the A-ASSOCIATE-RQ, and any PDU once begun.
        self.scanonce_request_timeout: float | None = None
        self.scanonce_fast_store = False  # C-STOREs in the DUL thread (broker.dicom.fast_store)
        self.max_connections_per_address = 0  # 0: no cap
        # Several processes on one port (settings.dimse_receivers): the guards count across all
        # of them (broker.dimse.guards), this process in its row.
        self.shared_counts: SharedCounts | None = None
        self.shared_row = 0
        self.reuse_port = False

    @property
    def maximum_associations(self) -> int:
        # pynetdicom refuses an association when its live acceptor threads, itself included,
        # outnumber this; the ones still waiting for their request are not associations yet.
        waiting = sum(1 for a in self.active_associations if a.is_acceptor and a.requestor.primitive is None)
        # The other processes' connections (waiting ones included: a conservative count) take
        # slots of the one node-wide limit.
        shared = self.shared_counts
        elsewhere = shared.open_elsewhere(self.shared_row) if shared is not None else 0
        return int(self._maximum_associations) + waiting - elsewhere

    @maximum_associations.setter
    def maximum_associations(self, value: int) -> None:
        AE.maximum_associations.fset(self, value)  # type: ignore[attr-defined]

    def make_server(self, address: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["server_class"] = _ReusePortServer if self.reuse_port else _GuardedServer
        kwargs["request_handler"] = _CountedRequestHandler
        return super().make_server(address, *args, **kwargs)

    @property  # type: ignore[misc]
    def require_calling_aet(self) -> list[str]:
        # The allow-list is the calling AE title *and* the peer's address (broker.dimse.access).
        handle = self._scanonce()
        assoc = threading.current_thread()
        if handle is None or handle.open_mode or not isinstance(assoc, Association):
            return []
        calling_ae = str(assoc.requestor.ae_title or "").strip()
        try:
            known = handle.admit(assoc)[1] is not None
        except Unavailable:
            # The registry cannot be read now. Refusing would tell a registered peer "you are not
            # recognised" (a permanent rejection); dropping it, nothing. Let it in: each operation
            # looks the caller up again and answers a failure status meanwhile (0x0124 if it is not
            # registered after all; broker.dimse.access.guarded).
            return [calling_ae]
        # A non-empty list that matches nothing refuses the caller.
        return [calling_ae] if known else ["\x00"]


class _GuardedServer(ThreadedAssociationServer):
    """Closes a connection at once, before any thread is started for it, when its IP address
    already holds the AE's `max_connections_per_address`: one host cannot fill the thread table
    (300 stalled sockets once made 613 threads) nor every association slot."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._open: dict[str, int] = {}
        self._open_lock = threading.Lock()
        self._wake_fd, self._wake_write_fd = os.pipe()
        self._stopping = False
        self._shutdown_lock = threading.Lock()
        self._stopped = threading.Event()
        self._stopped.set()  # not serving yet: nothing to wait for
        super().__init__(*args, **kwargs)

    def _bind_defaults(self) -> None:
        """pynetdicom's, less its standard describing handlers: each association binds those
        itself as it is set up, only while pynetdicom's INFO is heard (`network
        ._LogHandlersIfHeard`). Bound here as well they were decided once, when the server
        started, and copied to every association whatever the log level became later."""
        for event in evt._INTERVENTION_EVENTS:
            self.bind(event, evt.get_default_handler(event))

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """socketserver's loop without its polling: it woke every `poll_interval` to look for a
        shutdown request (and pynetdicom ran a full `gc.collect()` every 60th wake-up: a pause
        of the whole serving process every 30 s, with or without any association). Here the
        thread sleeps in `select()` until a connection arrives or `shutdown()` writes to a
        pipe. Finished association threads are left to the cyclic garbage collector."""
        self._stopped.clear()
        try:
            with selectors.PollSelector() as selector:
                selector.register(self, selectors.EVENT_READ)
                selector.register(self._wake_fd, selectors.EVENT_READ)
                while not self._stopping:
                    ready = selector.select()
                    if self._stopping:
                        break
                    if any(key.fileobj is self for key, _ in ready):
                        self._handle_request_noblock()  # type: ignore[attr-defined]
        finally:
            self._stopping = False
            self._stopped.set()

    def shutdown(self) -> None:
        """pynetdicom's AssociationServer.shutdown (stop serving, close the socket, forget the
        server), with the loop woken at once instead of at its next poll."""
        with self._shutdown_lock:  # not _open_lock: the loop may need that to finish
            if self._wake_write_fd < 0:
                return  # shut down already: its pipe's numbers may belong to another file now
            self._stopping = True
            with contextlib.suppress(OSError):
                os.write(self._wake_write_fd, b"\0")
            self._stopped.wait()
            self.server_close()
            for fd in (self._wake_fd, self._wake_write_fd):
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._wake_fd = self._wake_write_fd = -1
        with contextlib.suppress(ValueError):
            self.ae._servers.remove(self)

    def get_request(self) -> tuple[Any, Any]:
        """As pynetdicom's, but a TLS handshake is not done here, in the one thread that accepts
        every connection (a peer that never completes it would stop all others): the
        connection's own thread does it under the request timeout (`access.tls_handshake`)."""
        client_socket, address = self.socket.accept()  # type: ignore[union-attr]
        if self.ssl_context:
            client_socket = self.ssl_context.wrap_socket(
                client_socket, server_side=True, do_handshake_on_connect=False
            )
        return client_socket, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        ip = str(client_address[0])
        cap = int(getattr(self.ae, "max_connections_per_address", 0) or 0)
        shared: SharedCounts | None = getattr(self.ae, "shared_counts", None)
        row = int(getattr(self.ae, "shared_row", 0))
        with self._open_lock:
            count = self._open.get(ip, 0) if shared is None else shared.at_address(ip)
            if cap and count >= cap:
                refuse = True
            else:
                refuse = False
                self._open[ip] = self._open.get(ip, 0) + 1
                if shared is not None:
                    shared.opened(row, ip)
        if refuse:
            log.warning("DIMSE: closing a connection from %s, which already holds %d", ip, cap)
            return False
        return True

    def release(self, ip: str) -> None:
        shared: SharedCounts | None = getattr(self.ae, "shared_counts", None)
        with self._open_lock:
            if shared is not None:
                shared.closed(int(getattr(self.ae, "shared_row", 0)), ip)
            left = self._open.get(ip, 0) - 1
            if left > 0:
                self._open[ip] = left
            else:
                self._open.pop(ip, None)


class _ReusePortServer(_GuardedServer):
    """Binds with SO_REUSEPORT, so that the serving process and the receiver processes
    (settings.dimse_receivers) listen on one port and the kernel spreads connections over them.
    pynetdicom's `server_bind` sets its own options and ignores socketserver's
    `allow_reuse_port`, hence the option here."""

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # type: ignore[union-attr]
        super().server_bind()


class _CountedRequestHandler(RequestHandler):
    """pynetdicom's handler (create the association, EVT_CONN_OPEN, start it), with the
    connection counted against its address until the association thread ends."""

    def handle(self) -> None:
        server = cast(_GuardedServer, self.server)
        ip = str(self.client_address[0])
        timeout = float(getattr(server.ae, "scanonce_request_timeout", None) or 20)
        if not access.tls_handshake(self.request, timeout):
            server.release(ip)
            return
        try:
            assoc = self._create_association()
            run = assoc.run

            def run_then_release() -> None:
                try:
                    run()
                finally:
                    server.release(ip)

            assoc.run = run_then_release  # type: ignore[method-assign]
            _send_store_responses_directly(assoc.dimse)
            evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        except BaseException:
            server.release(ip)
            raise
        assoc.start()


def _implicit(element: int, value: bytes) -> bytes:
    """One command element (group 0000), Implicit VR Little Endian (PS3.7 6.3.1)."""
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def _store_response_pdv(primitive: object) -> bytes | None:
    """The PDV value (message control header + command set) of a C-STORE-RSP that carries a
    status and nothing else, exactly as pynetdicom's C_STORE_RSP would encode it: group length,
    Affected SOP Class UID, Command Field 0x8001, Message ID Being Responded To, Command Data
    Set Type 0x0101 (none), Status, Affected SOP Instance UID. None for any other message."""
    if type(primitive) is not C_STORE:
        return None
    message_id = primitive.MessageIDBeingRespondedTo
    status = primitive.Status
    if (
        not isinstance(message_id, int)
        or not isinstance(status, int)
        or not 0 <= message_id <= 0xFFFF
        or not 0 <= status <= 0xFFFF
        or primitive.ErrorComment is not None
        or primitive.OffendingElement is not None
    ):
        return None
    sop_class = uid_bytes(primitive.AffectedSOPClassUID)
    sop_instance = uid_bytes(primitive.AffectedSOPInstanceUID)
    if sop_class is None or sop_instance is None:
        return None
    body = (
        _implicit(0x0002, sop_class)
        + _implicit(0x0100, b"\x01\x80")
        + _implicit(0x0120, struct.pack("<H", message_id))
        + _implicit(0x0800, b"\x01\x01")
        + _implicit(0x0900, struct.pack("<H", status))
        + _implicit(0x1000, sop_instance)
    )
    return b"\x03" + _implicit(0x0000, struct.pack("<I", len(body))) + body


# Events whose listeners the direct C-STORE-RSP skips, and the one handler each may have: the
# standard handlers pynetdicom binds while its INFO log is heard, which log nothing for a
# C-STORE-RSP or a P-DATA-TF PDU.
_SKIPPED_EVENTS = (
    (evt.EVT_DIMSE_SENT, standard_dimse_sent_handler),
    (evt.EVT_PDU_SENT, standard_pdu_sent_handler),
    (evt.EVT_DATA_SENT, None),
)


def _send_store_responses_directly(dimse: DIMSEServiceProvider) -> None:
    """Answer each C-STORE of this association with a command set written by
    `_store_response_pdv`, in one P-DATA-TF PDU, instead of pynetdicom building a C_STORE_RSP
    message as a pydicom Dataset and encoding it with pydicom (twice: once for the group length):
    ~9% of a C-STORE's CPU in the serving process.

    On a plain TCP socket, the association's thread also writes that PDU to the socket itself
    rather than queueing it for the DUL thread: that hand-over cost a thread wake-up per
    C-STORE (a pipe write, the DUL thread's select() and its turn for a core and the GIL, then
    pynetdicom's state machine to encode the PDU), on the path the peer waits on before it sends
    its next instance. Only when nothing is queued for the DUL thread to send before it (PDUs go
    out in order) and the association is established (Sta6, where P-DATA changes no state).
    Not on TLS, where reading and writing one SSL object from two threads is not safe.

    All of this only while nothing but pynetdicom's standard handlers listens for what is
    skipped (`_SKIPPED_EVENTS`); anything else (other messages, a status with an error comment,
    a peer whose maximum PDU is too small for one fragment) goes through pynetdicom as before."""
    send = dimse.send_msg

    def send_msg(primitive: Any, context_id: int) -> None:
        pdv = _store_response_pdv(primitive)
        largest = int(dimse.maximum_pdu_size or 0)
        assoc = dimse.assoc
        if (
            pdv is None
            or (largest and len(pdv) - 1 > largest - 6)
            or not only_standard_listeners(assoc, _SKIPPED_EVENTS)
        ):
            send(primitive, context_id)
            return
        dul = dimse.dul
        sock = dul.socket
        if (
            isinstance(sock, AssociationSocket)
            and sock.socket is not None
            and not isinstance(sock.socket, ssl.SSLSocket)
            and dul.to_provider_queue.empty()
            and dul.state_machine.current_state == "Sta6"
        ):
            # P-DATA-TF (PS3.8 9.3.5): type 0x04, length, one PDV item (length, context, value).
            item = struct.pack(">IB", 1 + len(pdv), context_id) + pdv
            sock.send(struct.pack(">BBI", 0x04, 0x00, len(item)) + item)  # fails as the DUL would
            return
        pdata = P_DATA()
        pdata.presentation_data_value_list.append((context_id, pdv))
        dul.send_pdu(pdata)

    dimse.send_msg = send_msg  # type: ignore[method-assign]


class _SharedUIDContext(PresentationContext):
    """pynetdicom deep-copies every supported context for each association; with all storage
    SOP classes in all transfer syntaxes that alone took ~47 ms per association. UIDs are
    immutable strings: copy the list, share the UIDs (well under a millisecond)."""

    def __deepcopy__(self, memo: dict[int, Any]) -> _SharedUIDContext:
        return known_items.copy_context(self)


class StoreIngest(Protocol):
    """Where the C-STORE handler hands a received instance: the process's own `IngestBatcher`,
    or, in a receiver process on SQLite, the serving process's writer
    (`broker.dimse.handoff.RemoteWriter`). Returns once the instance is committed."""

    def ingest_one(
        self,
        *,
        engine: Any,
        store: Any,
        principal: Principal,
        facility_id: str,
        path: str | Received,
        consume: bool = False,
        expected_sop: tuple[str, str] | None = None,
        audit: IngestAudit | None = None,
    ) -> StoreOutcome: ...

    def close(self) -> None: ...


@dataclass
class ScpHandle:
    """A running SCP. `peers` may be changed while it runs (calling AEs, move destinations)."""

    state: AppState
    peers: DimsePeers
    ae: Any = None
    server: Any = None
    address: tuple[str, int] = ("", 0)
    batcher: StoreIngest | None = None
    # Any calling AE accepted, as the default facility: only ever on a loopback listener.
    open_mode: bool = False
    # Per association (associations run in their own threads, hence the lock).
    _callers: weakref.WeakKeyDictionary[Any, tuple[Principal, str | None]] = field(
        default_factory=weakref.WeakKeyDictionary
    )
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def port(self) -> int:
        return self.address[1]

    @property
    def ae_title(self) -> str:
        return self.state.settings.ae_title

    def facility_of(
        self, calling_ae: str, address: str, certificate: tls.PeerCertificate | None = None
    ) -> str | None:
        """The facility of a calling AE title calling from `address`, presenting the TLS client
        `certificate` (None: refuse it)."""
        settings = self.state.settings
        return ds.facility_for_calling_ae(
            engine=self.state.engine,
            peers=self.peers,
            calling_ae=calling_ae,
            address=address,
            default_facility=settings.default_facility,
            open_mode=self.open_mode,
            certificate=certificate,
        )

    def caller(self, event: evt.Event) -> tuple[Principal, str | None]:
        """The Principal and facility of the association's calling AE, resolved once."""
        return self.admit(event.assoc)

    def admit(self, assoc: Association) -> tuple[Principal, str | None]:
        """Who the association's peer is (its calling AE title from its address), looked up once
        per association: at negotiation (pynetdicom reads `require_calling_aet` twice), and
        reused by every handler. Unavailable (nothing remembered) when the database is away."""
        with self._lock:
            found = self._callers.get(assoc)
        if found is None:
            settings = self.state.settings
            calling_ae = str(assoc.requestor.ae_title or "").strip()
            try:
                facility = (
                    self.facility_of(calling_ae, _peer_address(assoc), _peer_certificate(assoc))
                    if calling_ae
                    else None
                )
            except SQLAlchemyError as exc:
                # Not remembered: the next operation of the association looks again.
                log.error("DIMSE caller lookup failed, database unavailable: %s", type(exc).__name__)
                raise Unavailable(access.UNAVAILABLE_COMMENT) from exc
            principal = principal_for_dimse(settings=settings, calling_ae=calling_ae, facility=facility)
            found = (principal, facility)
            with self._lock:
                self._callers[assoc] = found
        return found


def start_scp(
    *,
    state: AppState,
    peers: DimsePeers | None = None,
    host: str | None = None,
    port: int | None = None,
    shared: SharedCounts | None = None,
    row: int = 0,
    ingest: StoreIngest | None = None,
) -> ScpHandle:
    """Start serving DIMSE in background threads; returns at once.

    Binds `host` (default settings.host) and `port` (default settings.dimse_port; 0 picks a free
    port, see `handle.port`) with AE title settings.ae_title. Received data sets are spooled
    under settings.data_dir/spool.

    `shared`: this listener is one of several processes on the port (`broker.dimse.receivers`):
    it binds with SO_REUSEPORT and counts its connections in row `row` of `shared`, against
    limits that hold for all of them together.

    `ingest`: where C-STOREs go (default: a new `IngestBatcher`, this process's one writer).
    """
    settings = state.settings
    bind = (host if host is not None else settings.host, settings.dimse_port if port is None else port)
    refused = access.open_mode_refusal(settings, bind[0])
    if refused:
        raise BadRequest(refused)
    ssl_context = server_context(settings)
    reactor.install()
    handle = ScpHandle(state=state, peers=peers or DimsePeers(), open_mode=settings.dimse_open_mode)
    handle.batcher = (
        ingest if ingest is not None else IngestBatcher(linger=settings.ingest_group_wait_ms / 1000)
    )
    ae = _ScanOnceAE(handle, settings.ae_title)
    ae.spool_dir = str(_spool_dir(settings.data_dir))
    ae.maximum_associations = settings.dimse_max_associations
    ae.require_called_aet = True  # A-ASSOCIATE-RJ "called AE title not recognized" otherwise
    ae.scanonce_request_timeout = settings.dimse_request_timeout
    ae.scanonce_fast_store = settings.dimse_fast_store
    ae.max_connections_per_address = settings.dimse_max_connections_per_address
    if shared is not None:
        ae.shared_counts, ae.shared_row, ae.reuse_port = shared, row, True
    # What peers may send us per PDU. Large enough to keep the per-PDU cost down, small enough
    # that a PDU never holds much of a large instance in memory (0, "unlimited", lets a sender
    # put a whole multi-gigabyte data set in one PDU).
    ae.maximum_pdu_size = 256 * 1024
    # An idle or vanished peer must not hold an association thread forever.
    ae.network_timeout = 120
    # Also the ARTIM timer: a connection that sends nothing is closed after this long.
    ae.acse_timeout = settings.dimse_request_timeout
    ae.dimse_timeout = 120
    ae.add_supported_context(Verification)
    for cx in AllStoragePresentationContexts:
        # scp_role: accept a C-GET requestor's proposal to be the Storage SCP (PS3.7 D.3.3.4).
        ae.add_supported_context(
            cast(str, cx.abstract_syntax), _STORAGE_SYNTAXES, scu_role=True, scp_role=True
        )
    for uid in _QR_CONTEXTS:
        ae.add_supported_context(uid, _UNCOMPRESSED)
    # Each operation is put to the policy before its handler runs (broker.dimse.access).
    handlers: list[Any] = [
        # Counted and timed as interface "dimse" (broker.metrics) outside the policy check, so
        # refused operations are counted too.
        (evt.EVT_C_ECHO, observe_dimse("C-ECHO", access.guarded("C-ECHO", _on_echo)), [handle]),
        (evt.EVT_C_STORE, observe_dimse("C-STORE", access.guarded("C-STORE", _on_store)), [handle]),
        (evt.EVT_C_FIND, observe_dimse("C-FIND", access.guarded("C-FIND", _on_find)), [handle]),
        (evt.EVT_C_MOVE, observe_dimse("C-MOVE", access.guarded("C-MOVE", _on_move)), [handle]),
        (evt.EVT_C_GET, observe_dimse("C-GET", access.guarded("C-GET", _on_get)), [handle]),
        (evt.EVT_CONN_OPEN, _on_conn_open),
        (evt.EVT_CONN_CLOSE, _on_conn_close, [handle]),
    ]
    contexts = ae.supported_contexts
    for cx in contexts:
        cx.__class__ = _SharedUIDContext
    server = cast(
        ThreadedAssociationServer,
        ae.start_server(bind, block=False, evt_handlers=handlers, contexts=contexts, ssl_context=ssl_context),
    )
    handle.ae, handle.server = ae, server
    handle.address = server.server_address[:2]
    if shared is not None:
        shared.set_listening(row, os.getpid())
    log.info(
        "DIMSE SCP %s listening on %s:%d%s%s",
        settings.ae_title,
        *handle.address,
        " (TLS)" if ssl_context else "",
        " (open mode: any calling AE)" if handle.open_mode else "",
    )
    return handle


def index_batcher(handle: ScpHandle) -> IngestBatcher | None:
    """The SCP's own ingest writer (None once stopped, or where C-STOREs go elsewhere): what
    the receivers on SQLite commit through (`broker.dimse.handoff.WriterServer`)."""
    batcher = handle.batcher
    return batcher if isinstance(batcher, IngestBatcher) else None


def _peer_address(assoc: Association) -> str:
    """The peer's IP address ("" if unknown: then only open mode lets it in)."""
    info = getattr(assoc.requestor, "address_info", None)
    return str(getattr(info, "address", "") or "")


def _peer_certificate(assoc: Association) -> tls.PeerCertificate | None:
    """The client certificate the peer presented over DICOM TLS (None: plain TCP or none)."""
    assoc_socket = getattr(assoc.dul, "socket", None)
    return tls.peer_certificate(getattr(assoc_socket, "socket", None))


def _spool_dir(data_dir: Path, *, sweep: bool = True) -> Path:
    """Where C-STORE data sets are received, on the data dir's disk. What a previous run left
    there (a crash mid-transfer) was never acknowledged: it is removed once it is an hour old
    (younger files may belong to another node sharing the data dir)."""
    spool = data_dir / "spool"
    spool.mkdir(parents=True, exist_ok=True)
    if not sweep:
        return spool.resolve()
    stale = time.time() - 3600
    for leftover in spool.glob("*.dcm"):
        with contextlib.suppress(OSError):
            if leftover.stat().st_mtime < stale:
                leftover.unlink()
    return spool.resolve()


def stop_scp(handle: ScpHandle) -> None:
    """Abort running associations and close the listening socket."""
    if handle.ae is not None:
        handle.ae.shutdown()
        handle.ae = None
        handle.server = None
    if handle.batcher is not None:
        handle.batcher.close()
        handle.batcher = None


# -- handlers --------------------------------------------------------------------------------


def _on_echo(event: evt.Event, handle: ScpHandle) -> int:
    """C-ECHO (Verification, PS3.4 A.4). Statuses: 0x0000 Success; 0x0124 Refused: not
    authorized, when the policy refuses the caller (broker.dimse.access, before this runs)."""
    return ds.SUCCESS


def _on_store(event: evt.Event, handle: ScpHandle) -> int | Dataset:
    """C-STORE of any storage SOP class, into the same ingest path as STOW-RS.

    The data set was written by pynetdicom to a Part 10 temp file as received; it is checked
    against the request's SOP Class/Instance UIDs, then handed to the index's ingest (which
    stores the object, then commits its index row). Statuses (PS3.4 B.2.3):

    - 0x0000 Success: stored, or already stored with identical content (idempotent re-send).
    - 0xA700 Refused, out of resources: object store or database unavailable, or disk full
      (the SCU may retry later).
    - 0xA900 Data set does not match SOP class: its SOP Class/Instance UID differ from the
      request's, or the index's reason for a failed instance was this code.
    - 0xC000 Cannot understand: the data set cannot be parsed or is invalid (bad UIDs ...), or
      conflicts with a stored copy (same SOP Instance UID, different content; kept apart for
      review, never served in place of the stored one). ErrorComment says which.
    - 0x0124 Not authorized: the policy refuses the caller a C-STORE into its facility's
      partition (broker.dimse.access, before this handler runs), or the calling AE has no
      facility (only if the registry changed during the association; unknown calling AEs, and
      known ones from another network, are refused at association).
    - 0xC001 Cannot understand (processing failure): an unexpected error on our side.
    """
    try:
        principal, facility = handle.caller(event)
    except (Unavailable, SQLAlchemyError) as exc:
        # The registry lookup of the calling AE met a database that is down or whose connection
        # was cut: the SCU may retry (not pynetdicom's 0xC211 for an unhandled exception).
        log.error("C-STORE refused, database unavailable: %s", type(exc).__name__)
        return access.unavailable(event, "C-STORE")
    if facility is None:
        return status_dataset(0x0124, "calling AE is not registered to a facility")
    request = cast(C_STORE, event.request)
    # The data set must be the instance the command names: checked on ingest's one parse.
    expected = (str(request.AffectedSOPClassUID), str(request.AffectedSOPInstanceUID))
    own_tmp: Path | None = None
    source: str | Received
    try:
        # Spooled by pynetdicom through the hashing writer: hash (and small bytes) in hand.
        source = received_file(event) or str(event.dataset_path)
    except AttributeError:
        # Chunked receive is off (someone changed pynetdicom's config): spool it ourselves.
        own_tmp = _spool(event.encoded_dataset())
        source = str(own_tmp)
    try:
        return _ingest(handle, principal, facility, source, event, expected)
    finally:
        if own_tmp is not None:
            own_tmp.unlink(missing_ok=True)


def _spool(data: bytes) -> Path:
    fd, name = tempfile.mkstemp(suffix=".dcm", prefix="scanonce-cstore-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return Path(name)


def _ingest(
    handle: ScpHandle,
    principal: Principal,
    facility: str,
    path: str | Received,
    event: evt.Event,
    expected_sop: tuple[str, str] | None = None,
) -> int | Dataset:
    batcher = handle.batcher
    if batcher is None:
        return status_dataset(ds.OUT_OF_RESOURCES, "the SCP is shutting down")
    try:
        state = handle.state
        outcome = batcher.ingest_one(
            engine=state.engine,
            store=state.store,
            principal=principal,
            facility_id=facility,
            path=path,
            consume=True,
            audit=dimse_audit.store_hook(state, event, principal),
            expected_sop=expected_sop,
        )
    except Exception as exc:
        return status_dataset(*ds.store_failure(exc))
    code, comment = ds.cstore_status(outcome)
    return status_dataset(code, comment) if comment else code


def _on_conn_open(event: evt.Event) -> None:
    """Send each PDU at once: with Nagle's algorithm a response written in pieces waits for the
    peer's delayed ACK (tens of milliseconds per C-STORE on loopback)."""
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _on_conn_close(event: evt.Event, handle: ScpHandle) -> None:
    """A peer that vanishes mid-C-STORE leaves pynetdicom's half-written temp file behind
    (only complete data sets reach the store handler, which deletes them); remove it."""
    message = getattr(getattr(event.assoc, "dimse", None), "message", None)
    spool = getattr(message, "_data_set_file", None)
    if spool is not None:
        try:
            spool.close()
            os.unlink(spool.name)
        except OSError:
            pass


# -- query / retrieve ------------------------------------------------------------------------


def _levels(event: evt.Event) -> tuple[str, ...]:
    model = event.request.AffectedSOPClassUID
    return ds.PATIENT_ROOT_LEVELS if model in _PATIENT_ROOT else ds.STUDY_ROOT_LEVELS


def _identifier(event: evt.Event) -> Dataset:
    try:
        identifier = event.identifier
        # pydicom decodes lazily: touch every element now so a malformed identifier fails here.
        for _elem in identifier:
            pass
        return identifier
    except Exception as exc:
        raise IdentifierError(ds.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, "identifier cannot be decoded") from exc


def _search_pages(
    handle: ScpHandle,
    request: ds.FindRequest,
    *,
    principal: Principal,
    level: str | None = None,
    keywords: frozenset[str],
) -> Iterator[tuple[dict[str, Any], bool]]:
    """Yield (match, keys_ignored) page by page (QIDO's page size), so no answer is held whole.
    Only records the caller may see match (consent: the same condition as QIDO-RS), so C-FIND
    does not list them and C-MOVE / C-GET do not send them."""
    page = max(1, handle.state.settings.qido_max_limit)
    offset = 0
    while True:
        query = Query(
            level=level or request.query_level,  # type: ignore[arg-type]
            filters=dict(request.filters),
            study_uid=request.study_uid,
            series_uid=request.series_uid,
            facility_id=None,  # federation-wide: C-FIND and QIDO-RS give the same answers
            includefields=keywords,
            limit=page,
            offset=offset,
        )
        with Session(handle.state.engine) as session:
            query.visible = consent_service.visibility(principal=principal)
            result = search(session=session, query=query)
        ignored = bool(result.warnings or request.unmatched)
        for match in result.matches:
            yield match, ignored
        if not result.more or not result.matches:
            return
        offset += len(result.matches)


def _on_find(event: evt.Event, handle: ScpHandle) -> Iterator[tuple[int | Dataset, Dataset | None]]:
    """C-FIND, Patient Root (PATIENT/STUDY/SERIES/IMAGE) and Study Root (STUDY/SERIES/IMAGE),
    hierarchical, answered by the index's query engine (the same as QIDO-RS). Statuses
    (PS3.4 C.4.1.1.4):

    - 0x0124 Refused: not authorized: the policy refuses the caller C-FIND (broker.dimse.access,
      before this handler runs; PS3.7 C.5 general status).
    - 0xFF00 Pending: one per match, identifier with exactly the requested keys (plus
      QueryRetrieveLevel and SpecificCharacterSet "ISO_IR 192", and the study's
      TimezoneOffsetFromUTC beside date and time keys). Sent by `_PendingResponses`,
      not yielded to pynetdicom (see there why).
    - 0xFF01 Pending, but some optional keys are not supported for matching and were ignored
      (PS3.4 C.4.1.1.3.1), among them any sequence key with a match value (sequence matching is
      not supported); the answer is as if they had been universal.
    - 0x0000 Success: all matches sent (sent by pynetdicom when this generator ends).
    - 0xFE00 Cancel: the peer sent C-CANCEL.
    - 0xA900 Identifier does not match SOP class: missing or foreign QueryRetrieveLevel, a
      command or file-meta element, a UID key that is not a UID list, an undecodable identifier.
    - 0xC000 Unable to process: a value the matching rules reject (e.g. a malformed date
      range); ErrorComment says which.
    - 0xC001 Unable to process: the index failed.
    - 0xA700 Out of resources: the database is away (the caller's lookup, or the audit record
      that must commit before any match goes out); ErrorComment names nothing internal.
    """
    principal, _facility = handle.caller(event)
    try:
        request = ds.parse_identifier(_identifier(event), levels=_levels(event))
    except IdentifierError as exc:
        yield status_dataset(exc.status, exc.comment), None
        return
    try:  # recorded and committed before the first match goes out
        dimse_audit.record(handle.state, event, principal, "C-FIND")
    except Unavailable:
        yield status_dataset(ds.OUT_OF_RESOURCES, "the query could not be audited"), None
        return
    keywords = frozenset(_keywords(request.return_keys))
    try:
        pending = _PendingResponses(event, request, retrieve_ae_title=handle.ae_title)
        for match, ignored in _search_pages(handle, request, principal=principal, keywords=keywords):
            if event.is_cancelled:
                yield ds.CANCEL, None
                return
            if not pending.send(match, ignored=ignored):
                return  # the association was aborted or released: no one to answer
    except BadRequest as exc:
        yield status_dataset(ds.UNABLE_TO_PROCESS, exc.message), None
    except Exception as exc:
        log.error("C-FIND failed: %s", type(exc).__name__)  # no message: it may quote the query
        yield status_dataset(ds.PROCESSING_FAILURE, "query failed"), None


class _PendingResponses:
    """Sends one C-FIND request's pending responses to the association's DUL as P-DATA, in
    order with everything pynetdicom sends (the same queue), exactly as pynetdicom's DIMSE
    provider fragments a C-FIND-RSP (PS3.7 6.3.1, PS3.8 E.2): the command set, then the
    identifier, each in PDVs of at most the peer's maximum PDU length.

    Why not yield (status, Dataset) to pynetdicom: for every response it builds and encodes a
    command set Dataset twice and encodes the identifier Dataset with pydicom, about 1 ms per
    match on a 2-core VM, so a 30-day StudyDate range of ~80 studies took ~80 ms. Here the
    command set is encoded once per request (by pynetdicom's own C_FIND_RSP message) and each
    identifier straight from the index's DICOM JSON (`IdentifierEncoder`, same bytes as pydicom).
    pynetdicom still sends the final status (Success, Cancel or a failure) when `_on_find`
    returns; its per-response INFO log lines are not written for these responses.
    """

    # Matches may be found faster than the peer reads them: beyond this many PDUs waiting for
    # the DUL thread, wait for it instead of holding a large answer in memory.
    MAX_QUEUED = 512

    def __init__(self, event: evt.Event, request: ds.FindRequest, *, retrieve_ae_title: str) -> None:
        self._assoc = event.assoc
        context = event.context
        self._context_id = int(context.context_id)
        self._max_pdu = int(self._assoc.dimse.maximum_pdu_size)
        syntax = context.transfer_syntax
        if not syntax.is_little_endian or syntax.is_deflated:
            # start_scp accepts Query/Retrieve contexts in Implicit/Explicit VR Little Endian only
            raise ValueError(f"C-FIND identifiers are not encoded in {syntax.name}")
        self._encoder = ds.IdentifierEncoder(
            request, implicit_vr=bool(syntax.is_implicit_VR), retrieve_ae_title=retrieve_ae_title
        )
        self._request = event.request
        self._commands: dict[int, list[bytes]] = {}  # by status, built when first needed

    def _command(self, request: Any, status: int) -> list[bytes]:
        """The PDV values (message control header + fragment) of a pending C-FIND-RSP's command
        set, as `_c_find_scp` would fill it in and pynetdicom's `encode_msg` would encode it."""
        rsp = C_FIND()
        rsp.MessageID = request.MessageID
        rsp.MessageIDBeingRespondedTo = request.MessageID
        rsp.AffectedSOPClassUID = request.AffectedSOPClassUID
        rsp.Status = status
        rsp.Identifier = io.BytesIO(b"\x00\x00")  # a data set follows: CommandDataSetType 0x0001
        message = C_FIND_RSP()
        message.primitive_to_message(rsp)
        pdvs = [
            p.presentation_data_value_list[0][1] for p in message.encode_msg(self._context_id, self._max_pdu)
        ]
        return [pdv for pdv in pdvs if pdv[0] & 0x01]  # the command fragments, not the placeholder

    def _data(self, encoded: bytes) -> list[bytes]:
        size = self._max_pdu - 6 if self._max_pdu else len(encoded)  # 6: PDV item length + context
        chunks = [encoded[i : i + size] for i in range(0, len(encoded), size)]
        return [b"\x00" + c for c in chunks[:-1]] + [b"\x02" + chunks[-1]]

    def send(self, match: dict[str, Any], *, ignored: bool) -> bool:
        """Queue one match's response; False if the association is no longer established."""
        assoc = self._assoc
        dul = assoc.dul
        while dul.to_provider_queue.qsize() > self.MAX_QUEUED and assoc.is_established:
            time.sleep(0.001)
        if not assoc.is_established:
            return False
        status = ds.PENDING_KEYS_UNSUPPORTED if ignored else ds.PENDING
        command = self._commands.get(status)
        if command is None:
            command = self._commands[status] = self._command(self._request, status)
        pdvs = command + self._data(self._encoder.encode(match))
        # Command and identifier in one P-DATA-TF PDU when they fit (PS3.8 9.3.5 allows several
        # PDVs per PDU; dcm4che packs them by default): half the PDUs for both ends to handle.
        # Each PDV item is 4 bytes of length, the context ID and the value.
        if not self._max_pdu or sum(5 + len(pdv) for pdv in pdvs) <= self._max_pdu:
            pdata = P_DATA()
            pdata.presentation_data_value_list.extend((self._context_id, pdv) for pdv in pdvs)
            dul.send_pdu(pdata)
            return True
        for pdv in pdvs:
            pdata = P_DATA()
            pdata.presentation_data_value_list.append((self._context_id, pdv))
            dul.send_pdu(pdata)
        return True


def _keywords(tags: list[BaseTag]) -> Iterator[str]:
    for tag in tags:
        keyword = keyword_for_tag(tag)
        if keyword:
            yield keyword


@dataclass(frozen=True, slots=True)
class _Item:
    key: str
    sop_class: str
    sop_uid: str
    transfer_syntax: str


# What the identifier's level names, and the index level that lists it.
_RETRIEVE_LEVEL = {"PATIENT": "study", "STUDY": "study", "SERIES": "series", "IMAGE": "instance"}
_RETRIEVE_KEYS = frozenset({"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"})


def _instances_to_send(handle: ScpHandle, event: evt.Event) -> list[_Item]:
    """Resolve a C-MOVE/C-GET identifier to the stored instances it names: the index's query
    engine finds the studies/series/instances, `find_instances` where each object is
    (IdentifierError, BadRequest or another error on failure)."""
    principal, _facility = handle.caller(event)
    request = ds.parse_identifier(_identifier(event), levels=_levels(event))
    ds.require_retrieve_key(request)
    # Which (study, series) to list, and for IMAGE level which SOP Instance UIDs in them.
    scopes: dict[tuple[str, str | None], set[str] | None] = {}
    level = _RETRIEVE_LEVEL[request.level]
    for match, _ignored in _search_pages(
        handle, request, principal=principal, level=level, keywords=_RETRIEVE_KEYS
    ):
        study = _json_value(match, "0020000D")
        series = _json_value(match, "0020000E") if level != "study" else None
        scope = scopes.setdefault((study, series), set() if level == "instance" else None)
        if scope is not None:
            scope.add(_json_value(match, "00080018"))
    state = handle.state
    # Retrieve on demand: a study the index knows only from a facility's archive is fetched
    # into the broker first (once, however many ask); Unavailable names the facility.
    for study in dict.fromkeys(study for study, _series in scopes):
        with contextlib.suppress(NotFound):
            federation.ensure_local(
                engine=state.engine, store=state.store, study_uid=study, calling_ae=handle.ae_title
            )
    items: list[_Item] = []
    with Session(state.engine) as session:
        for (study, series), sops in scopes.items():
            try:
                refs = find_instances(session=session, study_uid=study, series_uid=series)
            except NotFound:
                continue  # indexed without instances (e.g. synced series only): nothing to send
            for ref in refs:
                if sops is None or ref.sop_uid in sops:
                    items.append(
                        _Item(
                            key=ref.object_key,
                            sop_class=ref.sop_class_uid,
                            sop_uid=ref.sop_uid,
                            transfer_syntax=ref.transfer_syntax_uid or ExplicitVRLittleEndian,
                        )
                    )
    return items


def _json_value(match: dict[str, Any], tag: str) -> str:
    values = (match.get(tag) or {}).get("Value") or [""]
    return str(values[0])


def _send_items(
    event: evt.Event, handle: ScpHandle, items: list[_Item]
) -> Iterator[tuple[int | Dataset, Any]]:
    spool = str(_spool_dir(handle.state.settings.data_dir, sweep=False))
    for item in items:
        if event.is_cancelled:
            yield ds.CANCEL, None
            return
        yield ds.PENDING, _StoredInstance(handle.state.store, item, spool)


class _StoredInstance(Dataset):
    """A stored object to send as a C-MOVE/C-GET sub-operation, without loading it.

    pynetdicom's retrieve services send what the handler yields with `send_c_store`, which
    decodes and re-encodes a Dataset whole (an instance's size several times over in memory).
    This one only names the instance (pynetdicom wants a non-empty Dataset);
    `_send_c_store_streamed` sends the object's file as stored, PDU by PDU, when the peer
    accepted its SOP class in the stored transfer syntax, else loads it and converts it (a
    compressed instance is decompressed when the peer takes only uncompressed ones)."""

    def __init__(self, store: Any, item: _Item, spool_dir: str) -> None:
        super().__init__()
        self.SOPClassUID = item.sop_class
        self.SOPInstanceUID = item.sop_uid
        object.__setattr__(self, "_scanonce_source", (store, item, spool_dir))

    def send(self, assoc: Association, *args: Any, **kwargs: Any) -> Dataset:
        store, item, spool_dir = object.__getattribute__(self, "_scanonce_source")
        with ds.stored_file(store, item.key, spool_dir=spool_dir) as path:
            meta, _offset = split_dataset(Path(path))
            try:
                assoc._get_valid_context(
                    item.sop_class, meta.TransferSyntaxUID, "scu", allow_conversion=False
                )
            except ValueError:
                dataset = dcmread(path)
                _fit_to_contexts(dataset, assoc.accepted_contexts)
                return cast(Dataset, _send_c_store(assoc, dataset, *args, **kwargs))
            with _sending_from_file(assoc):
                return cast(Dataset, _send_c_store(assoc, path, *args, **kwargs))


# PDUs of one sub-operation waiting for the DUL thread: a slow peer makes the sender wait
# instead of the whole instance piling up in the queue.
_MAX_QUEUED_PDUS = 16


@contextlib.contextmanager
def _sending_from_file(assoc: Association) -> Iterator[None]:
    dul = assoc.dul
    send_pdu = dul.send_pdu

    def bounded(primitive: Any) -> None:
        queue = dul.to_provider_queue
        while queue.qsize() >= _MAX_QUEUED_PDUS and dul.is_alive() and not dul._kill_thread:
            time.sleep(0.0005)
        send_pdu(primitive)

    dul.send_pdu = bounded  # type: ignore[method-assign]
    try:
        with chunked_send():
            yield
    finally:
        del dul.send_pdu


_send_c_store = Association.send_c_store


def _send_c_store_streamed(self: Association, dataset: Any, *args: Any, **kwargs: Any) -> Dataset:
    if isinstance(dataset, _StoredInstance):
        return dataset.send(self, *args, **kwargs)
    return cast(Dataset, _send_c_store(self, dataset, *args, **kwargs))


Association.send_c_store = _send_c_store_streamed  # type: ignore[method-assign]


def _fit_to_contexts(dataset: Dataset, accepted: list[PresentationContext]) -> None:
    """C-GET: the requestor chose the storage contexts. A compressed instance the peer cannot
    take as stored is decompressed (if a pixel data handler can) so it still arrives."""
    ts = dataset.file_meta.get("TransferSyntaxUID")
    sop_class = dataset.get("SOPClassUID")
    ok = [cx for cx in accepted if cx.abstract_syntax == sop_class]
    if ts is None or not ts.is_compressed or any(ts in cx.transfer_syntax for cx in ok):
        return
    if any(set(cx.transfer_syntax) & set(_UNCOMPRESSED) for cx in ok):
        try:
            dataset.decompress()
        except Exception:
            log.warning("C-GET: cannot decompress %s for the peer", ts)


def _move_contexts(items: list[_Item]) -> list[PresentationContext]:
    """Contexts for the sub-association: each (SOP class, stored transfer syntax) as stored, and
    each SOP class uncompressed as a fallback the destination is sure to accept."""
    contexts: list[PresentationContext] = []
    pairs = ds.distinct((i.sop_class, i.transfer_syntax) for i in items)
    for sop_class, ts in pairs:
        if ts not in _UNCOMPRESSED:
            contexts.append(build_context(sop_class, [ts]))
    for sop_class in dict.fromkeys(i.sop_class for i in items):
        contexts.append(build_context(sop_class, list(_UNCOMPRESSED)))
    return contexts[:_MAX_REQUESTED_CONTEXTS]


def _on_move(event: evt.Event, handle: ScpHandle) -> Iterator[Any]:
    """C-MOVE, Patient Root and Study Root, to a registered destination AE. Statuses
    (PS3.4 C.4.2.1.5):

    - 0x0124 Refused: not authorized: the policy refuses the caller C-MOVE (broker.dimse.access,
      before this handler runs; sent, then the association is aborted: no sub-association).
    - 0xFF00 Pending: after each C-STORE sub-operation.
    - 0x0000 Success: all sub-operations complete without failures.
    - 0xB000 Warning: some sub-operations failed (FailedSOPInstanceUIDList), e.g. an instance
      indexed but not held here.
    - 0xA702 Out of resources, unable to perform sub-operations: all sub-operations failed.
    - 0xA801 Move destination unknown: the AE title is not registered (also when it cannot be
      reached, as pynetdicom reports a failed sub-association).
    - 0xFE00 Cancel: the peer sent C-CANCEL.
    - 0xA702 also when the study is held only at a facility that cannot be reached now
      (retrieve on demand); ErrorComment names the facility.
    - 0xA900 Identifier does not match SOP class: as for C-FIND, and when the unique key of
      the retrieve level (PatientID, StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID) is
      missing or a wildcard, or a PatientID list (one patient per request); 0xC000 Unable to
      process (bad value); 0xC001 the index failed.
      These, and the 0xA702 above, are decided before any sub-operation: answered without
      connecting to the destination, and whether or not it is up.
    - 0xA702 also while the database is away, before the destination could be looked up
      (answered on the association, which stays up: broker.dimse.access.unavailable).
    """
    principal, _facility = handle.caller(event)
    try:
        destination = ds.move_destination(
            engine=handle.state.engine, peers=handle.peers, ae_title=str(event.move_destination or "")
        )
    except SQLAlchemyError as exc:
        log.error("C-MOVE answered 'unavailable', database unavailable: %s", type(exc).__name__)
        yield from access.unavailable(event, "C-MOVE")
        return
    if destination is None:
        yield None, None
        return
    try:
        dimse_audit.record(handle.state, event, principal, "C-MOVE")
        items = _instances_to_send(handle, event)
    except Exception as exc:
        # Answered without a sub-association: nothing is to be sent, and the peer learns why
        # whether or not the destination is up.
        failure = _failure(exc)
        yield from access.fail_retrieve(event, int(failure.Status), str(failure.get("ErrorComment", "")))
        return
    yield (*destination, {"contexts": _move_contexts(items)} if items else {})
    yield len(items)
    yield from _send_items(event, handle, items)


def _on_get(event: evt.Event, handle: ScpHandle) -> Iterator[Any]:
    """C-GET, Patient Root and Study Root: sub-operations on this association, as the
    requestor's Storage SCP. Statuses (PS3.4 C.4.3.1.4):

    - 0x0124 Refused: not authorized: the policy refuses the caller C-GET (broker.dimse.access,
      before this handler runs).
    - 0xFF00 Pending, 0x0000 Success, 0xB000 Warning (some failed), 0xA702 all failed or the
      facility holding the study is down, 0xFE00 Cancel - as for C-MOVE. A compressed instance
      the requestor did not accept in that transfer syntax is decompressed when possible, else
      its sub-operation fails.
    - 0xA900 / 0xC000 / 0xC001 - as for C-MOVE (the unique key of the level is required).
    - 0xA702 while the database is away.
    """
    principal, _facility = handle.caller(event)
    try:
        dimse_audit.record(handle.state, event, principal, "C-GET")
        items = _instances_to_send(handle, event)
    except Exception as exc:
        failure = _failure(exc)  # answered without a sub-operation count (access.fail_retrieve)
        yield from access.fail_retrieve(event, int(failure.Status), str(failure.get("ErrorComment", "")))
        return
    yield len(items)
    yield from _send_items(event, handle, items)


def _failure(exc: Exception) -> Dataset:
    if isinstance(exc, IdentifierError):
        return status_dataset(exc.status, exc.comment)
    if isinstance(exc, BadRequest):
        return status_dataset(ds.UNABLE_TO_PROCESS, exc.message)
    if isinstance(exc, (Unavailable, StoreUnavailable)):
        # A facility holding the study (or our store) is down: nothing could be sent.
        log.warning("retrieve failed: %s", exc.message)
        return status_dataset(ds.UNABLE_TO_PERFORM_SUBOPERATIONS, exc.message)
    log.error("retrieve failed: %s", type(exc).__name__)
    return status_dataset(ds.PROCESSING_FAILURE, "retrieve failed")
