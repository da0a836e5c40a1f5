"""The SCP cannot be locked out by peers that connect and stall, nor flooded from one address,
and it answers only to its own AE title. Real sockets, a real dcmtk echoscu."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider

from tests.dimse.conftest import Node, _start
from tests.peers import dcmtk

# An A-ASSOCIATE-RQ PDU header announcing 256 bytes that never come.
PARTIAL_HEADER = bytes.fromhex("010000000100")


def _connect(node: Node, source: str) -> socket.socket:
    return socket.create_connection(("127.0.0.1", node.port), timeout=5, source_address=(source, 0))


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """True if the server closes (EOF or reset) the connection within `seconds`."""
    sock.settimeout(seconds)
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def _thread_count() -> int:
    """Threads a DIMSE connection starts (its association, its DUL reader, a socketserver request
    thread), not the whole process's: a pool elsewhere in the test process spinning up a thread
    meanwhile (the fsync or parse pools of an earlier test) must not look like a connection's."""
    return sum(
        1
        for t in threading.enumerate()
        if isinstance(t, Association | DULServiceProvider) or "process_request" in t.name
    )


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[Node]:
    yield from _start(tmp_path, dimse_request_timeout=1.5, dimse_max_connections_per_address=4)


def test_stallers_neither_hold_slots_nor_stay_connected(guarded: Node) -> None:
    node = guarded
    # 33 stallers, each from its own loopback address (so the per-address cap does not apply):
    # one more than maximum_associations (32).
    stallers = []
    for n in range(33):
        sock = _connect(node, f"127.0.1.{n + 1}")
        sock.sendall(PARTIAL_HEADER)
        stallers.append(sock)
    try:
        time.sleep(0.3)  # every staller's request is being read
        # A real peer associates while they are connected.
        done = dcmtk("echoscu", "-aet", "PACS1", "-aec", node.aet, "127.0.0.1", str(node.port), check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        # Every staller is dropped once the deadline to finish its PDU has passed.
        deadline = time.monotonic() + 5
        for sock in stallers:
            assert _closed_within(sock, max(0.1, deadline - time.monotonic())), "a staller stayed connected"
    finally:
        for sock in stallers:
            sock.close()


def test_a_trickling_request_is_dropped_at_the_deadline(guarded: Node) -> None:
    """The deadline bounds the whole A-ASSOCIATE-RQ, not the gap between two bytes."""
    sock = _connect(guarded, "127.0.2.1")
    started = time.monotonic()
    try:
        sock.sendall(PARTIAL_HEADER)
        closed = False
        while time.monotonic() - started < 6:
            try:
                sock.sendall(b"\x00")
            except OSError:
                closed = True
                break
            if _closed_within(sock, 0.5):
                closed = True
                break
        assert closed
        assert time.monotonic() - started < 4  # the 1.5 s deadline, not 6 s of trickling
    finally:
        sock.close()


def test_connections_from_one_address_are_capped(tmp_path: Path) -> None:
    # A deadline long enough that the held connections outlive the test's steps.
    nodes = _start(tmp_path, dimse_request_timeout=30, dimse_max_connections_per_address=4)
    node = next(nodes)
    try:
        _check_cap(node)
    finally:
        nodes.close()


def _check_cap(node: Node) -> None:
    held = [_connect(node, "127.0.3.1") for _ in range(4)]
    try:
        time.sleep(0.2)
        threads = _thread_count()
        extra = [_connect(node, "127.0.3.1") for _ in range(20)]
        try:
            # Beyond the cap of 4, connections are closed at once, without starting threads.
            for sock in extra:
                assert _closed_within(sock, 1.0)
            assert _thread_count() <= threads + 2
        finally:
            for sock in extra:
                sock.close()
        # The four held ones are still open, and another address is not affected.
        assert not any(_closed_within(sock, 0.05) for sock in held)
        done = dcmtk("echoscu", "-aet", "PACS1", "-aec", node.aet, "127.0.0.1", str(node.port), check=False)
        assert done.returncode == 0, done.stdout + done.stderr
    finally:
        for sock in held:
            sock.close()
    # Once they are gone, the address may connect again.
    time.sleep(0.3)
    again = _connect(node, "127.0.3.1")
    with contextlib.closing(again):
        assert not _closed_within(again, 0.3)


def test_association_to_another_called_ae_title_is_rejected(node: Node) -> None:
    done = dcmtk("echoscu", "-aet", "PACS1", "-aec", "NOTSCANONCE", "127.0.0.1", str(node.port), check=False)
    out = done.stdout + done.stderr
    assert done.returncode != 0
    # A-ASSOCIATE-RJ: rejected-permanent, service user, called AE title not recognised.
    assert "Rejected Permanent" in out and "Called AE Title Not Recognized" in out, out
    done = dcmtk("echoscu", "-aet", "PACS1", "-aec", node.aet, "127.0.0.1", str(node.port))
    assert done.returncode == 0


def test_an_oversized_pdu_is_refused_before_it_is_read(tmp_path: Path) -> None:
    """A header announcing a huge A-ASSOCIATE-RQ does not make the SCP gather it in memory."""
    nodes = _start(tmp_path, dimse_request_timeout=30)
    node = next(nodes)
    try:
        sock = _connect(node, "127.0.4.1")
        with contextlib.closing(sock):
            sock.sendall(b"\x01\x00" + (512 << 20).to_bytes(4, "big"))  # 512 MiB
            with pytest.raises(OSError):  # closed at once: the peer's writes fail
                for _ in range(256):
                    sock.sendall(b"\0" * 65536)  # 16 MiB, far beyond any real request
    finally:
        nodes.close()
