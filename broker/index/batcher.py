"""Group commit for instances that arrive one at a time on many connections at once.

A C-STORE carries one instance, and a PACS forwarding a worklist opens several associations in
parallel. Indexing each instance in its own transaction makes every association wait for its
own commit and, on SQLite, for the others' write locks (SQLite's busy handler sleeps in steps of
up to 100 ms). Here each caller parses its instance in its own thread (validation stays per
instance, as before), then hands it to one writer thread, which indexes everything waiting in
one `index_parsed` call (one transaction: objects stored first, then the rows), and wakes each
caller with its own outcome. A caller returns (and the SCU gets its C-STORE-RSP) only after the
commit that holds its instance: nothing is acknowledged before it is durable.

While the writer commits one group, the next group gathers, so the group size follows the load:
one instance when a single association sends, about one per association under load. A group's
statements, commit and fsyncs cost about the same whatever its size, and under load the
process is bound by CPU. Left alone, four senders fall into groups of one and three (the one
answered first sends its next instance while the other three are being committed). So the
writer waits, 4 ms at most (`_LINGER`), for the senders it has seen lately (`_RECENT` seconds)
to join a group, or for callers still parsing: a group of four costs about what a group of one
does. With C-STOREs received through pynetdicom's own path, a wait long enough to gather every
sender every time put all of them in lockstep with the writer (all receive, then all wait for
one commit), so receiving and writing never overlapped: with four `storescu` a 10 ms wait gave
222-310 instances/s, 2 ms 314-409. Since C-STOREs are received in the DUL thread
(broker.dicom.fast_store) the process is bound by CPU, and fuller groups cost less per
instance: 4 ms gave 1.05-1.08x the rate of 2 ms at 0.1-0.3 ms less CPU per instance in two
runs side by side (docs/benchmarks.md, "C-STORE requests read in the DUL thread"). A lone
association never waits: it has no recent sender to wait for (nor does a sender that opens an
association per instance: the threads of its closed associations are not waited for, where each
instance waited the whole 4 ms). The SCP takes the wait from settings.ingest_group_wait_ms
(`SCANONCE_INGEST_GROUP_WAIT_MS`), for a disk whose fsync is slow (longer) or a sender that
wants every instance's latency as low as it goes (0).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import groupby
from typing import Any, cast

from sqlalchemy.engine import Engine

from broker.index.ingest import IngestAudit, index_parsed
from broker.index.parse import Received, _Parsed, parse_instance
from broker.index.schemas import StoreOutcome
from broker.security.schemas import Principal
from broker.security.service import authorize
from storage import ObjectStore

log = logging.getLogger("scanonce.ingest")

_MAX_GROUP = 64
# How long the writer waits for recent senders, or callers parsing now, to join a group.
_LINGER = 0.004
# A caller (thread: one per DIMSE association) that submitted within this many seconds is a
# sender the writer expects in the next group.
_RECENT = 0.5


@dataclass(eq=False)
class _Item:
    engine: Engine
    store: ObjectStore
    principal: Principal
    facility_id: str
    parsed: _Parsed
    consume: bool
    audit: IngestAudit | None = None
    done: threading.Event = field(default_factory=threading.Event)
    outcome: StoreOutcome | None = None
    error: BaseException | None = None


class IngestBatcher:
    """One writer thread; `ingest_one` may be called from any thread. Items are grouped by the
    database, object store and facility they go to (one transaction each)."""

    def __init__(self, *, max_group: int = _MAX_GROUP, linger: float = _LINGER) -> None:
        self._max_group = max_group
        self._linger = linger
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        # Callers between the start of their parse and their item's submission; notified as
        # each submits (or finds its instance cannot be stored).
        self._parsing = 0
        self._arrived = threading.Condition()
        # Caller thread -> when it last submitted. A thread that has ended (an association
        # closed after its one C-STORE) is not waited for.
        self._senders: dict[threading.Thread, float] = {}
        # While the writer lingers: how many more queued items it waits for (None: not waiting).
        self._waiting_for: int | None = None
        self._thread: threading.Thread | None = None
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
        """Parse, store and index one Part 10 file; returns once its index row is committed (and,
        with `audit`, its audit event, in the same transaction).
        `expected_sop`: the (SOP Class, SOP Instance) UIDs the data set must have (a C-STORE's
        request), checked on the same parse. Raises what `index_parsed` raises (database or
        store unavailable, ...)."""
        authorize(principal, action="index.store", facility=facility_id)
        with self._arrived:
            self._parsing += 1
        try:
            parsed = parse_instance(path, expected_sop=expected_sop)
            if isinstance(parsed, StoreOutcome):
                return parsed
            item = _Item(engine, store, principal, facility_id, parsed, consume, audit)
            self._submit(item)
        finally:
            self._joined(was_parsing=True)
        return self._outcome(item)

    def ingest_parsed(
        self,
        *,
        engine: Engine,
        store: ObjectStore,
        principal: Principal,
        facility_id: str,
        parsed: _Parsed,
        consume: bool = False,
        audit: IngestAudit | None = None,
    ) -> StoreOutcome:
        """As `ingest_one`, for an instance parsed already, in another process: a DIMSE receiver
        on SQLite parses there and hands its instance to this one writer
        (`broker.dimse.handoff`). The calling thread counts as one sender, as in `ingest_one`."""
        authorize(principal, action="index.store", facility=facility_id)
        item = _Item(engine, store, principal, facility_id, parsed, consume, audit)
        try:
            self._submit(item)
        finally:
            self._joined(was_parsing=False)
        return self._outcome(item)

    def _joined(self, *, was_parsing: bool) -> None:
        """The calling thread has submitted (or found nothing to submit): it counts as a sender
        the writer expects in the next groups, and a writer lingering for it stops waiting."""
        with self._arrived:
            if was_parsing:
                self._parsing -= 1
            self._senders[threading.current_thread()] = time.monotonic()
            # Woken only once its group is complete: a writer woken by each of four senders
            # took three wake-ups per group for nothing (each a turn for a core and the GIL
            # while the senders wait).
            need = self._waiting_for
            if need is not None and self._parsing <= 0 and self._queue.qsize() >= need:
                self._arrived.notify()

    @staticmethod
    def _outcome(item: _Item) -> StoreOutcome:
        item.done.wait()
        if item.error is not None:
            raise item.error
        assert item.outcome is not None
        return item.outcome

    def close(self) -> None:
        """Finish what is queued, then stop the writer thread."""
        with self._lock:
            self._closed = True
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join()

    def _submit(self, item: _Item) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("the ingest batcher is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="scanonce-ingest-writer", daemon=True)
                self._thread.start()
            self._queue.put(item)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            group = [first]
            stop = self._gather(group)
            self._write(group)
            if stop:
                return

    def _gather(self, group: list[_Item]) -> bool:
        """Add what is queued to `group`, waiting up to `linger` for callers still parsing;
        True if close() was asked for meanwhile."""
        now = time.monotonic()
        deadline = now + self._linger
        with self._arrived:
            recent = now - _RECENT
            for sender in [t for t, seen in self._senders.items() if seen < recent or not t.is_alive()]:
                del self._senders[sender]
            expected = len(self._senders)
        while len(group) < self._max_group:
            try:
                nxt = self._queue.get_nowait()
            except queue.Empty:
                with self._arrived:
                    if not self._queue.empty():
                        continue  # submitted just now
                    left = deadline - time.monotonic()
                    if (self._parsing <= 0 and len(group) >= expected) or left <= 0:
                        return False
                    self._waiting_for = max(0, min(expected, self._max_group) - len(group))
                    try:
                        self._arrived.wait(left)
                    finally:
                        self._waiting_for = None
                continue
            if nxt is None:
                return True
            group.append(nxt)
        return False

    def _write(self, group: list[_Item]) -> None:
        def target(item: _Item) -> tuple[int, int, str]:
            return (id(item.engine), id(item.store), item.facility_id)

        for _target, items in groupby(sorted(group, key=target), key=target):
            self._write_facility(list(items))

    def _write_facility(self, items: list[_Item]) -> None:
        try:
            outcomes = self._index(items)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting callers
            if len(items) > 1:
                # One bad instance must not fail the others: retry them one by one.
                for item in items:
                    self._write_facility([item])
                return
            items[0].error = exc
            items[0].done.set()
            return
        for item, outcome in zip(items, outcomes, strict=True):
            item.outcome = outcome
            item.done.set()

    def _index(self, items: list[_Item]) -> list[StoreOutcome]:
        # Same database, store and facility. The principal only names the sender in the log;
        # consume (the file is the caller's own temporary copy) is true for every C-STORE.
        return index_parsed(
            engine=items[0].engine,
            store=items[0].store,
            principal=items[0].principal,
            facility_id=items[0].facility_id,
            parsed=[item.parsed for item in items],
            consume=all(item.consume for item in items),
            audit=_group_audit(items),
        )


def _group_audit(items: list[_Item]) -> IngestAudit | None:
    """Each item's own audit hook (its own sender) with its own instance, in the group's one
    transaction."""
    hooks = [item.audit for item in items]
    lead = next((h for h in hooks if h is not None), None)
    if lead is None:
        return None
    # A hook that can record a whole group at once (the audit domain's) appends the group's
    # events in one go: one lock of the audit chain's head per commit, not one per instance.
    joint = getattr(lead, "joint", None)
    if joint is not None and all(h is None or type(h) is type(lead) for h in hooks):
        return cast(IngestAudit, joint(hooks))

    def audit(*, session: Any, stored: Sequence[tuple[str, str, str, str]]) -> None:
        for item, one in zip(items, stored, strict=True):
            if item.audit is not None:
                item.audit(session=session, stored=[one])

    return audit
