"""Crash residue: what a broker killed mid-ingest leaves behind, and nothing else removes.

- Spool files: STOW-RS parts (`spool/stow-*.part`) and C-STORE data sets (`spool/*.dcm`) being
  received when the process died. Never acknowledged.
- Objects under `dcm/` (`studies/` as earlier releases stored them) and `conflicts/` that no
  index row names: ingest stores the object first and commits its row second, so a crash (or
  a database that failed) in between leaves the bytes without a row. Never acknowledged
  either: an instance is acknowledged only once its row has committed.

`reap` removes both, but only once they are older than a grace period: a younger file or object
may belong to an ingest still under way (on this node or another sharing the data). Each
object is checked against the index just before it is removed, while this process's ingests
are held from placing objects (`ingest.no_new_placements`), and re-read (head) first, so an
object that a re-sent instance has just put back is left alone. Works through the ObjectStore
protocol, so the same for a local folder and S3.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from broker.index.ingest import no_new_placements
from broker.index.keys import CONFLICT_PREFIX, INSTANCE_PREFIXES
from broker.index.models import Instance, InstanceConflict
from storage import ObjectNotFound, ObjectStore

log = logging.getLogger("scanonce.reaper")

_SPOOL_PATTERNS = ("stow-*.part", "*.dcm")
_CHUNK = 500


@dataclass(frozen=True, slots=True)
class Reaped:
    spool_files: int
    objects: int


def reap(
    *, engine: Engine, store: ObjectStore, data_dir: Path, grace_seconds: float, now: float | None = None
) -> Reaped:
    """Remove spool files and unindexed objects older than `grace_seconds` (at `now`)."""
    cutoff = (time.time() if now is None else now) - grace_seconds
    spool_files = _reap_spool(data_dir / "spool", cutoff)
    objects = 0
    places = [(prefix, Instance.object_key) for prefix in INSTANCE_PREFIXES]
    for prefix, column in [*places, (CONFLICT_PREFIX, InstanceConflict.object_key)]:
        objects += _reap_objects(engine=engine, store=store, prefix=prefix, column=column, cutoff=cutoff)
    if spool_files or objects:
        log.warning(
            "removed crash residue: %d spool files, %d stored objects that no index row named",
            spool_files,
            objects,
        )
    return Reaped(spool_files=spool_files, objects=objects)


def _reap_spool(spool: Path, cutoff: float) -> int:
    removed = 0
    if not spool.is_dir():
        return 0
    for pattern in _SPOOL_PATTERNS:
        for path in spool.glob(pattern):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue  # finished and removed by its request meanwhile
    return removed


def _named(engine: Engine, column: Any, keys: list[str]) -> set[str]:
    with Session(engine) as session:
        return set(session.exec(select(col(column)).where(col(column).in_(keys))))


def _reap_objects(*, engine: Engine, store: ObjectStore, prefix: str, column: Any, cutoff: float) -> int:
    # Checked a chunk at a time as the listing goes: a region's bucket lists hundreds of millions
    # of keys, which must never be held in memory at once.
    removed = 0
    old: list[str] = []
    for info in store.list(prefix):
        if info.modified is not None and info.modified < cutoff:
            old.append(info.key)
        if len(old) >= _CHUNK:
            removed += _reap_chunk(engine=engine, store=store, keys=old, column=column, cutoff=cutoff)
            old = []
    return removed + _reap_chunk(engine=engine, store=store, keys=old, column=column, cutoff=cutoff)


def _reap_chunk(*, engine: Engine, store: ObjectStore, keys: list[str], column: Any, cutoff: float) -> int:
    if not keys:
        return 0
    removed = 0
    for key in sorted(set(keys) - _named(engine, column, keys)):
        if _remove_if_unnamed(engine=engine, store=store, key=key, column=column, cutoff=cutoff):
            removed += 1
    return removed


def _remove_if_unnamed(*, engine: Engine, store: ObjectStore, key: str, column: Any, cutoff: float) -> bool:
    with no_new_placements() as in_flight:
        if in_flight(key):
            return False
        try:
            info = store.head(key)
        except ObjectNotFound:
            return False
        if info.modified is None or info.modified >= cutoff:
            return False  # put again since it was listed (an instance re-sent): its ingest is on
        if _named(engine, column, [key]):
            return False
        store.delete(key)
        return True


def reap_periodically(
    *,
    engine: Engine,
    store: ObjectStore,
    data_dir: Path,
    grace_seconds: float,
    interval_seconds: float,
    stop: threading.Event,
) -> None:
    """`reap` now, then every `interval_seconds` (0: only now) until `stop` is set; for a
    background thread of the server."""
    while not stop.is_set():
        try:
            reap(engine=engine, store=store, data_dir=data_dir, grace_seconds=grace_seconds)
        except Exception as exc:  # a store or database outage must not end the schedule
            log.error("reaping crash residue failed: %s", type(exc).__name__)
        if interval_seconds <= 0:
            return
        stop.wait(interval_seconds)
