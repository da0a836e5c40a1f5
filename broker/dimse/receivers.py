"""DIMSE receiver processes: several processes accepting on the one DIMSE port.

With `settings.dimse_receivers = N` (> 0), `scanonce serve` starts N receiver processes beside
its own DIMSE listener, all bound to the DIMSE port with SO_REUSEPORT; the kernel spreads
incoming connections over the N + 1 listeners. A receiver runs the DIMSE SCP and nothing else
(no HTTP, job worker, schedules, reaper or HL7 MLLP: those run once, in the serving process),
with the same handlers. A C-STORE is spooled, hashed and parsed in the receiver, and answered
only once the transaction holding it has committed (what a success means is unchanged). Who
commits depends on the database:

- PostgreSQL: the receiver indexes it itself, in its own transaction (each receiver has its
  own group-commit `IngestBatcher`).
- SQLite (one writer at a time): the receiver hands the parsed instance to the serving
  process's one writer over a Unix socket (`broker.dimse.handoff`), where it joins the group
  commits of the serving process's own C-STOREs. The receivers still take pynetdicom's decoding,
  the hash and the parse off the serving process's GIL.

State that was per process and is now shared or decided:
- the lock-out guards count across processes (`broker.dimse.guards`);
- object keys being placed (`broker.index.ingest._IN_FLIGHT`) stay per process (on SQLite
  every placement is the serving process's own): the reaper, in the serving process, relies
  on its grace period (settings.reap_grace_seconds, an hour by default, against the seconds
  between an object's placement and its row's commit) for other processes' placements; see
  the comment at `_IN_FLIGHT` for why the race cleanup stays safe.

`ReceiverSupervisor` (in the serving process) starts the receivers as spawned processes and
starts a new one in place of one that exits for any reason (a SIGKILL, the OOM killer). A
receiver exits by itself when the serving process is gone (on SQLite its C-STOREs fail with
0xA700 meanwhile: the writer is unreachable). What a killed receiver had received
and not yet acknowledged is lost to its peer, which sees the association drop and re-sends;
nothing it acknowledged is lost (committed first), and nothing half-stored is visible (an object
without a row is named by nothing and reaped; a spool file is reaped).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess

from broker.deps import AppState
from broker.dimse.guards import SharedCounts
from broker.dimse.handoff import RemoteWriter, WriterAddress
from broker.dimse.scp import ScpHandle, start_scp, stop_scp
from broker.index.parse_worker import DIMSE_RECEIVER_NAME, name_process
from broker.logfilters import configure_logging
from broker.settings import Settings

log = logging.getLogger("scanonce.dimse")

# A receiver that exits sooner than this after its start counts as failing at start (a database
# down, a bad setting): its successor waits, doubling up to _MAX_BACKOFF, instead of a spin.
_QUICK_EXIT = 10.0
_MAX_BACKOFF = 30.0


def shared_counts(settings: Settings) -> SharedCounts | None:
    """The guards' shared counts for the serving process (row 0) and its receivers, or None
    when there are no receivers (the SCP then counts in its own memory, as always)."""
    if settings.dimse_receivers <= 0:
        return None
    return SharedCounts(rows=settings.dimse_receivers + 1)


class ReceiverSupervisor:
    """Starts `count` receiver processes on `host`:`port` (rows 1..count of `shared`; row 0 is
    the serving process's own listener) and keeps them running until `stop`. With `writer`,
    the receivers commit their C-STOREs through it (SQLite) instead of writing the index."""

    def __init__(
        self,
        *,
        settings: Settings,
        host: str,
        port: int,
        count: int,
        shared: SharedCounts,
        build: Callable[[Settings], AppState],
        writer: WriterAddress | None = None,
    ) -> None:
        self._settings = settings
        # On SQLite: the serving process's writer (`broker.dimse.handoff.WriterServer`), which
        # its owner closes after `stop`.
        self._writer = writer
        self._host, self._port = host, port
        self._count = count
        self._shared = shared
        self._build = build  # pickled by reference: the app's `build_receiver_state`
        # spawn, not fork: this process has threads (a fork may copy a lock another holds).
        self._ctx = multiprocessing.get_context("spawn")
        self._procs: dict[int, BaseProcess] = {}
        self._started: dict[int, float] = {}
        self._failures: dict[int, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> ReceiverSupervisor:
        with self._lock:
            for row in range(1, self._count + 1):
                self._spawn(row)
        self._thread = threading.Thread(target=self._watch, name="scanonce-receivers", daemon=True)
        self._thread.start()
        return self

    def pids(self) -> dict[int, int]:
        """Row -> pid of each receiver process now."""
        with self._lock:
            return {row: p.pid for row, p in self._procs.items() if p.pid is not None}

    def wait_listening(self, timeout: float) -> bool:
        """Until every receiver now running listens on the port (False: not within `timeout`)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pids = self.pids()
            if len(pids) == self._count and all(self._shared.listening(r) == pid for r, pid in pids.items()):
                return True
            self._stop.wait(0.05)
        return False

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the receivers (SIGTERM: each finishes what it is committing and closes) and the
        watch; SIGKILL for one that has not ended after `timeout`."""
        self._stop.set()
        with self._lock:
            procs = list(self._procs.values())
        for p in procs:
            if p.is_alive():
                p.terminate()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.1, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(5)
        if self._thread is not None:
            self._thread.join(5)

    def _spawn(self, row: int) -> None:
        self._shared.clear(row)  # the counts of the process it replaces, if any
        process = self._ctx.Process(
            target=_receiver_main,
            args=(
                self._settings,
                row,
                self._host,
                self._port,
                self._shared,
                self._build,
                os.getpid(),
                self._writer,
            ),
            name=f"scanonce-dimse-receiver-{row}",
            daemon=True,
        )
        process.start()
        self._procs[row] = process
        self._started[row] = time.monotonic()
        log.info("DIMSE receiver %d started (pid %s) on port %d", row, process.pid, self._port)

    def _watch(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                by_sentinel = {p.sentinel: row for row, p in self._procs.items()}
            ended = wait(list(by_sentinel), timeout=1.0)
            for sentinel in ended:
                row = by_sentinel[sentinel]  # type: ignore[index]
                with self._lock:
                    if self._stop.is_set():
                        return
                    process = self._procs[row]
                # Reaped outside the lock, and never waited on for long: its sentinel says it
                # has let go of its end, not that it has exited, and `pids()` and `stop()` must
                # not block behind a receiver that is slow to die (seen under load).
                process.join(timeout=5)
                if process.is_alive():
                    process.kill()
                    process.join(timeout=5)
                with self._lock:
                    if self._stop.is_set():
                        return
                    quick = time.monotonic() - self._started[row] < _QUICK_EXIT
                    self._failures[row] = self._failures.get(row, 0) + 1 if quick else 0
                log.warning(
                    "DIMSE receiver %d (pid %s) exited with %s; starting another",
                    row,
                    process.pid,
                    process.exitcode,
                )
                failures = self._failures[row]
                if failures and self._stop.wait(min(_MAX_BACKOFF, 2.0 ** (failures - 1))):
                    return
                with self._lock:
                    if self._stop.is_set():
                        return
                    self._spawn(row)


def _receiver_main(
    settings: Settings,
    row: int,
    host: str,
    port: int,
    shared: SharedCounts,
    build: Callable[[Settings], AppState],
    parent: int,
    writer: WriterAddress | None,
) -> None:
    """A receiver process: the DIMSE SCP on the shared port until SIGTERM or its parent ends."""
    name_process(DIMSE_RECEIVER_NAME)
    configure_logging("info", settings.log_format)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C reaches the whole group: the parent stops us

    def watch_parent() -> None:
        # Killed outright, the serving process cannot stop us: a receiver must not outlive it
        # (it would keep the port and accept associations nobody supervises).
        while os.getppid() == parent and not stop.is_set():
            time.sleep(1.0)
        stop.set()

    threading.Thread(target=watch_parent, name="scanonce-parent-watch", daemon=True).start()
    state = build(settings)
    ingest = RemoteWriter(writer) if writer is not None else None
    handle: ScpHandle = start_scp(state=state, host=host, port=port, shared=shared, row=row, ingest=ingest)
    try:
        stop.wait()
    finally:
        stop_scp(handle)
        state.engine.dispose()
