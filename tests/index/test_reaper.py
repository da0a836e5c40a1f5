"""Crash residue is reaped, and nothing acknowledged is touched: spool files of interrupted
transfers and stored objects whose index row never committed, once older than the grace
period, on both backends; and after a real `kill -9` of `scanonce serve` in the middle of a
STOW-RS."""

from __future__ import annotations

import io
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from sqlmodel import Session

from broker.app import build_state
from broker.deps import AppState
from broker.index import ingest, reaper, service
from broker.index.keys import conflict_key, instance_key
from broker.index.reaper import reap
from broker.security.schemas import Principal, Role
from broker.settings import Settings
from tests.dicomweb.data import multipart_body
from tests.identity.test_mllp_serve import scanonce_serve
from tests.support import auth_headers, indexed_instance_keys, make_ds, to_bytes, write

P = Principal(who="test", role=Role.admin, facility="local")
HOUR = 3600.0
STUDY = "1.2.826.0.1.3680043.8.498.81"


@pytest.fixture
def state(settings: Settings) -> Iterator[AppState]:
    st = build_state(settings)
    yield st
    st.engine.dispose()


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_residue_older_than_the_grace_period_is_reaped(state: AppState, tmp_path: Path) -> None:
    data_dir = state.settings.data_dir
    # An acknowledged instance, and a kept-apart conflicting copy of it (both have rows).
    sop = STUDY + ".1.1"
    kept = write(tmp_path, "kept.dcm", make_ds(sop=sop, study=STUDY, series=STUDY + ".1"))
    other = write(tmp_path, "other.dcm", make_ds(sop=sop, study=STUDY, series=STUDY + ".1", description="x"))
    outcomes = service.ingest_files(
        engine=state.engine, store=state.store, principal=P, facility_id="local", paths=[kept]
    )
    outcomes += service.ingest_files(
        engine=state.engine, store=state.store, principal=P, facility_id="local", paths=[other]
    )
    assert [o.status for o in outcomes] == ["stored", "failed"]
    acknowledged = Path(kept).read_bytes()
    # Spool files of transfers cut short: STOW-RS parts and C-STORE data sets.
    spool = data_dir / "spool"
    spool.mkdir(exist_ok=True)
    old_part, old_cstore, new_part = spool / "stow-dead.part", spool / "tmpdead.dcm", spool / "stow-live.part"
    for path in (old_part, old_cstore, new_part):
        path.write_bytes(b"partial")
    _age(old_part, 2 * HOUR)
    _age(old_cstore, 2 * HOUR)
    # Objects placed whose rows never committed (the process died in between).
    orphan = instance_key("a" * 64)
    orphan_conflict = conflict_key(STUDY + ".3.1", "b" * 64)
    being_placed = instance_key("c" * 64)
    # And one where earlier releases put instances (their objects stay where they are).
    earlier_orphan = f"studies/{STUDY}/series/{STUDY}.5/instances/{STUDY}.5.1/{'e' * 64}.dcm"
    for key in (orphan, orphan_conflict, being_placed, earlier_orphan):
        state.store.put(key, io.BytesIO(b"bytes without a row"))

    # Now: the spool files older than an hour go; every object is younger than an hour.
    reaped = reap(engine=state.engine, store=state.store, data_dir=data_dir, grace_seconds=HOUR)
    assert (reaped.spool_files, reaped.objects) == (2, 0)
    assert sorted(p.name for p in spool.iterdir()) == ["stow-live.part"]
    assert len(list(state.store.list())) == 6

    # Two hours on: the objects no row names go, except one an ingest is placing right now.
    held: list[str] = []
    ingest._hold(being_placed, held)
    try:
        later = time.time() + 2 * HOUR
        reaped = reap(
            engine=state.engine, store=state.store, data_dir=data_dir, grace_seconds=HOUR, now=later
        )
    finally:
        ingest._release(held)
    assert reaped.objects == 3
    named = indexed_instance_keys(state.engine, conflicts=True)
    assert {o.key for o in state.store.list()} == named | {being_placed}
    # The acknowledged instance is intact.
    with Session(state.engine) as session:
        (ref,) = service.find_instances(session=session, study_uid=STUDY)
    assert b"".join(state.store.get(ref.object_key)) == acknowledged


