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
one instance when a single association sends, about one per association under load.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import groupby
from typing import Any

from sqlalchemy.engine import Engine

from broker.index.ingest import IngestAudit, index_parsed
from broker.index.parse import _Parsed, parse_instance
from broker.index.schemas import StoreOutcome
from broker.security.schemas import Principal
from broker.security.service import authorize
from storage import ObjectStore

log = logging.getLogger("scanonce.ingest")

_MAX_GROUP = 64


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

    def __init__(self, *, max_group: int = _MAX_GROUP) -> None:
        self._max_group = max_group
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False

    def ingest_one(
        self,
        *,
        engine: Engine,
        store: ObjectStore,
        principal: Principal,
        facility_id: str,
        path: str,
        consume: bool = False,
        audit: IngestAudit | None = None,
    ) -> StoreOutcome:
        """Parse, store and index one Part 10 file; returns once its index row is committed (and,
        with `audit`, its audit event, in the same transaction).
        Raises what `index_parsed` raises (database or store unavailable, ...)."""
        authorize(principal, action="index.store", facility=facility_id)
        parsed = parse_instance(path)
        if isinstance(parsed, StoreOutcome):
            return parsed
        item = _Item(
            engine=engine,
            store=store,
            principal=principal,
            facility_id=facility_id,
            parsed=parsed,
            consume=consume,
            audit=audit,
        )
        self._submit(item)
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
            stop = False
            while len(group) < self._max_group:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                group.append(nxt)
            self._write(group)
            if stop:
                return

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
    if all(item.audit is None for item in items):
        return None

    def audit(*, session: Any, stored: Sequence[tuple[str, str, str, str]]) -> None:
        for item, one in zip(items, stored, strict=True):
            if item.audit is not None:
                item.audit(session=session, stored=[one])

    return audit
