"""Two different objects under one SOP Instance UID arriving at the same moment: one is
stored, the other kept apart under conflicts/, and nothing else is left in the store."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import Session, select

from broker.app import build_state
from broker.deps import AppState
from broker.dicom import status
from broker.index import service
from broker.index.keys import INSTANCE_PREFIX
from broker.index.models import Instance, InstanceConflict
from broker.security.schemas import Principal, Role
from broker.settings import Settings
from tests.support import make_ds, write

P = Principal(who="test", role=Role.admin, facility="local")


class _RacingStore:
    """The real store, except that the first instance put of each of two threads waits for the
    other's: both batches have looked up the UID (and found nothing) before either commits."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self._barrier = threading.Barrier(2, timeout=10)
        self._waited: set[int] = set()
        self._lock = threading.Lock()

    def put_file(self, key: str, path: str, *, move: bool = False) -> Any:
        info = self._store.put_file(key, path, move=move)
        me = threading.get_ident()
        with self._lock:
            first = key.startswith(INSTANCE_PREFIX) and me not in self._waited
            self._waited.add(me)
        if first:
            self._barrier.wait()
        return info

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


@pytest.fixture
def state(settings: Settings) -> Iterator[AppState]:
    st = build_state(settings)
    yield st
    st.engine.dispose()


def test_the_loser_of_a_race_leaves_only_its_conflict_copy(state: AppState, tmp_path: Path) -> None:
    study = "1.2.826.0.1.3680043.8.498.71"
    series, sop = study + ".1", study + ".1.1"
    paths = [
        write(tmp_path, f"{n}.dcm", make_ds(sop=sop, study=study, series=series, description=f"copy {n}"))
        for n in range(2)
    ]
    racing = _RacingStore(state.store)

    def ingest(path: str) -> service.StoreOutcome:
        (outcome,) = service.ingest_files(
            engine=state.engine,
            store=racing,
            principal=P,
            facility_id="local",
            paths=[path],
        )
        return outcome

    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(ingest, paths))
    assert sorted(o.status for o in outcomes) == ["failed", "stored"]
    (lost,) = [o for o in outcomes if o.status == "failed"]
    assert lost.failure_reason == status.DUPLICATE_SOP_INSTANCE
    with Session(state.engine) as session:
        rows = session.exec(select(Instance.object_key)).all()
        conflicts = session.exec(select(InstanceConflict.object_key)).all()
    assert len(rows) == 1 and len(conflicts) == 1
    # Every object in the store is named by a row: the winner and the kept-apart copy.
    assert sorted(o.key for o in state.store.list()) == sorted([*rows, *conflicts])
