"""The single-writer handoff: DIMSE receiver processes on SQLite feed the serving process's writer.

SQLite has one writer at a time: receivers that each committed their own C-STOREs would queue on
its write lock (and its busy handler sleeps in steps of up to 100 ms). So on SQLite a receiver
(`broker.dimse.receivers`) does the CPU-heavy part of a C-STORE itself, off the serving
process's GIL: pynetdicom's decoding, the spool file written and hashed as it arrives, the
parse. It then sends the parsed instance, with who sent it (principal, facility) and its audit
hook, to the serving process over a Unix socket (`WriterServer`), where it joins the one
`IngestBatcher` the serving process's own C-STOREs use: the object is placed (the spool file is
on the data folder's filesystem, and moved) and committed in a group, with its audit event in
the same transaction. The receiver answers the C-STORE only with that commit's outcome, so a
success still means committed and durable.

Errors: a writer the receiver cannot reach, or a connection that breaks before the outcome
arrives, fails the C-STORE with 0xA700 (out of resources: the SCU retries later); nothing was
acknowledged. The next C-STORE connects again; a receiver whose serving process is gone exits
(`broker.dimse.receivers`). An instance whose outcome was lost may have been committed all the
same: its re-send is then an acknowledged duplicate.

The socket lives in a private temporary folder (0700, removed at close) rather than the data
folder: a Unix socket's path is limited to 107 bytes, and data folders can be long. Each
connection proves the shared key (multiprocessing's HMAC challenge both ways) before anything is
unpickled.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import AuthenticationError
from multiprocessing import connection as mpc
from multiprocessing.connection import Client, Connection
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine

from broker.deps import AppState
from broker.dicom.received import Received
from broker.dimse import service as ds
from broker.errors import Unavailable
from broker.index.service import IngestAudit, IngestBatcher, StoreOutcome, parse_instance
from broker.security.schemas import Principal
from broker.security.service import authorize
from storage import ObjectStore

log = logging.getLogger("scanonce.dimse")

WRITER_UNAVAILABLE = "the index writer is unavailable"


@dataclass(frozen=True)
class WriterAddress:
    """Where a receiver reaches the writer, and the key it proves (handed to it at spawn)."""

    path: str
    authkey: bytes


@dataclass
class _Request:
    principal: Principal
    facility_id: str
    parsed: Any  # broker.index.parse._Parsed: what the parse workers already pickle
    consume: bool
    audit: IngestAudit | None


class WriterServer:
    """In the serving process: accepts the receivers' connections and hands each request to the
    batcher `batcher()` returns (the serving SCP's; None once it is shutting down)."""

    def __init__(self, *, state: AppState, batcher: Callable[[], IngestBatcher | None]) -> None:
        self._state = state
        self._batcher = batcher
        self._folder = tempfile.mkdtemp(prefix="scanonce-writer-")  # 0700
        self.address = WriterAddress(str(Path(self._folder) / "writer.sock"), secrets.token_bytes(32))
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(self.address.path)
        self._sock.listen(64)
        self._closed = threading.Event()
        self._conns: set[Connection] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.handled = 0  # requests answered (committed or refused): what the receivers sent

    def start(self) -> WriterServer:
        self._thread = threading.Thread(target=self._accept, name="scanonce-writer-accept", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop accepting and drop the connections (call once the receivers have stopped)."""
        self._closed.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self._sock.close()
        if self._thread is not None:
            self._thread.join(5)
        with self._lock:
            # Under the lock that each connection's thread closes it under: a connection still
            # in the set is open, so its descriptor's number names it and not another socket or
            # file that took the number since. shutdown, not close: it wakes the connection's
            # thread blocked in recv (which then closes it), and the receiver's end sees the
            # writer go.
            for conn in self._conns:
                with contextlib.suppress(OSError), socket.socket(fileno=os.dup(conn.fileno())) as sock:
                    sock.shutdown(socket.SHUT_RDWR)
        shutil.rmtree(self._folder, ignore_errors=True)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._sock.accept()
            except OSError:
                return  # closed
            conn = Connection(client.detach())
            # Authenticated in the connection's own thread: one that never answers the challenge
            # holds up nothing else.
            threading.Thread(
                target=self._serve, args=(conn,), name="scanonce-writer-conn", daemon=True
            ).start()

    def _serve(self, conn: Connection) -> None:
        with self._lock:
            self._conns.add(conn)
        try:
            key = self.address.authkey
            mpc.deliver_challenge(conn, key)
            mpc.answer_challenge(conn, key)
            while not self._closed.is_set():
                request = conn.recv()
                reply = self._handle(request)
                with self._lock:
                    self.handled += 1
                conn.send(reply)
        except (EOFError, OSError, AuthenticationError):
            pass  # the receiver went away (or was not one of ours): its requests end with it
        finally:
            with self._lock, contextlib.suppress(OSError):
                self._conns.discard(conn)
                conn.close()

    def _handle(self, request: _Request) -> tuple[bool, Any]:
        """(True, StoreOutcome) once committed, or (False, an exception the receiver raises)."""
        batcher = self._batcher()
        if batcher is None:
            return False, Unavailable("the SCP is shutting down")
        state = self._state
        try:
            outcome = batcher.ingest_parsed(
                engine=state.engine,
                store=state.store,
                principal=request.principal,
                facility_id=request.facility_id,
                parsed=request.parsed,
                consume=request.consume,
                audit=request.audit,
            )
        except BaseException as exc:  # noqa: BLE001 - sent back to the receiver
            return False, _portable(exc)
        return True, outcome


def _portable(exc: BaseException) -> Exception:
    """The status the receiver's C-STORE handler answers with, decided (and logged) here as it
    would decide it for its own ingest, as an exception that pickles."""
    return ds.StoreRefused(*ds.store_failure(exc))


class RemoteWriter:
    """In a receiver process on SQLite: the SCP's ingest (`ingest_one`, as `IngestBatcher`'s),
    parsing here and committing through the serving process's writer. Connections are pooled:
    one per C-STORE in flight, reused by the next."""

    def __init__(self, address: WriterAddress) -> None:
        self._address = address
        self._idle: list[Connection] = []
        self._lock = threading.Lock()
        self._closed = False

    def ingest_one(
        self,
        *,
        engine: Engine,
        store: ObjectStore,
        principal: Principal,
        facility_id: str,
        path: str | Received,
        consume: bool = False,
        expected_sop: tuple[str, str] | None = None,
        audit: IngestAudit | None = None,
    ) -> StoreOutcome:
        """Parse here, commit there; returns the committed outcome. `engine` and `store` are
        this process's and unused: the writer places and commits with its own. Raises
        Unavailable when the writer cannot be reached or the outcome did not arrive."""
        authorize(principal, action="index.store", facility=facility_id)
        parsed = parse_instance(path, expected_sop=expected_sop)
        if isinstance(parsed, StoreOutcome):
            return parsed
        request = _Request(principal, facility_id, parsed, consume, audit)
        conn, pooled = self._connection()
        try:
            try:
                conn.send(request)
            except OSError:
                if not pooled:
                    raise
                # An idle connection the writer's end has closed: nothing was sent, so a new
                # connection may carry it.
                conn.close()
                conn, pooled = self._connection(fresh=True)
                conn.send(request)
            ok, value = conn.recv()
        except (EOFError, OSError) as exc:
            conn.close()
            log.error("C-STORE refused, the index writer went away: %s", type(exc).__name__)
            raise Unavailable(WRITER_UNAVAILABLE) from exc
        self._release(conn)
        if not ok:
            raise value
        return value

    def close(self) -> None:
        """Close the idle connections (those in use close as their C-STORE ends)."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def _connection(self, *, fresh: bool = False) -> tuple[Connection, bool]:
        """A connection, and whether it was pooled (idle since an earlier C-STORE)."""
        with self._lock:
            if self._idle and not fresh:
                return self._idle.pop(), True
        try:
            return Client(self._address.path, family="AF_UNIX", authkey=self._address.authkey), False
        except (OSError, EOFError, AuthenticationError) as exc:
            log.error("C-STORE refused, cannot reach the index writer: %s", type(exc).__name__)
            raise Unavailable(WRITER_UNAVAILABLE) from exc

    def _release(self, conn: Connection) -> None:
        with self._lock:
            if not self._closed:
                self._idle.append(conn)
                return
        conn.close()


def is_single_writer(database_url: str) -> bool:
    """Receivers hand their instances to the serving process's writer (SQLite) rather than each
    writing the index (PostgreSQL)."""
    return database_url.startswith("sqlite")


__all__ = ["RemoteWriter", "WriterAddress", "WriterServer", "is_single_writer", "WRITER_UNAVAILABLE"]
