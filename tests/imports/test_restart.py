"""An import survives its worker being killed with SIGKILL: `scanonce worker` runs as a real
process, is killed -9 mid-import (nothing of its own runs after that), a new worker takes the job
over once its heartbeat is stale, and the import finishes with every instance at the PACS once.

The PACS (Orthanc) writes the SOP Instance UID of every instance it receives to a file (a Lua
`ReceivedInstanceFilter`, which also spends 50 ms per instance so the kill lands mid-import):
that file shows what was sent twice, which only the batches sent and not yet recorded at the
kill (up to `service.SENDERS` + 1 of them: the next batch goes out while one is recorded) may be."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text
from sqlmodel import Session

from broker.deps import AppState
from broker.imports import service
from broker.settings import Settings
from tests.imports.conftest import (
    BROKER_AE,
    LOCAL_MRN,
    MINE,
    add_destination,
    ingest_outside,
    pacs_instances,
    register_local_patient,
)
from tests.peers import OrthancPeer, orthanc
from tests.support import ADMIN

N_CT = 80  # with the SR: 81 instances, six batches of 16: more than SENDERS + 1 may be in flight


@pytest.fixture
def slow_pacs(tmp_path: Path) -> Iterator[tuple[OrthancPeer, Path]]:
    received = tmp_path / "received.log"
    script = tmp_path / "record.lua"
    script.write_text(f"""
function ReceivedInstanceFilter(dicom, origin, info)
  local f = io.open('{received}', 'a')
  f:write(dicom.SOPInstanceUID .. '\\n')
  f:close()
  local done_at = os.clock() + 0.05  -- 50 ms of work per instance (os.execute forks: slow)
  while os.clock() < done_at do end
  return true
end
""")
    with orthanc(
        tmp_path / "pacs", aet="MYPACS", modalities={"scanonce": [BROKER_AE, "127.0.0.1", 104]},
        extra={"LuaScripts": [str(script)]},
    ) as peer:  # fmt: skip
        yield peer, received


def _worker(settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "SCANONCE_DATA_DIR": str(settings.data_dir),
        "SCANONCE_DATABASE_URL": settings.database_url or "",
        "SCANONCE_STORAGE_URL": settings.storage_url or "",
        "SCANONCE_MLLP_PORT": "0",
    }
    with open(log, "ab") as out:
        return subprocess.Popen(
            [str(Path(sys.executable).with_name("scanonce")), "worker"],
            env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip


def _rows(state: AppState, import_id: int) -> dict[str, tuple[str, int, datetime]]:
    with Session(state.engine) as session:
        return {
            r.source_sop_uid: (r.status, r.attempts, r.updated_at)
            for r in service.instances_of(session=session, import_id=import_id)
        }


def _status(state: AppState, import_id: int) -> str:
    with Session(state.engine) as session:
        return service.get_import(session=session, import_id=import_id).status


def _wait(what: str, check: object, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_sigkill_mid_import_then_a_new_worker_finishes_it_without_duplicates(
    state: AppState, settings: Settings, slow_pacs: tuple[OrthancPeer, Path], tmp_path: Path
) -> None:
    pacs, received = slow_pacs
    add_destination(state, pacs)
    (tmp_path / "src").mkdir()
    outside = ingest_outside(state, tmp_path / "src", n_ct=N_CT)
    register_local_patient(state)
    total = N_CT + 1
    row = service.start_import(
        engine=state.engine, principal=ADMIN, study_uid=outside.study_uid, facility_id=MINE, via="dimse"
    )
    import_id = row.id or 0
    log = tmp_path / "worker.log"

    first = _worker(settings, log)
    try:
        # Kill -9 as soon as the first batch is recorded: the job is then mid-way.
        _wait("the first batch", lambda: sum(s == "sent" for s, _, _ in _rows(state, import_id).values()) > 0)
        os.kill(first.pid, signal.SIGKILL)
    finally:
        first.wait(timeout=30)
    assert first.returncode == -signal.SIGKILL
    before = _rows(state, import_id)
    sent_before = {sop for sop, (s, _, _) in before.items() if s == "sent"}
    assert 0 < len(sent_before) < total, len(sent_before)
    assert _status(state, import_id) == "running"  # nobody told the database it died

    # The stale window (60 s without a heartbeat) passing, without waiting a minute for it.
    with Session(state.engine) as session:
        session.execute(
            text("UPDATE job SET heartbeat_at = :t WHERE id = :id"),
            {"t": datetime.now(UTC) - timedelta(seconds=61), "id": row.job_id},
        )
        session.commit()
    second = _worker(settings, log)
    try:
        _wait("the import to finish", lambda: _status(state, import_id) in ("done", "failed"))
    finally:
        # SIGTERM, as a container is stopped: a suite run in the background (CI) starts its
        # processes with SIGINT ignored, and the worker then sat out the 30 s below.
        second.send_signal(signal.SIGTERM)
        try:
            second.wait(timeout=30)
        except subprocess.TimeoutExpired:
            second.kill()
            second.wait()

    with Session(state.engine) as session:
        final = service.get_import(session=session, import_id=import_id)
    assert (final.status, final.sent, final.failed, final.verified) == ("done", total, 0, total), (
        final.message
    )
    after = _rows(state, import_id)
    for sop in sent_before:  # what was recorded as sent before the kill was not sent again
        assert after[sop] == before[sop]
    assert all(s == "sent" for s, _, _ in after.values())
    # The PACS holds every instance exactly once, under the local patient.
    held = pacs_instances(pacs)
    assert sorted(str(d.SOPInstanceUID) for d in held) == sorted(outside.files)
    assert {d.PatientID for d in held} == {LOCAL_MRN}
    count = len(httpx.get(f"{pacs.url}/instances", timeout=10, trust_env=False).json())
    assert count == total
    # Received twice: only instances of the batches sent and not yet recorded at the kill (the
    # SENDERS on the wire and the one whose connection sent on while it was recorded).
    times = Counter(received.read_text().split())
    assert set(times) == set(outside.files)
    twice = {sop for sop, n in times.items() if n > 1}
    assert not twice & sent_before
    assert max(times.values()) <= 2 and len(twice) <= (service.SENDERS + 1) * service.BATCH
