"""The event-driven association reactors (broker.dicom.reactor): everything pynetdicom's polling
loops noticed is still noticed (requests, releases, aborts, idle peers), with both sides in this
process patched, and dcmtk's tools as the peer where it matters."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, BinaryIO

import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from broker.dicom import reactor
from tests.peers import dcmtk, free_port

Server = tuple[int, dict[str, threading.Event]]


@pytest.fixture
def server() -> Iterator[Server]:
    reactor.install()
    seen = {name: threading.Event() for name in ("released", "aborted", "echo")}
    ae = AE(ae_title="REACTOR")
    ae.add_supported_context(Verification)
    ae.network_timeout = 2.0

    def on_echo(event: Any) -> int:
        seen["echo"].set()
        return 0x0000

    handlers: list[Any] = [
        (evt.EVT_C_ECHO, on_echo),
        (evt.EVT_RELEASED, lambda e: seen["released"].set()),
        (evt.EVT_ABORTED, lambda e: seen["aborted"].set()),
    ]
    port = free_port()
    ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)
    yield port, seen
    ae.shutdown()


def _client() -> AE:
    ae = AE(ae_title="CLIENT")
    ae.add_requested_context(Verification)
    return ae


def test_many_requests_on_one_association_then_release(server: Server) -> None:
    port, seen = server
    assoc = _client().associate("127.0.0.1", port, ae_title="REACTOR")
    assert assoc.is_established
    statuses = [getattr(assoc.send_c_echo(), "Status", None) for _ in range(50)]
    assoc.release()
    assert statuses == [0] * 50
    assert assoc.is_released
    assert seen["released"].wait(5)


def test_the_reactor_stays_paused_when_a_request_follows_another_at_once() -> None:
    """A request sets the checkpoint when it is done and the next one clears it at once: the
    paused reactor's wait returns for that set() anyway. It must pause again, not go on to read
    the queue the new request's response will arrive on (under load pynetdicom's own reactor
    did: "Received unexpected C-ECHO service message", then the request timed out)."""
    assoc = SimpleNamespace(_reactor_checkpoint=threading.Event(), _is_paused=False, _kill=False)
    went_on = threading.Event()

    def reactor_step() -> None:
        reactor._pause_while_requested(assoc)  # type: ignore[arg-type]
        went_on.set()

    thread = threading.Thread(target=reactor_step, daemon=True)
    thread.start()
    deadline = time.monotonic() + 5
    while not assoc._is_paused and time.monotonic() < deadline:
        time.sleep(0.001)
    assert assoc._is_paused
    assoc._reactor_checkpoint.set()  # request k is done ...
    assoc._reactor_checkpoint.clear()  # ... and request k+1 starts
    assert not went_on.wait(0.3)
    assert assoc._is_paused  # request k+1 may send: the reactor keeps off the queue
    assoc._reactor_checkpoint.set()  # request k+1 is done
    assert went_on.wait(5)
    thread.join(5)


def test_a_peer_abort_is_noticed(server: Server) -> None:
    port, seen = server
    assoc = _client().associate("127.0.0.1", port, ae_title="REACTOR")
    assert assoc.is_established
    assoc.abort()
    assert seen["aborted"].wait(5)


def test_an_idle_peer_is_dropped_after_the_network_timeout(server: Server) -> None:
    port, seen = server
    assoc = _client().associate("127.0.0.1", port, ae_title="REACTOR")
    assert assoc.is_established
    deadline = time.monotonic() + 10
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not assoc.is_established  # the server's idle timer (2 s) ended it
    assert seen["aborted"].is_set() or seen["released"].is_set()


def test_dcmtk_echoscu_repeats_against_the_patched_server(server: Server) -> None:
    port, seen = server
    done = dcmtk("echoscu", "-aet", "CLIENT", "-aec", "REACTOR", "--repeat", "20", "127.0.0.1", str(port))
    assert done.returncode == 0, done.stdout
    assert seen["echo"].is_set()


def test_a_wake_up_after_the_pipe_closed_never_writes_into_a_file_reusing_its_descriptor(
    tmp_path: Path,
) -> None:
    """Another thread may poke a DUL thread's pipe after that thread closed it (a kill, a queued
    event). The pipe's descriptor numbers are the next the process hands out: a C-STORE spool
    file opened meanwhile got a stray NUL byte, and its stored object no longer hashed as indexed."""
    pipe = reactor._Pipe()
    numbers = {pipe.fd, pipe._w}
    pipe.close()
    opened: list[BinaryIO] = []
    try:
        # POSIX hands out the lowest free descriptor: the pipe's two, unless another thread of
        # this process takes one first; open until both are files here.
        while len(opened) < 64 and not numbers <= {f.fileno() for f in opened}:
            opened.append((tmp_path / f"spool-{len(opened)}.dcm").open("w+b"))
        assert numbers <= {f.fileno() for f in opened}
        pipe.poke()
        pipe.drain()
        for f in opened:
            f.write(b"DICM")
            f.flush()
            f.seek(0)
            assert f.read() == b"DICM"
    finally:
        for f in opened:
            f.close()


def _recorded_request(called: str, calling: str) -> bytes:
    """The A-ASSOCIATE-RQ PDU pynetdicom sends, caught on a plain listening socket, so a test can
    send it from a socket whose every step it controls."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    ae = _client()
    ae.ae_title = calling
    ae.acse_timeout = 1
    port = listener.getsockname()[1]
    asking = threading.Thread(target=lambda: ae.associate("127.0.0.1", port, ae_title=called), daemon=True)
    asking.start()
    conn, _ = listener.accept()
    with conn, listener:
        head = conn.recv(6, socket.MSG_WAITALL)
        body = conn.recv(struct.unpack(">I", head[2:])[0], socket.MSG_WAITALL)
    asking.join(5)
    return head + body


