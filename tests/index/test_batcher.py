"""Group commit (IngestBatcher): what senders on parallel connections notice, on both backends."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import Session, select

from broker.app import build_state
from broker.deps import AppState
from broker.dicom import status
from broker.dicom.received import HashingWriter, Received
from broker.index.ingest import index_parsed
from broker.index.keys import instance_key
from broker.index.models import Instance
from broker.index.service import IngestBatcher, StoreOutcome, parse_instance
from broker.security.schemas import Principal, Role
from broker.settings import Settings
from storage import StoreUnavailable
from tests.support import make_ds, write

P = Principal(who="test", role=Role.admin, facility="local")
STUDY = "1.2.826.0.1.3680043.8.498.77"
SERIES = STUDY + ".1"


@pytest.fixture
def state(settings: Settings) -> Iterator[AppState]:
    st = build_state(settings)
    yield st
    st.engine.dispose()


@pytest.fixture
def batcher() -> Iterator[IngestBatcher]:
    b = IngestBatcher()
    yield b
    b.close()


def _file(tmp: Path, n: int, *, description: str = "CT HEAD") -> str:
    sop = f"{SERIES}.{n}"
    ds = make_ds(sop=sop, study=STUDY, series=SERIES, instance_number=n, description=description)
    return write(tmp, f"{n}-{description.replace(' ', '_')}.dcm", ds)


def _indexed(state: AppState) -> set[str]:
    with Session(state.engine) as s:
        return set(s.exec(select(Instance.sop_uid)).all())


def test_parallel_senders_each_get_their_own_outcome_once_committed(
    state: AppState, batcher: IngestBatcher, tmp_path: Path
) -> None:
    paths = [_file(tmp_path, n) for n in range(1, 13)]
    seen_at_return: dict[str, bool] = {}

    def send(path: str) -> StoreOutcome:
        outcome = batcher.ingest_one(
            engine=state.engine, store=state.store, principal=P, facility_id="local", path=path
        )
        if outcome.status == "stored":
            # Acknowledged means committed: another connection sees the row already.
            seen_at_return[outcome.sop_instance_uid] = outcome.sop_instance_uid in _indexed(state)
        return outcome

    with ThreadPoolExecutor(6) as pool:
        outcomes = list(pool.map(send, paths))
        # Then, again in parallel: a re-send of a stored instance, and a different object under
        # a stored SOP Instance UID.
        resend, conflict = pool.map(send, [paths[0], _file(tmp_path, 2, description="CT CHEST")])
    assert [o.status for o in outcomes] == ["stored"] * 12
    assert resend.status == "duplicate"
    assert conflict.status == "failed" and conflict.failure_reason == status.DUPLICATE_SOP_INSTANCE
    assert len(seen_at_return) == 12 and all(seen_at_return.values())
    assert _indexed(state) == {f"{SERIES}.{n}" for n in range(1, 13)}


class _FailsFor:
    """The real store, except that one object cannot be written, and the first write is slow
    (so that the writes queued behind it are committed as one group)."""

    def __init__(self, inner: Any, bad_key: str) -> None:
        self._inner = inner
        self._bad = bad_key
        self._first = threading.Event()

    def put_file(self, key: str, path: str, *, move: bool = False) -> Any:
        if not self._first.is_set():
            self._first.set()
            time.sleep(0.3)
        if key == self._bad:
            raise OSError(5, "Input/output error")
        return self._inner.put_file(key, path, move=move)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def test_one_object_that_cannot_be_stored_fails_only_its_own_sender(
    state: AppState, batcher: IngestBatcher, tmp_path: Path
) -> None:
    paths = [_file(tmp_path, n) for n in range(1, 9)]
    bad = f"{SERIES}.5"
    store = _FailsFor(state.store, instance_key(hashlib.sha256(Path(paths[4]).read_bytes()).hexdigest()))

    def send(path: str) -> StoreOutcome | BaseException:
        try:
            return batcher.ingest_one(
                engine=state.engine,
                store=store,
                principal=P,
                facility_id="local",
                path=path,
            )
        except OSError as exc:
            return exc

    with ThreadPoolExecutor(8) as pool:
        first = pool.submit(send, paths[0])
        time.sleep(0.1)  # the first write is under way: the other seven queue up behind it
        rest = list(pool.map(send, paths[1:]))
    results = [first.result(), *rest]
    failed = [p for p, r in zip(paths, results, strict=True) if isinstance(r, OSError)]
    assert failed == [paths[4]]
    assert all(isinstance(r, StoreOutcome) and r.status == "stored" for r in results if r is not results[4])
    assert _indexed(state) == {f"{SERIES}.{n}" for n in range(1, 9)} - {bad}


def test_a_closed_batcher_refuses_new_work(state: AppState, tmp_path: Path) -> None:
    b = IngestBatcher()
    path = _file(tmp_path, 1)
    kw: dict[str, Any] = {
        "engine": state.engine,
        "store": state.store,
        "principal": P,
        "facility_id": "local",
    }
    assert b.ingest_one(path=path, **kw).status == "stored"
    b.close()
    with pytest.raises(RuntimeError, match="closed"):
        b.ingest_one(path=path, **kw)


def test_parallel_senders_share_commits(state: AppState, batcher: IngestBatcher, tmp_path: Path) -> None:
    """Four connections each sending one instance after another (as four storescu do): the
    writer waits briefly for the senders it has seen, so most commits carry one instance from
    each, not one and then three (commits and fsyncs are what a group shares)."""
    from sqlalchemy import event

    senders, each = 4, 8
    paths = [[_file(tmp_path, 100 * s + n) for n in range(1, each + 1)] for s in range(senders)]
    commits: list[int] = []

    def counted(_conn: Any) -> None:
        commits.append(1)

    event.listen(state.engine, "commit", counted)
    try:

        def send(mine: list[str]) -> list[str]:
            return [
                batcher.ingest_one(
                    engine=state.engine, store=state.store, principal=P, facility_id="local", path=path
                ).status
                for path in mine
            ]

        with ThreadPoolExecutor(senders) as pool:
            results = list(pool.map(send, paths))
    finally:
        event.remove(state.engine, "commit", counted)
    assert results == [["stored"] * each] * senders
    # 32 instances: groups of four make ~8-9 commits; one-and-three makes ~16.
    assert len(commits) <= 12, f"{len(commits)} commits for {senders * each} instances"


def test_a_sender_whose_connection_closed_is_not_waited_for(state: AppState, tmp_path: Path) -> None:
    """A PACS that opens an association per instance: each C-STORE comes from a new thread and
    the one before has ended. The writer must not wait for the ended ones as recent senders
    (each instance waited the whole group wait for them)."""
    b = IngestBatcher(linger=1.0)  # a wait long enough to see
    kw: dict[str, Any] = {
        "engine": state.engine,
        "store": state.store,
        "principal": P,
        "facility_id": "local",
    }
    try:
        took: list[float] = []

        def one(n: int) -> None:
            start = time.monotonic()
            assert b.ingest_one(path=_file(tmp_path, n), **kw).status == "stored"
            took.append(time.monotonic() - start)

        for n in range(1, 4):  # one "association" after another, each its own thread
            t = threading.Thread(target=one, args=(n,))
            t.start()
            t.join()
        assert len(took) == 3
        assert max(took) < 0.5, took
    finally:
        b.close()


def _spooled_with_stray_byte(tmp: Path, n: int) -> Received:
    """A file received through the hashing writer (as a C-STORE spool file or STOW-RS part is),
    then one byte written to its descriptor by something else: what a poke of a closed, reused
    pipe descriptor once did. Its hash and size are of the bytes received, not of the file."""
    data = Path(_file(tmp, n)).read_bytes()
    spool = tmp / f"spool-{n}.dcm"
    with open(spool, "wb") as raw:
        writer = HashingWriter(raw)
        writer.write(data)
        raw.write(b"\0")  # the stray write, past the hashing writer (the parse reads no further)
        return writer.received(str(spool))


@pytest.mark.parametrize("group", [1, 3], ids=["alone", "group"])
def test_a_placed_object_longer_than_what_was_received_is_not_indexed(
    state: AppState, tmp_path: Path, group: int
) -> None:
    # One instance is placed by put_file, a group by put_files: both paths check the size.
    received = [_spooled_with_stray_byte(tmp_path, n) for n in range(1, 1 + group)]
    parsed = [parse_instance(r) for r in received]
    with pytest.raises(StoreUnavailable, match="did not match the bytes received"):
        index_parsed(
            engine=state.engine,
            store=state.store,
            principal=P,
            facility_id="local",
            parsed=parsed,
            consume=True,
        )
    assert _indexed(state) == set()  # nothing acknowledged
    # The sender's retry brings the bytes as they are: stored, and the object hashes as indexed.
    (tmp_path / "again").mkdir()
    sent = [_file(tmp_path / "again", n) for n in range(1, 1 + group)]
    outcomes = index_parsed(
        engine=state.engine,
        store=state.store,
        principal=P,
        facility_id="local",
        parsed=[parse_instance(p) for p in sent],
    )
    assert [o.status for o in outcomes] == ["stored"] * group
    for r in received:
        stored = b"".join(state.store.get(instance_key(r.sha256)))
        assert hashlib.sha256(stored).hexdigest() == r.sha256
