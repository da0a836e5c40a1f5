"""Event-driven reactors for pynetdicom's association and DUL threads.

pynetdicom 3.0 runs two polling loops per association: the DUL thread sleeps 1 ms whenever it
finds nothing to do, and the association thread sleeps 1 ms before every look at its message
queue (pynetdicom's own TODO: "try and make this event based rather than running loops"). Each
C-STORE waits through several of those naps, and with a few associations open the idle threads
wake 1,000 times a second each and fight over the GIL: measured with dcmtk's storescu, four
associations in parallel and a handler that does nothing, plain pynetdicom tops out near 420
instances/s.

`install()` replaces the two sleeps with waits that end as soon as there is work:

- the DUL thread waits in `select()` on its socket and on a self-pipe that is written whenever
  the local user queues a primitive to send (`to_provider_queue`), an event is queued for the
  state machine (`event_queue`, e.g. a socket closed by another thread), or the DUL is killed;
- the association thread waits on a `threading.Event` set whenever a complete DIMSE message
  arrives (`dimse.msg_queue`), an ACSE primitive arrives (`to_user_queue`: release, abort),
  the reactor checkpoint is cleared (a local SCU request wants the reactor paused) or the
  association is killed.

`install()` also bounds how long reading one PDU may take, for the associations of an AE that
sets `scanonce_request_timeout` (the SCP): pynetdicom reads a PDU with blocking `recv()` calls
once its first byte is there, so a peer that sends part of a PDU header and stalls held the DUL
thread (and its association slot) for as long as it kept the connection open; no ARTIM or
network timer is looked at meanwhile. Here every PDU must be complete within the timeout of its
first byte, and before association within the timeout of the connection (PS3.8 9.1.5's ARTIM
role), or the connection is closed.

Both waits have a short timeout (`_TICK`) so that everything pynetdicom checks by polling
(ARTIM and idle timers, a dead DUL thread, a TLS socket's buffered bytes) is still seen
promptly. The loop bodies are otherwise pynetdicom 3.0's, line for line: state machine,
timers and shutdown behave as documented there. `install()` is idempotent and applies to every
association of the process (SCP and SCU sides); it refuses other pynetdicom versions rather
than patching code it has not been checked against.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import socket
import ssl
import struct
import threading
import time
from typing import Any

import pynetdicom
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.transport import AssociationSocket
from pynetdicom.utils import set_timer_resolution

from broker.dicom import fast_store, known_items, known_uids

log = logging.getLogger("scanonce.dimse")

# Upper bound of every wait: how late a timer expiry or a dead thread may be noticed.
_TICK = 0.02
_CHECKED_VERSIONS = ("3.0.",)

_installed = False
_install_lock = threading.Lock()


class _Pipe:
    """A self-pipe: `poke()` from any thread makes a `select()` on `fd` return.

    Other threads poke it after its DUL thread has closed it (a kill, an event queued as the
    association ends). A closed descriptor's number is the next one the process hands out,
    often to a C-STORE spool file: a write to it then put a NUL byte into that file, and its
    object no longer hashed as indexed. So the descriptors are used and closed only under a
    lock, and never once closed (the calls do not block: both ends are non-blocking)."""

    def __init__(self) -> None:
        self.fd, self._w = os.pipe()
        os.set_blocking(self.fd, False)
        os.set_blocking(self._w, False)
        self._lock = threading.Lock()
        self._closed = False

    def poke(self) -> None:
        with self._lock, contextlib.suppress(OSError):  # full: already poked, nothing to add
            if not self._closed:
                os.write(self._w, b"\0")

    def drain(self) -> None:
        with self._lock, contextlib.suppress(OSError):
            if not self._closed:
                while os.read(self.fd, 4096):
                    pass

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for fd in (self.fd, self._w):
                with contextlib.suppress(OSError):
                    os.close(fd)


class _PokingQueue(queue.Queue):
    """A queue that wakes a waiting reactor on every put."""

    def __init__(self, poke: Any) -> None:
        super().__init__()
        self._poke = poke

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._poke()


class _PokingEvent(threading.Event):
    """The association's reactor checkpoint: clearing it (a local request wants the reactor
    paused, then waits for `_is_paused`) must wake the reactor at once."""

    def __init__(self, poke: Any) -> None:
        super().__init__()
        self._poke = poke

    def clear(self) -> None:
        super().clear()
        self._poke()


def _wake_event(assoc: Association) -> threading.Event:
    wake = assoc.__dict__.get("_scanonce_wake")
    if wake is None:
        wake = assoc.__dict__.setdefault("_scanonce_wake", threading.Event())
    return wake


# -- DUL ---------------------------------------------------------------------------------------

_dul_init = DULServiceProvider.__init__
_dul_kill = DULServiceProvider.kill_dul
_dul_read_pdu = DULServiceProvider._read_pdu_data
_PDU_TYPES = frozenset(range(0x01, 0x08))


def _dul_init_poking(self: DULServiceProvider, assoc: Association) -> None:
    _dul_init(self, assoc)
    self._scanonce_opened = time.monotonic()  # type: ignore[attr-defined]
    pipe = _Pipe()
    self._scanonce_pipe = pipe  # type: ignore[attr-defined]

    def poke_from_elsewhere() -> None:
        # The DUL thread queues an event for itself with every PDU it reads (Evt10 ...) and
        # looks at the queue again before it next waits (the same pass, or the next one after
        # any event it handled): poking its own pipe only made that wait return at once,
        # three system calls and an idle pass per PDU for nothing.
        if threading.current_thread() is not self:
            pipe.poke()

    self.event_queue = _PokingQueue(poke_from_elsewhere)
    self.to_provider_queue = _PokingQueue(poke_from_elsewhere)
    self.to_user_queue = _PokingQueue(_wake_event(assoc).set)


def _dul_kill_poking(self: DULServiceProvider) -> None:
    _dul_kill(self)
    pipe = getattr(self, "_scanonce_pipe", None)
    if pipe is not None:
        pipe.poke()


class _Deadline(Exception):
    """The peer did not finish its PDU in time."""


def _recv_by(sock: AssociationSocket, nr_bytes: int, deadline: float) -> bytearray:
    """AssociationSocket.recv (up to `nr_bytes`, fewer if the peer closes) that gives up at
    `deadline` (time.monotonic()) however the bytes trickle in."""
    raw = sock.socket
    if raw is None:
        return bytearray()
    if isinstance(raw, ssl.SSLSocket) or raw.gettimeout() is not None:
        return _recv_by_timeout(raw, nr_bytes, deadline)
    # A blocking socket (what pynetdicom leaves an accepted connection as): read with
    # MSG_DONTWAIT and wait in select() only when nothing is there. The bytes of a PDU are
    # almost always there already (select said the socket was readable), so this is one
    # recv() per read where a socket timeout set and restored around each read cost four
    # system calls more (two FIONBIO ioctls, a poll): each one lets go of the GIL and waits to
    # take it back, on the thread every C-STORE passes through.
    data = bytearray()
    while len(data) < nr_bytes:
        try:
            chunk = raw.recv(min(nr_bytes - len(data), 1 << 16), socket.MSG_DONTWAIT)
        except BlockingIOError:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Deadline from None
            try:
                ready, _, _ = select.select([raw], [], [], remaining)
            except ValueError as exc:  # closed under us (fileno -1): as a failed recv
                raise OSError("socket closed") from exc
            if not ready:
                raise _Deadline from None
            continue
        if not chunk:
            break
        data += chunk
    return data


def _recv_by_timeout(raw: Any, nr_bytes: int, deadline: float) -> bytearray:
    """`_recv_by` through the socket's timeout, restored afterwards (TLS, where recv() takes
    no flags, or a socket someone gave a timeout)."""
    previous = raw.gettimeout()
    data = bytearray()
    try:
        while len(data) < nr_bytes:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Deadline
            raw.settimeout(remaining)
            try:
                chunk = raw.recv(min(nr_bytes - len(data), 1 << 16))
            except TimeoutError:
                raise _Deadline from None
            if not chunk:
                break
            data += chunk
    finally:
        with contextlib.suppress(OSError):
            raw.settimeout(previous)  # sends (from this thread) block as pynetdicom expects
    return data


# Association and release PDUs are small: a request with 128 presentation contexts of a dozen
# transfer syntaxes each and a user identity item is well under this.
_LARGEST_CONTROL_PDU = 1 << 20


def _largest_pdu(assoc: Association, pdu_type: int) -> int | None:
    """The longest PDU a peer may send us: P-DATA-TF no longer than the maximum length we
    announced (PS3.8 D.1), the others `_LARGEST_CONTROL_PDU`; None: no limit."""
    if pdu_type != 0x04:
        return _LARGEST_CONTROL_PDU
    ours = int(getattr(assoc.ae, "maximum_pdu_size", 0) or 0)
    return ours or None


def _dul_read_pdu_data(self: DULServiceProvider) -> None:
    """pynetdicom 3.0's DULServiceProvider._read_pdu_data with a deadline on the whole PDU and
    a bound on its announced length when the AE sets `scanonce_request_timeout`; a peer that
    misses the one or exceeds the other is disconnected (Evt17)."""
    limit: float | None = getattr(self.assoc.ae, "scanonce_request_timeout", None)
    sock = self.socket
    if limit is None or not isinstance(sock, AssociationSocket):
        _dul_read_pdu(self)
        return
    deadline = time.monotonic() + limit
    if self.state_machine.current_state == "Sta2":  # still awaiting the A-ASSOCIATE-RQ
        deadline = min(deadline, self._scanonce_opened + limit)  # type: ignore[attr-defined]
    try:
        bytestream = _recv_by(sock, 6, deadline)
        if len(bytestream) < 6:
            self.event_queue.put("Evt17")  # closed by the peer
            return
        pdu_type, _, pdu_length = struct.unpack(">BBL", bytestream)
        if pdu_type not in _PDU_TYPES:
            log.error("Unknown PDU type received '0x%02X'", pdu_type)
            self.event_queue.put("Evt19")
            return
        largest = _largest_pdu(self.assoc, pdu_type)
        if largest is not None and pdu_length > largest:
            # pynetdicom would gather whatever length the header claims (up to 4 GiB) in memory.
            log.warning(
                "DIMSE peer %s announced a %d-byte PDU of type 0x%02X (at most %d): disconnected",
                getattr(self.assoc.requestor, "address", "?"),
                pdu_length,
                pdu_type,
                largest,
            )
            sock.close()
            return
        bytestream += _recv_by(sock, pdu_length, deadline)
    except _Deadline:
        log.warning(
            "DIMSE peer %s did not complete a PDU within %.0f s: disconnected",
            getattr(self.assoc.requestor, "address", "?"),
            limit,
        )
        sock.close()  # queues Evt17
        return
    except OSError:
        log.error("Connection closed before the entire PDU was received")
        self.event_queue.put("Evt17")
        return
    if len(bytestream) != 6 + pdu_length:
        log.error(
            "The received PDU is shorter than expected (%d of %d bytes received)",
            len(bytestream),
            6 + pdu_length,
        )
        self.event_queue.put("Evt17")
        return
    if pdu_type == 0x04:
        fast = fast_store.for_dul(self)
        if fast is not None and fast.take(self, bytestream):
            return
    try:
        pdu, event = self._decode_pdu(bytestream)
        self.event_queue.put(event)
    except Exception as exc:
        log.error("Unable to decode the received PDU data: %s", type(exc).__name__)
        self.event_queue.put("Evt19")
        return
    self._recv_pdu.put(pdu)


def _dul_wait(self: DULServiceProvider, pipe: _Pipe) -> None:
    fds = [pipe.fd]
    sock = getattr(self.socket, "socket", None)
    if sock is not None:
        pending = getattr(sock, "pending", None)  # TLS: bytes already decrypted, select can't see
        if pending is not None and pending():
            return
        with contextlib.suppress(OSError, ValueError):
            if sock.fileno() >= 0:
                fds.append(sock.fileno())
    try:
        ready, _, _ = select.select(fds, [], [], _TICK)
    except (OSError, ValueError):
        return  # the socket was closed under us: the loop body notices and queues Evt17
    if pipe.fd in ready:
        pipe.drain()


# How long an acceptor that has sent an A-ASSOCIATE-RJ (or an A-RELEASE-RP) waits for its peer to
# close the connection (PS3.8 Sta13, ended by the ARTIM timer) before closing it itself.
_CLOSE_GRACE = 2.0


def _transport_event(self: DULServiceProvider) -> bool:
    """pynetdicom's `_is_transport_event`, but in Sta13 (an A-ASSOCIATE-RJ or A-RELEASE-RP sent)
    the connection is left to the peer to close (AR-5), or to ARTIM's expiry (AA-2, at most
    `_CLOSE_GRACE`), as PS3.8 9.2 has it. pynetdicom closed it the moment nothing was waiting to
    be read, right behind the answer: over TLS, a peer busy elsewhere could read the close before
    the rejection and report an abort, its reason lost (seen with pynetdicom as the peer)."""
    sock = self.socket
    if self.state_machine.current_state != "Sta13" or sock is None:
        return bool(self._is_transport_event())
    if sock.ready:
        self._read_pdu_data()  # the peer's close (Evt17), or what it still sends
        return True
    artim = self.artim_timer
    if artim.timeout is None or artim.timeout > _CLOSE_GRACE:
        artim.timeout = _CLOSE_GRACE
    return False


def _dul_run_reactor(self: DULServiceProvider) -> None:
    """pynetdicom 3.0's DULServiceProvider.run_reactor with `time.sleep(self._run_loop_delay)`
    replaced by `_dul_wait` (socket readable, a primitive or event queued, or killed)."""
    pipe: _Pipe = self._scanonce_pipe  # type: ignore[attr-defined]
    self._idle_timer.start()
    sleep = False
    try:
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
                sleep = True

            if sleep:
                _dul_wait(self, pipe)

            if self._kill_thread:
                break

            if self.artim_timer.expired:
                self.event_queue.put("Evt18")

            try:
                if self._process_recv_primitive():
                    pass
                elif _transport_event(self):
                    self._idle_timer.restart()
            except Exception as exc:
                log.error("Exception in DUL reactor, aborting association: %s", type(exc).__name__)
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                with contextlib.suppress(Exception):
                    self.socket.send(abort_pdu.encode())  # type: ignore[union-attr]
                self.assoc.is_aborted = True
                self.assoc.is_established = False
                self.assoc._kill = True
                self._kill_thread = True
                _wake_event(self.assoc).set()
                return

            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                sleep = True
                continue

            before = self.state_machine.current_state
            if event == "Evt15" and before == "Sta2":
                # An abort asked for before the peer sent its request (AE shutdown): PS3.8 has
                # no A-ABORT to send in Sta2, pynetdicom raises; just close the connection.
                with contextlib.suppress(queue.Empty):
                    self.to_provider_queue.get(block=False)
                if self.socket is not None:
                    self.socket.close()
                continue
            if event == "Evt15" and before == "Sta13":
                # An abort asked for (AE shutdown) while waiting for the peer to close after an
                # A-ASSOCIATE-RJ or A-RELEASE-RP: nothing is left to abort (PS3.8 has no Sta13 +
                # Evt15; pynetdicom raises and the thread dies). Closed as ARTIM's expiry would.
                with contextlib.suppress(queue.Empty):
                    self.to_provider_queue.get(block=False)
                event = "Evt18"
            self.state_machine.do_action(event)
            if before == "Sta2" and self.state_machine.current_state == "Sta1":
                # The connection ended before an A-ASSOCIATE-RQ (closed, timed out, invalid):
                # tell the acceptor thread, which would otherwise wait out the ACSE timeout.
                self._scanonce_dropped = True  # type: ignore[attr-defined]
                _wake_event(self.assoc).set()
            sleep = False
    finally:
        fast_store.end(self)
        pipe.close()


# -- Association -------------------------------------------------------------------------------

_assoc_init = Association.__init__
_assoc_kill = Association.kill
_dimse_init = DIMSEServiceProvider.__init__


def _assoc_init_poking(self: Association, ae: Any, mode: str) -> None:
    _assoc_init(self, ae, mode)
    wake = _wake_event(self)
    checkpoint = _PokingEvent(wake.set)
    if self._reactor_checkpoint.is_set():
        checkpoint.set()
    self._reactor_checkpoint = checkpoint


def _dimse_init_poking(self: DIMSEServiceProvider, assoc: Association) -> None:
    _dimse_init(self, assoc)
    self.msg_queue = _PokingQueue(_wake_event(assoc).set)


def _assoc_kill_poking(self: Association) -> None:
    _wake_event(self).set()
    _assoc_kill(self)


def _pause_while_requested(assoc: Association) -> None:
    """pynetdicom's reactor checkpoint, without its race. A local request (send_c_echo, ...)
    clears the checkpoint, waits until the reactor says it is paused, sends, and reads the
    response off the DIMSE queue itself. pynetdicom marks itself unpaused only after the
    checkpoint wait returns, and that wait also returns for a set() that a clear() has already
    undone (back-to-back requests): the request then sees the stale "paused", sends, and the
    reactor may take the response off the queue ("Received unexpected C-ECHO service message").
    Here the reactor marks itself unpaused first and only then checks that the checkpoint is
    still set; if it is not, it pauses again before touching any queue."""
    while True:
        assoc._is_paused = True
        assoc._reactor_checkpoint.wait()
        assoc._is_paused = False
        if assoc._reactor_checkpoint.is_set() or assoc._kill:
            return


def _assoc_run_reactor(self: Association) -> None:
    """pynetdicom 3.0's Association._run_reactor with the `time.sleep(0.001)` at the top of each
    loop replaced by a wait on the association's wake event (skipped right after serving a
    message, as more may already be queued)."""
    wake = _wake_event(self)
    self._is_paused = False
    served = False
    while not self._kill:
        if not served:
            wake.wait(_TICK)
        wake.clear()
        served = False

        _pause_while_requested(self)

        context_id, msg = self.dimse.get_msg(block=False)
        if msg:
            self._serve_request(msg, context_id)  # type: ignore[arg-type]
            served = True

        if self.is_established and self.acse.is_release_requested():
            self.acse.send_release(is_response=True)
            log.info("Association Released")
            self.is_released = True
            self.is_established = False
            evt.trigger(self, evt.EVT_RELEASED, {})
            self.kill()
            return

        if self.acse.is_aborted():
            log_msg = "Association Aborted"
            if self.acse.is_aborted("a-p-abort"):
                log_msg += " (A-P-ABORT)"
            log.info(log_msg)
            self.dul.receive_pdu(wait=False)
            self.is_aborted = True
            self.is_established = False
            evt.trigger(self, evt.EVT_ABORTED, {})
            self.kill()
            return

        if not self.dul.is_alive():
            self.kill()
            return

        if self.dul.idle_timer_expired():
            log.error("Network timeout reached")
            if self.network_timeout_response == "A-RELEASE":
                self._is_paused = True
                self._reactor_checkpoint.wait()
                self.release()
                self._is_paused = False
            else:
                self.abort()

            self.kill()
            return


_assoc_run_outer = Association.run_reactor


def _await_request(assoc: Association) -> Any:
    """The acceptor's wait for the A-ASSOCIATE-RQ primitive (pynetdicom: one blocking wait of
    the ACSE timeout), ended early when the DUL dropped the connection first, so a connection
    that closes or stalls never keeps its thread beyond its own lifetime."""
    limit = assoc.acse_timeout
    deadline = None if limit is None else time.monotonic() + limit
    while True:
        wait = 0.25 if deadline is None else max(0.0, min(0.25, deadline - time.monotonic()))
        primitive = assoc.dul.receive_pdu(wait=True, timeout=wait)
        if primitive is not None:
            return primitive
        if getattr(assoc.dul, "_scanonce_dropped", False) or not assoc.dul.is_alive():
            return None
        if deadline is not None and time.monotonic() >= deadline:
            return None


def _assoc_run(self: Association) -> None:
    """pynetdicom 3.0's Association.run_reactor, the acceptor's part, waiting for the request
    with `_await_request`."""
    if not self.is_acceptor:
        _assoc_run_outer(self)
        return
    if not self._started_dul:
        self.dul.start()
        self._started_dul = True
        self._dul_ready.wait()

    primitive = _await_request(self)
    if primitive is None:
        self.kill()
        sock = self.dul.socket
        if self._server and sock is not None and sock.socket:
            self._server.shutdown_request(sock.socket)
        return

    self.requestor.primitive = primitive
    evt.trigger(self, evt.EVT_REQUESTED, {})
    if not self.is_aborted and not self.is_rejected:
        self.acse.negotiate_association()
    if self.is_established:
        with set_timer_resolution(self._timer_resolution):
            self._run_reactor()
    sock = self.dul.socket
    if self._server and sock is not None and sock.socket:
        self._server.shutdown_request(sock.socket)


def install() -> None:
    """Switch every pynetdicom association of this process to the event-driven reactors."""
    global _installed
    with _install_lock:
        if _installed:
            return
        version = str(getattr(pynetdicom, "__version__", ""))
        if not version.startswith(_CHECKED_VERSIONS):
            log.warning("pynetdicom %s: keeping its polling reactors (checked against 3.0)", version)
            _installed = True
            return
        known_uids.install()
        known_items.install()
        DULServiceProvider.__init__ = _dul_init_poking  # type: ignore[method-assign]
        DULServiceProvider.kill_dul = _dul_kill_poking  # type: ignore[method-assign]
        DULServiceProvider.run_reactor = _dul_run_reactor  # type: ignore[method-assign]
        DULServiceProvider._read_pdu_data = _dul_read_pdu_data  # type: ignore[method-assign]
        DIMSEServiceProvider.__init__ = _dimse_init_poking  # type: ignore[method-assign]
        Association.__init__ = _assoc_init_poking  # type: ignore[method-assign]
        Association.kill = _assoc_kill_poking  # type: ignore[method-assign]
        Association._run_reactor = _assoc_run_reactor  # type: ignore[method-assign]
        Association.run_reactor = _assoc_run  # type: ignore[method-assign]
        _installed = True