@pytest.fixture
def rejecting() -> Iterator[tuple[AE, int, list[BaseException]]]:
    """A server that rejects every calling AE but ONLY, and the exceptions its threads raise."""
    reactor.install()
    failures: list[BaseException] = []
    hook = threading.excepthook
    threading.excepthook = lambda args: failures.append(args.exc_value or RuntimeError("?"))
    ae = AE(ae_title="REACTOR")
    ae.add_supported_context(Verification)
    ae.require_calling_aet = ["ONLY"]
    port = free_port()
    ae.start_server(("127.0.0.1", port), block=False)
    try:
        yield ae, port, failures
    finally:
        ae.shutdown()
        threading.excepthook = hook


def test_a_rejected_peer_closes_the_connection_itself_or_is_closed_after_a_grace(
    rejecting: tuple[AE, int, list[BaseException]],
) -> None:
    """After an A-ASSOCIATE-RJ the acceptor waits for the peer to close (PS3.8 Sta13, ARTIM), not
    closing right behind the answer: a peer busy elsewhere (over TLS especially) could read the
    close first and lose the rejection's reason. One that never closes is closed after a grace."""
    _ae, port, failures = rejecting
    with socket.create_connection(("127.0.0.1", port)) as peer:
        peer.sendall(_recorded_request("REACTOR", "STRANGER"))
        answer = peer.recv(10, socket.MSG_WAITALL)
        assert answer[0] == 0x03 and answer[7:10] == bytes([1, 1, 3])  # RJ: permanent, user, calling AE
        peer.settimeout(0.5)
        with pytest.raises(TimeoutError):
            peer.recv(1)  # still open: the close is the peer's to make
        peer.settimeout(10)
        started = time.monotonic()
        assert peer.recv(1) == b""  # ... until the grace is over
        assert time.monotonic() - started < 5
    assert failures == []


def test_shutting_down_while_a_rejected_peer_holds_on_closes_it_without_a_thread_error(
    rejecting: tuple[AE, int, list[BaseException]],
) -> None:
    ae, port, failures = rejecting
    with socket.create_connection(("127.0.0.1", port)) as peer:
        peer.sendall(_recorded_request("REACTOR", "STRANGER"))
        assert peer.recv(10, socket.MSG_WAITALL)[0] == 0x03
        ae.shutdown()
        peer.settimeout(10)
        assert peer.recv(1) == b""
    assert failures == []  # pynetdicom raised InvalidEventError (Evt15 in Sta13) in the DUL thread