def test_a_long_listing_is_reaped_a_chunk_at_a_time(state: AppState, monkeypatch: pytest.MonkeyPatch) -> None:
    """A region's bucket lists hundreds of millions of keys: residue is removed as the listing
    goes, never after collecting every old key in memory first."""
    monkeypatch.setattr(reaper, "_CHUNK", 2)
    orphans = [instance_key(f"{i:x}" * 64) for i in range(1, 6)]
    for key in orphans:
        state.store.put(key, io.BytesIO(b"bytes without a row"))
    listed: list[str] = []
    listed_at_first_delete: list[int] = []
    real_list, real_delete = state.store.list, state.store.delete

    def listing(prefix: str = "") -> Iterator[object]:
        for info in real_list(prefix):
            listed.append(info.key)
            yield info

    def delete(key: str) -> None:
        listed_at_first_delete.append(len(listed))
        real_delete(key)

    monkeypatch.setattr(state.store, "list", listing)
    monkeypatch.setattr(state.store, "delete", delete)
    reaped = reap(
        engine=state.engine,
        store=state.store,
        data_dir=state.settings.data_dir,
        grace_seconds=HOUR,
        now=time.time() + 2 * HOUR,
    )
    assert reaped.objects == len(orphans)
    assert not set(orphans) & {o.key for o in real_list()}
    assert listed_at_first_delete[0] < len(orphans), "every key was listed before the first removal"


def _stow_stalled_mid_body(url: str, part: bytes) -> socket.socket:
    """A STOW-RS whose body stops halfway through its one part (the client is still there)."""
    body, ctype = multipart_body([part])
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    head = (
        f"POST /dicom-web/studies HTTP/1.1\r\nHost: {host}\r\nContent-Type: {ctype}\r\n"
        f"Authorization: {auth_headers()['Authorization']}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    sock.sendall(head + body[: len(body) // 2])
    return sock


def _wait_for(predicate: object, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return False


def test_residue_of_a_server_killed_mid_stow_is_reaped_at_the_next_start(tmp_path: Path) -> None:
    backend = SimpleNamespace(
        database_url=f"sqlite:///{tmp_path / 'index.db'}", storage_url=f"file://{tmp_path / 'objects'}"
    )
    serve_dir = tmp_path / "serve"
    spool = serve_dir / "data" / "spool"
    sop = STUDY + ".5.1"
    acknowledged = to_bytes(make_ds(sop=sop, study=STUDY, series=STUDY + ".5"))
    big = make_ds(sop=STUDY + ".6.1", study=STUDY, series=STUDY + ".6")
    big.add_new(0x00091010, "OB", b"\0" * (4 << 20))  # large enough to be mid-transfer
    with scanonce_serve(serve_dir, backend, SCANONCE_MLLP_PORT="0") as served:
        body, ctype = multipart_body([acknowledged])
        r = httpx.post(
            f"{served.url}/dicom-web/studies", content=body, headers={"Content-Type": ctype, **auth_headers()}
        )
        assert r.status_code == 200, r.text
        stalled = _stow_stalled_mid_body(served.url, to_bytes(big))
        try:
            assert _wait_for(lambda: list(spool.glob("stow-*.part"))), "the STOW-RS part was being received"
            os.kill(served.proc.pid, signal.SIGKILL)
            served.proc.wait(10)
        finally:
            stalled.close()
    (part,) = spool.glob("stow-*.part")
    # An object the killed ingest had placed before its row could commit.
    orphan = tmp_path / "objects" / instance_key("d" * 64)
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"bytes without a row")
    for path in (part, orphan):
        _age(path, 2 * HOUR)  # the restart comes after the grace period

    with scanonce_serve(serve_dir, backend, SCANONCE_MLLP_PORT="0") as served:
        assert _wait_for(lambda: not part.exists() and not orphan.exists()), "residue left after restart"
        r = httpx.get(
            f"{served.url}/dicom-web/studies/{STUDY}/series/{STUDY}.5/instances/{sop}", headers=auth_headers()
        )
        assert r.status_code == 200
        assert acknowledged in r.content  # the acknowledged instance, byte for byte
    assert "removed crash residue: 1 spool files, 1 stored objects" in served.log.read_text()
